"""A small U-Net (2D or 3D) with a segmentation head and a centre-density head.

Trains in about a minute on a CPU, so the demo and tests can fit a real model from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from volseg.models.registry import InputContract, ModelSpec, register


def _conv_block(conv: type[nn.Module], cin: int, cout: int) -> nn.Sequential:
    groups = min(8, cout)
    return nn.Sequential(
        conv(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder of ``levels`` stages (width doubling, ×2 max-pool), mirrored decoder with skips.

    Input ``B×1×(Z×)Y×X`` with spatial sizes divisible by ``2**(levels-1)``; output
    ``(logits B×C×…, density B×1×…)`` at full resolution.
    """

    def __init__(self, num_classes: int = 1, dims: int = 2, width: int = 16, levels: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        widths = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_conv_block(conv, cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w_high in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.up.append(up(w_low, w_high, 2, stride=2))
            self.merge.append(_conv_block(conv, 2 * w_high, w_high))
        self.logits = conv(widths[0], num_classes, 1)
        self.density = conv(widths[0], 1, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        x = image
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        for upsample, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([upsample(x), skip], dim=1))
        return self.logits(x), self.density(x)


def _contract(spec: ModelSpec) -> InputContract:
    levels = int(spec.options.get("levels", 3))
    return InputContract(dims=int(spec.options.get("dims", 2)), size_multiple=2 ** (levels - 1))


register("unet", UNet, _contract, "small U-Net with segmentation and density heads (CPU-trainable)")
