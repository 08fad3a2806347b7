"""The CMDA model: an image MiT, an event MiT (which also encodes ISR), a fusion module, one DAFormer head.

Two fusion modules, chosen by ``CMDAModel(fusion=...)`` (``model.fusion``): :class:`AttentionAvgFusion`
(CMDA's DSEC image + events model) and :class:`AttentionFusion` (CMDA's image + ISR model for image-only
night targets such as Dark Zurich, where the second encoder's input is the night image's ISR).

Attribute names follow CMDA (``backbone_image``, ``backbone_events``, ``fusion_module``, ``decode_head``)
so its optimiser rule ("parameter names containing 'head' get lr x10") means the same thing here, and a
CMDA checkpoint maps onto this model by renames inside the head only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from train.models.head import DAFormerHead
from train.models.mit import Block, MixFFN, MixVisionTransformer, get_config, map_to_tokens, tokens_to_map
from train.models.weights import load_mit_pretrained

OUTPUTS = ("image", "events", "fusion", "isr")
"""The four heads' outputs, in a fixed order."""

FuseWith = Literal["events", "isr"]


@dataclass
class ModelOutput:
    """What :meth:`CMDAModel.forward` computed.

    ``logits[name]``: ``[B, num_classes, H/4, W/4]`` for each requested output (upsample in the loop).
    ``features[name]``: the four encoder maps ``[B, C_i, H/s_i, W/s_i]`` of every branch that ran:
    ``"image"``, ``"events"``, ``"isr"`` (event encoder on ISR) and ``"fusion"``;
    ``features[name][-1]`` is the deepest stage, ``[B, 512, H/32, W/32]`` for b1..b5.
    ``fused_with`` says which event-encoder branch fed the fusion (None when no fusion ran).
    ``embeddings[name]``: the head's ``[B, 256, H/4, W/4]`` map before its classifier, only for the outputs
    named in ``forward(embeddings=...)`` (DIDA's instance bank, train/uda/components/dida.py).
    """

    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    fused_with: str | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class AttentionAvgFusion(nn.Module):
    """Per stage, one MiT block on the image tokens and one on the event tokens, then their mean.

    ``blocks[2*i]`` processes image stage ``i`` and ``blocks[2*i+1]`` event stage ``i`` (CMDA's order).
    The blocks keep PyTorch's default initialisation, as CMDA's do (MiT's own init is not applied to them).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        num_heads: int = 1,
        mlp_ratio: int = 4,
        drop_path: float = 0.05,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(embed_dims[i // 2], num_heads, sr_ratios[i // 2], mlp_ratio, drop_path, qkv_bias=True)
            for i in range(2 * len(embed_dims))
        )

    def fuse_stage(self, i: int, image: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        """``(Block_img(image) + Block_evt(events)) / 2`` for stage ``i``, maps in, map out."""
        h, w = image.shape[-2:]
        x_i = self.blocks[2 * i](map_to_tokens(image), h, w)
        x_e = self.blocks[2 * i + 1](map_to_tokens(events), h, w)
        return tokens_to_map((x_i + x_e) / 2, h, w)

    def forward(self, image: Sequence[torch.Tensor], events: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fuse_stage(i, a, b) for i, (a, b) in enumerate(zip(image, events, strict=True))]


class AttentionFusion(nn.Module):
    """Per stage, one MiT block on concat(image, second input) of width 2C, then an Mlp 2C -> C -> C.

    CMDA's ``AttentionFusion`` (mmseg/models/fusion/attention_fusion.py), used by its Cityscapes -> Dark
    Zurich image + ISR model: the block (1 head, the stage's sr ratio, mlp ratio 4, drop path 0.05) lets
    every token attend across both modalities, and the Mlp (MiT's Mix-FFN: fc1 2C -> C, 3x3 depthwise conv,
    GELU, fc2 C -> C, no residual) brings the width back to the head's C. ``blocks[i]`` / ``mlps[i]`` are
    CMDA's ``basic_block.{i}`` / ``linear_block.{i}``; PyTorch's default initialisation, as CMDA's.
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        num_heads: int = 1,
        mlp_ratio: int = 4,
        drop_path: float = 0.05,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(2 * c, num_heads, sr, mlp_ratio, drop_path, qkv_bias=True) for c, sr in zip(embed_dims, sr_ratios,
                                                                                          strict=True))
        self.mlps = nn.ModuleList(MixFFN(2 * c, c, out=c) for c in embed_dims)

    def fuse_stage(self, i: int, image: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``Mlp(Block(concat(image, second)))`` for stage ``i``, maps in, map out."""
        h, w = image.shape[-2:]
        x = self.blocks[i](map_to_tokens(torch.cat((image, second), dim=1)), h, w)
        return tokens_to_map(self.mlps[i](x, h, w), h, w)

    def forward(self, image: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fuse_stage(i, a, b) for i, (a, b) in enumerate(zip(image, second, strict=True))]


FUSIONS: dict[str, type[nn.Module]] = {"attention_avg": AttentionAvgFusion, "attention": AttentionFusion}
"""``model.fusion`` -> fusion module class."""


def _resolve_outputs(
    outputs: Iterable[str] | None,
    image: torch.Tensor | None,
    events: torch.Tensor | None,
    isr: torch.Tensor | None,
    fuse_with: str,
) -> tuple[str, ...]:
    """Validate the requested outputs against the given inputs (None = everything the inputs allow)."""
    if fuse_with not in ("events", "isr"):
        raise ValueError(f"fuse_with must be 'events' or 'isr', not {fuse_with!r}")
    given = {"image": image is not None, "events": events is not None, "isr": isr is not None}
    given["fusion"] = given["image"] and given[fuse_with]
    if outputs is None:
        return tuple(o for o in OUTPUTS if given[o])
    wanted = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {OUTPUTS}")
    for o in wanted:
        if not given[o]:
            need = f"image and {fuse_with}" if o == "fusion" else o
            raise ValueError(f"output {o!r} needs the {need} input")
    return tuple(o for o in OUTPUTS if o in wanted)


def _paramwise_rule(name: str) -> tuple[bool, bool]:
    """(lr x10?, no weight decay?) for one parameter name, by mmcv's first-matching custom key."""
    if "pos_block" in name:
        return False, True
    if "head" in name:
        return True, False
    if "norm" in name:
        return False, True
    return False, False


class CMDAModel(nn.Module):
    """Two same-size MiT encoders, attention-average fusion, one shared DAFormer head, four outputs.

    Usage in the training loop::

        out = model(image=img, events=ev, isr=isr)                 # source pass: all four outputs
        out = teacher(image=img, isr=isr, fuse_with="isr", outputs=("fusion",))   # pseudo-labels
        loss = sum(segmentation_terms(out.logits, y, cfg.loss).values())  # train.uda.losses
        feat = out.features["fusion"][-1]                          # deepest stage, for feature losses

    Only the encoders needed by the requested outputs run: the fusion reuses the events/ISR features when
    those outputs are requested too, and the ISR goes through the *event* encoder (as in CMDA).
    """

    def __init__(
        self,
        backbone: str = "mit_b5",
        num_classes: int = 19,
        drop_path: float = 0.1,
        fusion_drop_path: float = 0.05,
        checkpoint: bool = False,
        event_chans: int = 3,
        head_channels: int = 256,
        fusion: str = "attention_avg",
    ):
        """``head_channels``: DAFormer's 256 by default; a CPU demo may shrink it (the separable ASPP
        at 1/4 resolution dominates a small MiT's compute). ``fusion``: a key of :data:`FUSIONS`.
        ``event_chans``: input channels of the event encoder (CMDA's 3; the image encoder takes RGB); the run's
        event representation sets it (train/data/events_input.py); the ISR it also encodes is repeated
        to as many channels."""
        super().__init__()
        cfg = get_config(backbone)
        self.backbone_name = cfg.name
        self.num_classes = num_classes
        self.backbone_image = MixVisionTransformer(cfg, 3, drop_path, checkpoint)
        self.backbone_events = MixVisionTransformer(cfg, event_chans, drop_path, checkpoint)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion
        self.fusion_module = FUSIONS[fusion](cfg.embed_dims, cfg.sr_ratios, drop_path=fusion_drop_path)
        self.decode_head = DAFormerHead(cfg.embed_dims, num_classes, embed_dim=head_channels, channels=head_channels)

    @property
    def checkpoint(self) -> bool:
        """Gradient checkpointing of the encoder blocks (settable)."""
        return self.backbone_image.checkpoint

    @checkpoint.setter
    def checkpoint(self, value: bool) -> None:
        self.backbone_image.checkpoint = self.backbone_events.checkpoint = bool(value)

    def forward(
        self,
        image: torch.Tensor | None = None,
        events: torch.Tensor | None = None,
        isr: torch.Tensor | None = None,
        fuse_with: FuseWith = "events",
        outputs: Iterable[str] | None = None,
        embeddings: Iterable[str] = (),
    ) -> ModelOutput:
        """Run the branches needed for ``outputs`` (default: every output the given inputs allow).

        Inputs are ``[B, 3, H, W]`` (events and ISR repeated to 3 channels). ``fuse_with`` picks the
        event-encoder input the fusion uses: ``"events"`` (source and mixed passes) or ``"isr"``.
        ``embeddings``: outputs whose decoder embedding is returned as well (no extra compute).
        Raises ValueError when a requested output lacks its input.
        """
        wanted = _resolve_outputs(outputs, image, events, isr, fuse_with)
        need_events = "events" in wanted or ("fusion" in wanted and fuse_with == "events")
        need_isr = "isr" in wanted or ("fusion" in wanted and fuse_with == "isr")
        feats: dict[str, list[torch.Tensor]] = {}
        if "image" in wanted or "fusion" in wanted:
            feats["image"] = self.backbone_image(image)
        if need_events:
            feats["events"] = self.backbone_events(events)
        if need_isr:
            feats["isr"] = self.backbone_events(isr)
        if "fusion" in wanted:
            feats["fusion"] = self.fusion_module(feats["image"], feats[fuse_with])
        # image output only goes through Dropout2d, as in CMDA's shared head
        want_emb = {embeddings} if isinstance(embeddings, str) else set(embeddings)
        logits, embs = {}, {}
        for o in wanted:
            if o in want_emb:
                logits[o], embs[o] = self.decode_head(feats[o], dropout=(o == "image"), return_embedding=True)
            else:
                logits[o] = self.decode_head(feats[o], dropout=(o == "image"))
        return ModelOutput(logits, feats, fuse_with if "fusion" in wanted else None, embs)

    def load_pretrained(self, mit_path: str | Path) -> None:
        """Load one official ImageNet ``mit_bX.pth`` into both encoders (InputError on any mismatch)."""

        load_mit_pretrained(self.backbone_image, mit_path)
        load_mit_pretrained(self.backbone_events, mit_path)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups following DAFormer/CMDA's ``paramwise_cfg``.

        mmcv matches custom keys as substrings of the full parameter name, longest key first and the
        first match wins: ``pos_block`` (decay x0), then ``head`` (lr x10), then ``norm`` (decay x0).
        Applied to this model that means:

        - ``decode_head.*`` -> lr x10 with weight decay, *including* its BatchNorm parameters (the
          'head' key matches before 'norm' could; mmcv names them ``bn`` anyway);
        - encoder and fusion parameters whose name contains ``norm`` (block norm1/norm2, attn.norm,
          patch-embed norm, stage norms) -> lr x1, no weight decay;
        - every other encoder and fusion parameter (biases included) -> lr x1 with weight decay.

        The fusion blocks are NOT head: CMDA's ``fusion_module`` name holds no 'head', so it trains at the
        backbone lr. Each group carries ``name`` and ``lr_mult`` so the scheduler can scale it; empty groups
        are omitted. Frozen parameters (requires_grad False) are left out.
        """
        groups: dict[str, dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_head, no_decay = _paramwise_rule(name)
            key = ("head" if is_head else "backbone") + ("_no_decay" if no_decay else "")
            if key not in groups:
                mult = 10.0 if is_head else 1.0
                groups[key] = {
                    "name": key,
                    "params": [],
                    "lr": lr * mult,
                    "lr_mult": mult,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            groups[key]["params"].append(p)
        order = ["backbone", "backbone_no_decay", "head", "head_no_decay"]
        return [groups[k] for k in order if k in groups]
