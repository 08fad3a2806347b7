"""Where a run executes: one process or one per GPU under torchrun, and the process-wide torch flags."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from train.common.device import resolve_device
from train.config import TrainConfig


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_context(device: str) -> Context:
    """Single process, or one process per GPU under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Under torchrun even one process joins a process group (and trains through DDP), so a
    # `--nproc_per_node 1` run exercises NCCL exactly as a multi-GPU one does.
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local, dev)


@contextlib.contextmanager
def backend_flags(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """TF32 matmuls and cudnn.benchmark are process-wide torch state: set them from the settings for
    the run on CUDA, and put the previous values back when it ends (a caller's own choice survives)."""
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cudnn, "benchmark")
    old = [getattr(o, n) for o, n in flags]
    torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    try:
        yield
    finally:
        for (o, n), v in zip(flags, old, strict=True):
            setattr(o, n, v)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (one tiny all-reduce): ranks that stopped at
    different iterations would wait on each other's gradients forever."""
    t = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())
