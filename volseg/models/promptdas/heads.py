"""Output heads of Prompt-DAS: segmentation f_S, density f_R and the PCL projection φ, on one of three
upscalers of the decoder's stride-8 image embedding:

* ``paper`` (:class:`Upscaler`): two transposed convolutions to stride 2; the segmentation logits and
  the density are interpolated ×2 to the input resolution (the published head);
* ``fine`` (:class:`FineUpscaler`): three transposed convolutions to full resolution, adding the
  encoder's stride-4 and stride-2 features and a full-resolution view of the image on the way (as
  SAM 2 and HQ-SAM fuse early encoder features into their mask features), so boundaries and small
  organelles are predicted from pixels, not from stride-8 tokens::

      embedding D×h/8 ─▶ ×2 ─(+ s4 features)─▶ ×2 ─(+ s2 features)─▶ ×2 ─(+ image conv)─▶ D/8×H×W

* ``unet`` (:class:`UNetUpscaler`): the decoder half of MONAI's BasicUNet on the embedding and the
  ``unet`` encoder's stride-4, stride-2 and full-resolution levels: at each level a transposed
  convolution ×2, the encoder's level concatenated, then two 3×3 convolutions (InstanceNorm, LeakyReLU),
  so the organelle the stride-8 embedding finds is drawn out to the membranes the fine levels see::

      embedding D×h/8 ─▶ ×2 ⧺ s4 ─▶ 2 conv ─▶ ×2 ⧺ s2 ─▶ 2 conv ─▶ ×2 ⧺ s1 ─▶ 2 conv ─▶ D/8×H×W
"""

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


class FineUpscaler(nn.Module):
    """``B×D×h×w`` (stride 8) → ``B×(D/8)×8h×8w`` (full resolution), fusing the stride-4 and stride-2
    encoder features (``fine_channels``: their channels) and the image itself (see the module docstring)."""

    def __init__(self, dim: int, fine_channels: tuple[int, int]) -> None:
        super().__init__()
        c2, c4 = fine_channels
        d4, d8 = dim // 4, dim // 8
        self.up4 = nn.ConvTranspose2d(dim, d4, 2, stride=2)
        self.skip4 = nn.Conv2d(c4, d4, 1)
        self.norm4 = LayerNorm2d(d4)
        self.up2 = nn.ConvTranspose2d(d4, d8, 2, stride=2)
        self.skip2 = nn.Conv2d(c2, d8, 1)
        self.norm2 = LayerNorm2d(d8)
        self.up1 = nn.ConvTranspose2d(d8, d8, 2, stride=2)
        self.skip1 = nn.Conv2d(1, d8, 3, padding=1)
        # no bias before the GroupNorm: it would be removed by it (its gradient is 0, so Adam would only
        # turn rounding into updates)
        self.refine = nn.Sequential(nn.Conv2d(d8, d8, 3, padding=1, bias=False), nn.GroupNorm(min(8, d8), d8),
                                    nn.GELU())

    def forward(self, x: torch.Tensor, s4: torch.Tensor, s2: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm4(self.up4(x) + self.skip4(s4)))
        x = F.gelu(self.norm2(self.up2(x) + self.skip2(s2)))
        x = F.gelu(self.up1(x) + self.skip1(image - 0.5))
        return x + self.refine(x)


class UNetUpscaler(nn.Module):
    """``B×D×h×w`` (stride 8) → ``B×(D/8)×8h×8w`` through three of MONAI's ``UpCat`` blocks, with the
    encoder's stride-4 (``fine_channels[1]``), stride-2 (``fine_channels[0]``) and full-resolution
    (``full_channels``) levels (see the module docstring)."""

    def __init__(self, dim: int, fine_channels: tuple[int, int], full_channels: int) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import UpCat  # MONAI takes seconds to import

        from volseg.models.promptdas.encoders import UNET_ACT, UNET_NORM

        c2, c4 = fine_channels
        self.up4 = UpCat(2, dim, c4, c4, UNET_ACT, UNET_NORM, True, 0.0, "deconv")
        self.up2 = UpCat(2, c4, c2, c2, UNET_ACT, UNET_NORM, True, 0.0, "deconv")
        self.up1 = UpCat(2, c2, full_channels, dim // 8, UNET_ACT, UNET_NORM, True, 0.0, "deconv")

    def forward(self, x: torch.Tensor, s4: torch.Tensor, s2: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        return self.up1(self.up2(self.up4(x, s4), s2), s1)


class SegmentationHead(nn.Module):
    """Mask token → hypernetwork vector; its dot product with the upscaled map gives logits, upsampled
    ×``scale`` (2 on the paper's half-resolution map, 1 on the fine one) to ``B×1×H×W``."""

    def __init__(self, dim: int, scale: int = 2) -> None:
        super().__init__()
        self.hyper = MLP(dim, dim, dim // 8, 3)
        self.scale = scale

    def forward(self, mask_token: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        weights = self.hyper(mask_token)  # B×(D/8)
        logits = torch.einsum("bc,bchw->bhw", weights, upscaled).unsqueeze(1)
        if self.scale == 1:
            return logits
        return F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)


class DensityHead(nn.Module):
    """Convs + GroupNorm on the upscaled map → a full-resolution ``B×1×H×W`` centre density (upsampled
    ×``scale`` before its last layer)."""

    def __init__(self, dim: int, width: int = 32, scale: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim // 8, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
        )
        self.out = nn.Conv2d(width, 1, 1)
        self.scale = scale

    def forward(self, upscaled: torch.Tensor) -> torch.Tensor:
        x = self.net(upscaled)
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.out(x)
