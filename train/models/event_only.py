"""The event-only model of DSEC-Semantic runs: one MiT on an event window, the DAFormer head, one output.

ESS and the event-only line of work segment from events alone (no image branch, no fusion). This model is
CMDA's event branch on its own: ``backbone_events`` (a MiT whose first patch embedding takes the window's
``chunks x bins`` channels) and ``decode_head``, the attribute names of :class:`train.models.CMDAModel`, so
the optimiser rule ("names containing 'head' get lr x10") and the checkpoint keys mean the same thing. It
answers the same call as CMDAModel (``model(events=..., outputs=("events",))``) and has only the
``"events"`` output.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from train.models.fusion import CMDAModel, ModelOutput
from train.models.head import DAFormerHead
from train.models.mit import MixVisionTransformer, get_config
from train.models.weights import MIT_IGNORED_KEYS, check_state_dict, read_state_dict

OUTPUT = "events"
FIRST_CONV = "patch_embed1.proj.weight"


def widen_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """ImageNet's RGB patch embedding ``[C, 3, k, k]`` -> ``[C, channels, k, k]``: the mean over RGB in every
    input channel, scaled by 3 / channels so a constant input gives the response it gave on RGB."""
    if weight.shape[1] == channels:
        return weight
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1) * (3.0 / channels)


def input_channels(state: dict[str, torch.Tensor]) -> int | None:
    """The event input's channel count an event-only state dict was trained with (None: not one)."""
    w = state.get(f"backbone_events.{FIRST_CONV}")
    return None if w is None or "backbone_image.patch_embed1.proj.weight" in state else int(w.shape[1])


class EventOnlyModel(nn.Module):
    """MiT on the event window + DAFormer head; ``forward`` returns the ``"events"`` logits only."""

    def __init__(self, backbone: str = "mit_b5", num_classes: int = 11, in_chans: int = 10, drop_path: float = 0.1,
                 checkpoint: bool = False, head_channels: int = 256):
        super().__init__()
        cfg = get_config(backbone)
        self.backbone_name = cfg.name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.backbone_events = MixVisionTransformer(cfg, in_chans, drop_path, checkpoint)
        self.decode_head = DAFormerHead(cfg.embed_dims, num_classes, embed_dim=head_channels, channels=head_channels)

    @property
    def checkpoint(self) -> bool:
        return self.backbone_events.checkpoint

    @checkpoint.setter
    def checkpoint(self, value: bool) -> None:
        self.backbone_events.checkpoint = bool(value)

    def forward(self, image: torch.Tensor | None = None, events: torch.Tensor | None = None,
                isr: torch.Tensor | None = None, fuse_with: str = "events", outputs: Iterable[str] | None = None,
                embeddings: Iterable[str] = ()) -> ModelOutput:
        """``events`` ``[B, in_chans, H, W]`` -> logits ``[B, num_classes, H/4, W/4]`` under ``"events"``.

        ``image`` and ``isr`` must be None (there is no branch for them); asking for another output is a
        ValueError, as CMDAModel answers a request it cannot serve."""
        wanted = (OUTPUT,) if outputs is None else ((outputs,) if isinstance(outputs, str) else tuple(outputs))
        if image is not None or isr is not None or wanted != (OUTPUT,):
            raise ValueError(f"an event-only model has the events input and the {OUTPUT!r} output only "
                             f"(asked for {wanted}, image {'given' if image is not None else 'none'})")
        if events is None:
            raise ValueError("output 'events' needs the events input")
        feats = {OUTPUT: self.backbone_events(events)}
        want_emb = {embeddings} if isinstance(embeddings, str) else set(embeddings)
        if OUTPUT in want_emb:
            logits, emb = self.decode_head(feats[OUTPUT], dropout=False, return_embedding=True)
            return ModelOutput({OUTPUT: logits}, feats, None, {OUTPUT: emb})
        return ModelOutput({OUTPUT: self.decode_head(feats[OUTPUT], dropout=False)}, feats, None, {})

    def load_pretrained(self, mit_path: str | Path) -> None:
        """An official ImageNet ``mit_bX.pth`` into the encoder, its RGB patch embedding widened to the window's
        channels (:func:`widen_first_conv`); any other mismatch is an InputError naming the file."""
        state = dict(read_state_dict(mit_path))
        if FIRST_CONV in state:
            state[FIRST_CONV] = widen_first_conv(state[FIRST_CONV], self.in_chans)
        check_state_dict(mit_path, state, self.backbone_events, self.backbone_name, MIT_IGNORED_KEYS)
        self.backbone_events.load_state_dict({k: v for k, v in state.items() if k not in MIT_IGNORED_KEYS})

    param_groups = CMDAModel.param_groups  # DAFormer/CMDA's paramwise rule, on this model's parameter names
