"""The few collectives the peer components need under torchrun (DDP); each is the identity in one process.

DDP keeps the student's replicas equal by averaging gradients. The peer components keep state of
their own (train/uda/components/): a tail-class bank, an instance bank, a discriminator and its optimiser.
To give every rank the same state, and so a checkpoint written by rank 0 that resumes every rank,
they see the global batch (:func:`gather`), take rank 0's result where a step draws random numbers
(:func:`broadcast_`, the ranks' generators differ), and average the discriminator's gradients
(:func:`average_gradients`) as DDP does the student's.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order (equal shapes on all ranks)."""
    _, n = world()
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_(*tensors: torch.Tensor) -> None:
    """Overwrite each tensor (in place) with rank 0's."""
    if world()[1] == 1:
        return
    for t in tensors:
        tdist.broadcast(t, src=0)


def average_gradients(module: nn.Module) -> None:
    """Replace each parameter's gradient by its mean over the ranks (before the optimiser step)."""
    _, n = world()
    if n == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= n
