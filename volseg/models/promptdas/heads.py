"""Output heads of Prompt-DAS: segmentation f_S, density f_R and the PCL projection φ."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``B×C×H×W`` map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MLP(nn.Module):
    """``layers`` linear layers with ReLU between them."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, layers: int) -> None:
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Upscaler(nn.Module):
    """``B×D×h×w`` → ``B×(D/8)×4h×4w`` with two transposed convolutions (shared by both heads)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SegmentationHead(nn.Module):
    """Mask token → hypernetwork vector; its dot product with the upscaled map gives logits at half the
    input resolution, upsampled ×2 to ``B×1×H×W``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hyper = MLP(dim, dim, dim // 8, 3)

    def forward(self, mask_token: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        weights = self.hyper(mask_token)  # B×(D/8)
        logits = torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)


class DensityHead(nn.Module):
    """Convs + GroupNorm on the upscaled map → a full-resolution ``B×1×H×W`` centre density."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim // 8, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
        )
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, upscaled: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.net(upscaled), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)
