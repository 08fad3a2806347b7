"""CycleGAN ResNet generator (9 residual blocks, 64 filters, instance norm), used frozen for source "events".

CMDA turns the Cityscapes motion image IC1 into night-event-like input with a generator trained
IC1 -> DSEC night events (``cityscapes_ICD_to_dsec_EN.pth``). The layer indices of ``self.model`` match
that file's ``model.N`` keys exactly; instance norm has no affine parameters and no running statistics,
so it contributes no keys.
"""

from __future__ import annotations

import torch
from torch import nn


class ResnetBlock(nn.Module):
    """Two reflection-padded 3x3 convs with instance norm and a skip connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """7x7 stem, two stride-2 downsamplings, ``n_blocks`` residual blocks, two upsamplings, 7x7 out, tanh.

    Output has the input's size when H and W are multiples of 4; values in [-1, 1].
    """

    def __init__(self, input_nc: int = 1, output_nc: int = 1, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=True),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsample
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=True), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):  # upsample
            c = ngf * 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(c // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@torch.no_grad()
def ic1_to_events(gen: nn.Module, ic1: torch.Tensor) -> torch.Tensor:
    """Map IC1 ``[B, 3, H, W]`` in [-1, 1] to event-like input ``[B, 3, H, W]`` in [-1, 1], as CMDA does.

    The channel mean (IC1 is grey, repeated) goes through the generator and the 1-channel result is
    repeated to 3 channels; no rescaling on either side (both ends live in [-1, 1]). No gradient: the
    generator is a frozen data transform.
    """
    grey = ic1.mean(dim=1, keepdim=True)
    param = next(gen.parameters(), None)
    if param is not None:
        grey = grey.to(param.dtype)
    return gen(grey).to(ic1.dtype).repeat(1, 3, 1, 1)
