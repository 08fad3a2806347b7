"""Running the real training step (:func:`train.uda.step.iteration`) in tests, gradients kept."""

from __future__ import annotations

import torch

from train.uda.method import Method, build_method
from train.uda.step import Networks, iteration


class GradRecorder(torch.optim.SGD):
    """An optimiser whose step records the gradients instead of changing the weights."""

    def __init__(self, params) -> None:
        super().__init__(list(params), lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None) -> None:
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]


def step_grads(cfg, model, teacher, batch, *, it: int = 0, method: Method | None = None, seed: int = 123,
               gan=None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """One iteration of the real step on ``batch``: the student's gradients, the terms and the metrics."""
    method = method or build_method(cfg, torch.device("cpu"), gan, None)
    opt = GradRecorder(model.parameters())
    model.zero_grad(set_to_none=True)
    terms, metrics = iteration(cfg, method, Networks(model, model, teacher, opt), batch, it, seed)
    return opt.grads, terms, metrics
