"""Learning-rate schedule and EMA teacher update: small formulas, kept pure so they are tested alone."""

from __future__ import annotations

import torch
from torch import nn

from train.config import OptimConfig


def learning_rate(it: int, max_iters: int, cfg: OptimConfig) -> float:
    """Base lr at iteration ``it``: linear warmup from ``lr * warmup_ratio``, then poly decay.

    The mmcv formulation DAFormer/CMDA train with: the poly value is computed for every iteration
    (``(lr - min_lr) (1 - it/max)^power + min_lr``) and, during warmup, scaled by
    ``1 - (1 - it/warmup) (1 - warmup_ratio)``.
    """
    regular = (cfg.lr - cfg.min_lr) * (1 - it / max_iters) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)


def ema_alpha(it: int, alpha_max: float) -> float:
    """Teacher momentum: ``min(1 - 1/(it+1), alpha_max)`` (so it starts as a copy, then slows)."""
    return min(1 - 1 / (it + 1), alpha_max)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher = alpha * teacher + (1 - alpha) * student`` over parameters (buffers stay the teacher's)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1 - alpha)
