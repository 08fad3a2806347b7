"""Mix Transformer (MiT) encoder, the SegFormer backbone, in plain PyTorch.

Module and parameter names follow the original SegFormer key layout (``patch_embed1.proj``,
``block1.0.attn.q``, ``attn.kv``, ``attn.sr``, ``attn.norm``, ``mlp.dwconv.dwconv``, ``norm1..4``) so the
official ImageNet files ``mit_b0.pth`` .. ``mit_b5.pth`` load without any renaming.

LayerNorm eps follows the original too, and it is not uniform: the per-block norms and the four stage
norms use 1e-6, while the patch-embedding norm and the spatial-reduction norm inside attention were built
with PyTorch's default 1e-5. Matching this matters for bit-level parity with the released weights.

Performance notes (why the code looks the way it does):
- attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
- token <-> map conversions are ``permute`` + ``reshape`` views of a channels-last layout, so a
  channels_last input and the convolutions (patch embeds, sr, depthwise) never force NCHW copies;
- there is no data-dependent Python control flow, so ``torch.compile`` traces a block once per shape;
- ``checkpoint=True`` recomputes each block in backward (``torch.utils.checkpoint``), trading ~30%
  more compute for a much smaller activation footprint (MiT-B5 at 512x512 with batch 2+2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

BLOCK_NORM_EPS = 1e-6  # norm1/norm2 of every block and the stage norms norm1..norm4
DEFAULT_NORM_EPS = 1e-5  # patch_embed*.norm and attn.norm (built with nn.LayerNorm's default)


@dataclass(frozen=True)
class MiTConfig:
    """Sizes of one MiT variant. Heads, sr ratios and mlp ratio are the same for b0..b5."""

    name: str
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
MIT_CONFIGS: dict[str, MiTConfig] = {
    "mit_b0": MiTConfig("mit_b0", (32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTConfig("mit_b1", _WIDE, (2, 2, 2, 2)),
    "mit_b2": MiTConfig("mit_b2", _WIDE, (3, 4, 6, 3)),
    "mit_b3": MiTConfig("mit_b3", _WIDE, (3, 4, 18, 3)),
    "mit_b4": MiTConfig("mit_b4", _WIDE, (3, 8, 27, 3)),
    "mit_b5": MiTConfig("mit_b5", _WIDE, (3, 6, 40, 3)),
}


def get_config(name: str) -> MiTConfig:
    """Look up ``mit_b0`` .. ``mit_b5`` (also accepts ``b0`` .. ``b5``)."""
    key = name if name.startswith("mit_") else f"mit_{name}"
    if key not in MIT_CONFIGS:
        raise ValueError(f"unknown MiT variant {name!r}; choose one of {sorted(MIT_CONFIGS)}")
    return MIT_CONFIGS[key]


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H*W, C] tokens -> [B, C, H, W] map (a channels-last view, no copy)."""
    return x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] map -> [B, H*W, C] tokens (free for channels-last maps, one copy otherwise)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path` so ``model.eval()`` switches it off (the EMA teacher relies on it)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (7/4/3 for stage 1, 3/2/1 after), then LayerNorm on tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=DEFAULT_NORM_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(map_to_tokens(x)), h, w


class Attention(nn.Module):
    """Efficient self-attention: keys/values come from a map shrunk by a strided conv (``sr``) when sr > 1."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # rows [:dim] = key, [dim:] = value
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=DEFAULT_NORM_EPS)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        src = self.norm(map_to_tokens(self.sr(tokens_to_map(x, h, w)))) if self.sr_ratio > 1 else x
        kv = self.kv(src).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale = head_dim ** -0.5, as the original
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """3x3 depthwise conv on the token map: the 'Mix' in Mix-FFN, which replaces position embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, h, w)))


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 -> GELU -> fc2 (``out`` channels, default ``dim``: MiT's own Mlp can narrow,
    which CMDA's AttentionFusion uses for its 2C -> C -> C projection)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def init_mit_weights(module: nn.Module) -> None:
    """SegFormer's from-scratch init: trunc-normal(0.02) linears, unit LayerNorms, He-normal (fan-out) convs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MixVisionTransformer(nn.Module):
    """MiT encoder: four stages of (overlapping patch embed -> blocks -> LayerNorm).

    ``forward(x)`` returns the four stage maps ``[B, C_i, H/s_i, W/s_i]`` with strides 4, 8, 16, 32
    (ceil-divided for sizes that are not multiples of 32, as the convolutions give).
    """

    def __init__(
        self,
        config: MiTConfig | str = "mit_b5",
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
        checkpoint: bool = False,
    ):
        super().__init__()
        cfg = get_config(config) if isinstance(config, str) else config
        self.config = cfg
        self.embed_dims = cfg.embed_dims
        self.checkpoint = checkpoint
        # stochastic depth grows linearly from 0 over all blocks of all stages
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # also under a meta device
        start = 0
        for s in range(4):
            in_c = in_chans if s == 0 else cfg.embed_dims[s - 1]
            patch, stride = (7, 4) if s == 0 else (3, 2)
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(in_c, cfg.embed_dims[s], patch, stride))
            blocks = [
                Block(cfg.embed_dims[s], cfg.num_heads[s], cfg.sr_ratios[s], cfg.mlp_ratio, rates[start + j])
                for j in range(cfg.depths[s])
            ]
            setattr(self, f"block{s + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{s + 1}", nn.LayerNorm(cfg.embed_dims[s], eps=BLOCK_NORM_EPS))
            start += cfg.depths[s]
        init_mit_weights(self)

    def stage(self, s: int) -> tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]:
        """The (patch embed, blocks, norm) of stage ``s`` in 0..3."""
        return getattr(self, f"patch_embed{s + 1}"), getattr(self, f"block{s + 1}"), getattr(self, f"norm{s + 1}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        use_ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        for s in range(4):
            embed, blocks, norm = self.stage(s)
            x, h, w = embed(x)
            for blk in blocks:
                x = _checkpoint(blk, x, h, w, use_reentrant=False) if use_ckpt else blk(x, h, w)
            x = tokens_to_map(norm(x), h, w)
            outs.append(x)
        return outs


def mit(name: str = "mit_b5", **kwargs) -> MixVisionTransformer:
    """Build ``mit_b0`` .. ``mit_b5`` (kwargs go to :class:`MixVisionTransformer`)."""
    return MixVisionTransformer(get_config(name), **kwargs)
