"""Output-space adversarial training with a light discriminator (a BiSeNet real-time DA project, ``adv.*``).

From the real-time domain-adaptation project (Montressori, Rosini, Vanderputten; micolrosini/
Real-Time-Domain-Adaptation-in-Image-Segmentation): AdaptSegNet's output-space discriminator with each
4x4 stride-2 convolution split into a depthwise 4x4 and a pointwise 1x1 (no biases). For 19 classes and
64 base channels that is 189,424 parameters against 2,781,121 for the standard one (ratio ~15). It sees
softmax maps, the segmentation network learns to make target maps look like source maps
(``lambda_adv = 1e-3``), and the discriminator has its own Adam optimiser (lr 1e-4, betas 0.9/0.99,
poly decay 0.9 as the segmentation lr in that project).

Which "target" prediction cmda feeds it (``adv.input``): the CMDA loop has no student pass on the plain
target image, so by default (``"mixed"``) the discriminator sees the student's *mixed* fusion output,
its BCE weighted per pixel by the target-pixel map (1 - ClassMix mask): no extra forward pass. ``"target"``
asks the loop for an extra student fusion pass on the target image + events (the project's setting,
at the cost of one more forward/backward). The discriminator sees the head's 1/4-resolution logits
(``adv.upsample = 1``; 32 px of logits, i.e. crops >= 128, are needed by its five stride-2 blocks); the
project feeds full-resolution outputs, ``adv.upsample = 4``, at 16x the discriminator's FLOPs.

In the step, :class:`OutputDiscriminator` (below) implements the component hooks
(:mod:`train.uda.components.base`): ``adv/generator`` on the mixed pass's target pixels (``input=mixed``) or
on a student pass of its own on the target image (``extra_pass``, ``input=target``), and one discriminator
step per iteration in ``finish``, on the whole batch, after the segmentation network's gradients are
complete. The generator term sends gradient to the segmentation network only; the discriminator step takes
detached inputs and steps only its own optimiser. Its state (weights, optimiser) is saved under
``"adversary"``; under DDP the ranks average the discriminator's gradients
(:func:`train.common.collective.average_gradients`) as DDP does the student's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from train.common.collective import average_gradients, broadcast_
from train.common.device import autocast
from train.config import AdvConfig
from train.uda.components.base import Component, Tensors
from train.uda.losses import backward_scaled

SOURCE, TARGET = 0.0, 1.0  # discriminator labels, as in the project


class LightDiscriminator(nn.Module):
    """Five stride-2 blocks of depthwise 4x4 + pointwise 1x1 (no bias), LeakyReLU(0.2) between, one logit
    per 32x32 patch; ``forward`` returns that map upsampled to the input size (bilinear)."""

    def __init__(self, num_classes: int = 19, ndf: int = 64):
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, a, 4, stride=2, padding=1, groups=a, bias=False),
                          nn.Conv2d(a, b, 1, bias=False))
            for a, b in itertools.pairwise(chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.leaky_relu(x, 0.2)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class StandardDiscriminator(nn.Module):
    """AdaptSegNet's fully convolutional discriminator (4x4 stride-2 convolutions with biases)."""

    def __init__(self, num_classes: int = 19, ndf: int = 64):
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1)
                                   for a, b in itertools.pairwise(chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, 0.2)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bce(d_out: torch.Tensor, label: float, weight: torch.Tensor | None) -> torch.Tensor:
    """BCE-with-logits against a constant label; per-pixel ``weight`` [B, H, W] resized to ``d_out``."""
    target = torch.full_like(d_out, label)
    if weight is None:
        return F.binary_cross_entropy_with_logits(d_out, target)
    w = weight[:, None].float()
    if w.shape[-2:] != d_out.shape[-2:]:
        w = F.interpolate(w, size=d_out.shape[-2:], mode="nearest")
    return F.binary_cross_entropy_with_logits(d_out, target, weight=w.expand_as(d_out))


