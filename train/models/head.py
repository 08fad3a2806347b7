"""DAFormer decode head: per-level linear embeddings, a depthwise-separable ASPP context fusion, a 1x1 classifier.

Submodule names follow mmcv/mmseg (``embed_layers.{i}.proj``, ``fuse_layer.aspp_modules.{k}``,
``depthwise_conv`` / ``pointwise_conv`` / ``bottleneck`` each with ``.conv`` + ``.bn``, ``conv_seg``) so a
DAFormer/CMDA checkpoint maps onto this head by a prefix rename only.

Dropout: CMDA's shared head applies ``Dropout2d(0.1)`` only on the way to the *image* output; the events,
fusion and ISR outputs call the classifier directly. :meth:`DAFormerHead.forward` therefore takes a
``dropout`` flag and :class:`train.models.fusion.CMDAModel` sets it for the image branch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train.models.mit import map_to_tokens, tokens_to_map


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule`` equivalent: conv without bias (BN follows), BatchNorm, ReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int, padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.activate = nn.ReLU(inplace=True)
        # mmcv's init: He-normal on fan-out for a ReLU conv, unit BN
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SepConvBNReLU(nn.Module):
    """Depthwise-separable 3x3 conv: dilated depthwise ConvBNReLU then pointwise ConvBNReLU."""

    def __init__(self, in_c: int, out_c: int, dilation: int):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_c, in_c, 3, padding=dilation, dilation=dilation, groups=in_c)
        self.pointwise_conv = ConvBNReLU(in_c, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPP(nn.Module):
    """ASPP without image pooling: a 1x1 branch, a separable 3x3 branch per dilation > 1, a 3x3 bottleneck."""

    def __init__(self, in_c: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_c, channels, 1) if d == 1 else SepConvBNReLU(in_c, channels, d) for d in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # The head's input is a channels-last view (its embeddings come from tokens), and oneDNN's
            # dilated depthwise conv is ~7x slower on a channels-last CPU tensor than on a contiguous one
            # (2.3 s vs 0.3 s per branch at 440x640, MiT-B0 head 256): one copy is far cheaper. Same values.
            x = x.contiguous()
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class LinearEmbed(nn.Module):
    """Per-pixel linear projection of one encoder level (SegFormer's 'MLP')."""

    def __init__(self, in_c: int, out_c: int):
        super().__init__()
        self.proj = nn.Linear(in_c, out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return tokens_to_map(self.proj(map_to_tokens(x)), h, w)


class DAFormerHead(nn.Module):
    """Embed the four levels to ``embed_dim``, upsample to level 0 (1/4), concat, SepASPP, classify.

    ``forward(features, dropout)`` returns logits ``[B, num_classes, H/4, W/4]``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 128, 320, 512),
        num_classes: int = 19,
        embed_dim: int = 256,
        channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.embed_layers = nn.ModuleList(LinearEmbed(c, embed_dim) for c in in_channels)
        self.fuse_layer = SepASPP(len(in_channels) * embed_dim, channels, dilations)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def decode(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 256-channel map before the classifier (1/4 resolution)."""
        size = features[0].shape[-2:]
        maps = []
        for i, (embed, f) in enumerate(zip(self.embed_layers, features, strict=True)):
            e = embed(f)
            if i > 0:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            maps.append(e)
        return self.fuse_layer(torch.cat(maps, dim=1))

    def forward(self, features: Sequence[torch.Tensor], dropout: bool = True, return_embedding: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with ``return_embedding`` also the 256-d map before dropout and classifier (DIDA's bank)."""
        emb = self.decode(features)
        x = self.dropout(emb) if dropout else emb
        logits = self.conv_seg(x)
        return (logits, emb) if return_embedding else logits
