"""The peer components under DDP (train/collective.py): two gloo processes on the CPU whose batches and
random generators differ must end an iteration with the same tail bank, instance bank and
discriminator, and each rank pastes its own share of the global tail bank."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from train.collective import gather, world
from train.config import TrainConfig, apply_layers, validate
from train.peers import Peers, PeerStep


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cfg() -> TrainConfig:
    cfg = TrainConfig()
    apply_layers(cfg, sets=["dsr.enabled=true", "dida.enabled=true", "adv.enabled=true", "dida.dim=8",
                            "model.head_channels=8", "data.crop=128", "dida.update_every=1"])
    return validate(cfg)


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # the ranks' generators differ, as under torchrun (seed + 1000 * rank)
        peers = Peers.build(_cfg(), torch.device("cpu"))
        d_init = _digest(*peers.adversary.disc.parameters())
        g = torch.Generator().manual_seed(rank)  # and so do their batches
        b, h, w = 2, 128, 128
        label = torch.randint(0, 19, (b, h, w), generator=g)
        label[:, :32] = 12  # rider: a tail class, so the bank stores something on every rank
        x = {"source_image": torch.randn(b, 3, h, w, generator=g),
             "source_events": torch.randn(b, 3, h, w, generator=g), "source_label": label}
        step = PeerStep(_cfg(), peers, it=5)
        step.push_tail(x)
        image, _, lbl, _, _ = step.paste_tail(torch.zeros(b, 3, h, w), torch.zeros(b, 3, h, w),
                                               torch.full((b, h, w), 255), torch.ones(b, h, w),
                                               torch.zeros(b, 1, h, w))
        own = lbl[:, :32] == 12
        out_rank = {"pasted_own": bool(own.all()) and torch.equal(image[:, :, :32], x["source_image"][:, :, :32]),
                    "d_init": d_init}
        step._bank_in.append((torch.randn(b, 8, h // 4, w // 4, generator=g), label))
        step._adv_source.append(torch.randn(b, 19, h // 4, w // 4, generator=g))
        step._adv_target.append((torch.randn(b, 19, h // 4, w // 4, generator=g), torch.ones(b, h // 4, w // 4)))
        step.finish()
        e = peers.tail.entries[0]
        out_rank.update(tail=_digest(e["image"], e["events"], e["label"], e["mask"]), tail_n=e["mask"].shape[0],
                        bank=_digest(peers.instances.feats, peers.instances.filled),
                        filled=peers.instances.n_filled, disc=_digest(*peers.adversary.disc.parameters()),
                        gather=gather(torch.tensor([rank])).tolist(), world=world())
        out[rank] = out_rank
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_keep_the_components_state_equal():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        r0, r1 = out[0], out[1]
    assert r0["gather"] == r1["gather"] == [0, 1] and (r0["world"], r1["world"]) == ((0, 2), (1, 2))
    assert r0["d_init"] == r1["d_init"]  # rank 0's initial discriminator, though the seeds differ
    assert r0["tail_n"] == 4 and r0["tail"] == r1["tail"]  # both ranks' batches, the same bank
    assert r0["pasted_own"] and r1["pasted_own"]  # each rank pasted its own share of the entries
    assert r0["filled"] > 0 and r0["bank"] == r1["bank"]
    assert r0["disc"] == r1["disc"] and r0["disc"] != r0["d_init"]  # one step, on the mean gradient
