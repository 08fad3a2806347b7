"""The peer components under DDP (train/common/collective.py): two gloo processes on the CPU whose batches and
random generators differ must end an iteration with the same tail bank, instance bank and
discriminator, and each rank pastes its own share of the global tail bank."""

from __future__ import annotations

import hashlib
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from train.common.collective import gather, world
from train.config import TrainConfig, apply_layers, validate
from train.uda.components.adversarial import OutputDiscriminator
from train.uda.components.dida import Dida
from train.uda.components.dsr import Dsrnss
from train.uda.method import build_method


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
        method = build_method(_cfg(), torch.device("cpu"), None, None)
        dsr, dida, adv = (next(c for c in method.components if isinstance(c, k))
                          for k in (Dsrnss, Dida, OutputDiscriminator))
        for c in (dsr, dida, adv):
            c.start(5)
        d_init = _digest(*adv.adversary.disc.parameters())
        g = torch.Generator().manual_seed(rank)  # and so do their batches
        b, h, w = 2, 128, 128
        label = torch.randint(0, 19, (b, h, w), generator=g)
        label[:, :32] = 12  # rider: a tail class, so the bank stores something on every rank
        x = {"source_image": torch.randn(b, 3, h, w, generator=g),
             "source_events": torch.randn(b, 3, h, w, generator=g), "source_label": label}
        teacher_out = SimpleNamespace(features={"fusion": [torch.zeros(b, 8, h // 32, w // 32)]})
        dsr.after_pseudo_labels(x, teacher_out, torch.zeros(b, h, w, dtype=torch.long))
        mixed = dsr.after_mix({"image": torch.zeros(b, 3, h, w), "events": torch.zeros(b, 3, h, w),
                               "label": torch.full((b, h, w), 255), "weight": torch.ones(b, h, w),
                               "target": torch.ones(b, h, w)})
        image, lbl = mixed["image"], mixed["label"]
        own = lbl[:, :32] == 12
        out_rank = {"pasted_own": bool(own.all()) and torch.equal(image[:, :, :32], x["source_image"][:, :, :32]),
                    "d_init": d_init}
        dida.bank_in.append((torch.randn(b, 8, h // 4, w // 4, generator=g), label))
        adv.source.append(torch.randn(b, 19, h // 4, w // 4, generator=g))
        adv.target.append((torch.randn(b, 19, h // 4, w // 4, generator=g), torch.ones(b, h // 4, w // 4)))
        for c in (dsr, dida, adv):
            c.finish()
        e = dsr.bank.entries[0]
        out_rank.update(tail=_digest(e["image"], e["events"], e["label"], e["mask"]), tail_n=e["mask"].shape[0],
                        bank=_digest(dida.bank.feats, dida.bank.filled),
                        filled=dida.bank.n_filled, disc=_digest(*adv.adversary.disc.parameters()),
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
