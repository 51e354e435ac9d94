"""A tiny fully-convolutional network with no downsampling: fast, and its receptive field is exact
(``1 + 2·depth·(kernel//2)`` voxels), which makes it the reference model of the blockwise tests."""

from __future__ import annotations

import torch
from torch import nn

from volseg.models.registry import InputContract, register


class ConvNet(nn.Module):
    """``depth`` conv+tanh layers, then 1×1 heads for class logits and density.

    Input ``B×1×(Z×)Y×X``; output ``(B×C×…, B×1×…)`` at the input's resolution.
    """

    def __init__(self, num_classes: int = 1, dims: int = 2, width: int = 8, depth: int = 3,
                 kernel: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(depth):
            layers += [conv(channels, width, kernel, padding=kernel // 2), nn.Tanh()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.logits = conv(width, num_classes, 1)
        self.density = conv(width, 1, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(image)
        return self.logits(features), self.density(features)


register(
    "convnet",
    ConvNet,
    lambda spec: InputContract(dims=int(spec.options.get("dims", 2))),
    "tiny conv stack without downsampling (tests, debugging)",
)
