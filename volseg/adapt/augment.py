"""Augmentations applied identically to images and their targets (torch, B×C×Y×X)."""

from __future__ import annotations

import torch


def flip_rotate(generator: torch.Generator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random flip and 90° rotation (in the y, x plane) applied to every tensor."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return tuple(out)


def intensity_jitter(generator: torch.Generator, image: torch.Tensor, strength: float = 0.1) -> torch.Tensor:
    """Random per-sample brightness/contrast change and Gaussian noise on a standardised image."""
    b = image.shape[0]
    shape = (b,) + (1,) * (image.dim() - 1)
    contrast = 1 + strength * (2 * torch.rand(shape, generator=generator) - 1)
    brightness = strength * (2 * torch.rand(shape, generator=generator) - 1)
    noise = strength * torch.randn(image.shape, generator=generator)
    return image * contrast + brightness + noise