class Adversary:
    """The discriminator, its optimiser and the two loss sides. Works in fp32 on softmax maps."""

    def __init__(self, cfg: AdvConfig, num_classes: int = 19, device: torch.device | str | None = None):
        self.cfg = cfg
        cls = LightDiscriminator if cfg.light else StandardDiscriminator
        self.disc = cls(num_classes, cfg.ndf).to(device)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))

    def _d(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        if self.cfg.upsample != 1:
            x = F.interpolate(x, scale_factor=self.cfg.upsample, mode="bilinear", align_corners=False)
        return self.disc(torch.softmax(x, dim=1))

    def generator_terms(self, target_logits: torch.Tensor, weight: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
        """``{"adv/generator": w x BCE(D(softmax(target)), SOURCE)}``: gradient to the segmentation
        network through ``target_logits`` only (D's parameters are frozen while the graph is built)."""
        if not self.cfg.enabled:
            return {}
        flags = [p.requires_grad for p in self.disc.parameters()]
        self.disc.requires_grad_(False)
        try:
            loss = _bce(self._d(target_logits), SOURCE, weight)
        finally:
            for p, f in zip(self.disc.parameters(), flags, strict=True):
                p.requires_grad_(f)
        return {"adv/generator": self.cfg.weight * loss}

    def discriminator_loss(self, source_logits: torch.Tensor, target_logits: torch.Tensor,
                           target_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Halves of D's loss on detached inputs: source maps labelled SOURCE, target maps TARGET."""
        return {"adv/d_source": _bce(self._d(source_logits.detach()), SOURCE, None) / 2,
                "adv/d_target": _bce(self._d(target_logits.detach()), TARGET, target_weight) / 2}

    def discriminator_step(self, source_logits: torch.Tensor, target_logits: torch.Tensor,
                           target_weight: torch.Tensor | None = None,
                           reduce_grads: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
        """Backward D's loss, step D's optimiser, zero its gradients; returns the halves as floats.

        ``reduce_grads(disc)`` runs between backward and step (under DDP: the ranks' mean)."""
        terms = self.discriminator_loss(source_logits, target_logits, target_weight)
        sum(terms.values()).backward()
        if reduce_grads is not None:
            reduce_grads(self.disc)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in terms.items()}

    def set_lr(self, iteration: int, iters: int) -> float:
        """Poly decay ``lr x (1 - it/iters)^power`` (the project's schedule for both networks)."""
        lr = self.cfg.lr * (1 - iteration / max(iters, 1)) ** self.cfg.power
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])


# ---------------------------------------------------------------------- the component in the step
class OutputDiscriminator(Component):
    """The light discriminator in the step (``adversary``): ``adv/generator`` on the mixed pass's target
    pixels (``adv.input=mixed``) or on a student pass of its own on the target image (``target``), and
    one discriminator step per iteration on the whole batch (the ranks' mean gradient under DDP)."""

    state_key = "adversary"

    def __init__(self, cfg: AdvConfig, num_classes: int, device: torch.device, amp: bool, iters: int) -> None:
        self.cfg, self.amp, self.iters = cfg, amp, iters
        self.adversary = Adversary(cfg, num_classes, device)
        broadcast_(*self.adversary.disc.parameters())  # DDP: every rank starts from rank 0's D

    def start(self, it: int) -> None:
        self.it = it
        self.source: list[torch.Tensor] = []
        self.target: list[tuple[torch.Tensor, torch.Tensor]] = []

    def source_terms(self, out, x: Tensors, part: slice) -> Tensors:
        self.source.append(out.logits["fusion"].detach())
        return {}

    def mixed_terms(self, out, m: Tensors, part: slice) -> Tensors:
        if self.cfg.input != "mixed":
            return {}
        self.target.append((out.logits["fusion"].detach(), m["target"]))
        return self.adversary.generator_terms(out.logits["fusion"], m["target"])

    def extra_pass(self, student: nn.Module, x: Tensors, part: slice, scale: float) -> Tensors:
        """``adv.input=target``: the student's fusion output on the target image + events (the real-time
        project's target prediction), ``adv/generator`` on all its pixels, backpropagated here."""
        if self.cfg.input != "target":
            return {}
        img = x["target_image"]
        with autocast(img.device, self.amp):
            logits = student(image=img, events=x["target_events"], outputs=("fusion",)).logits["fusion"]
        terms = backward_scaled(self.adversary.generator_terms(logits), scale)
        self.target.append((logits.detach(), torch.ones_like(logits[:, 0], dtype=torch.float32)))
        return terms

    def finish(self) -> dict[str, float]:
        if not self.target:
            return {}
        tgt, w = (torch.cat(t) for t in zip(*self.target, strict=True))
        out = {"adv/lr": self.adversary.set_lr(self.it, self.iters)}
        out.update(self.adversary.discriminator_step(torch.cat(self.source), tgt, w, reduce_grads=average_gradients))
        return out

    def state_dict(self) -> dict:
        return self.adversary.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.adversary.load_state_dict(state)


def build(cfg, run) -> OutputDiscriminator | None:
    if not cfg.adv.enabled:
        return None
    return OutputDiscriminator(cfg.adv, cfg.model.num_classes, run.device, run.amp, cfg.run.iters)
