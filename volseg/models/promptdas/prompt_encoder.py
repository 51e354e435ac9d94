"""Prompt encoder f_P: random-Fourier positional encodings of points and of the image grid."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierPositions(nn.Module):
    """Encodes (y, x) positions normalised to [0, 1] as ``[sin, cos]`` of a fixed random projection.

    The projection is a ``2×(D/2)`` Gaussian matrix (a buffer, saved with the model), so encodings are
    smooth in position and equal for equal positions, whatever the image size.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def forward(self, yx01: torch.Tensor) -> torch.Tensor:
        """``…×2`` positions in [0, 1] → ``…×D`` encodings."""
        projected = (2 * yx01 - 1).to(self.gaussian.dtype) @ self.gaussian * (2 * math.pi)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


class PromptEncoder(nn.Module):
    """Point prompts → tokens; the image grid → a dense positional encoding.

    Points are ``B×N×2`` pixel coordinates (y, x) in the input image with a ``B×N`` validity mask;
    a batch with no valid point is the unprompted (UDA) mode. All points are positive (no label
    embedding); one learned embedding marks a token as a point prompt.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.positions = FourierPositions(dim)
        self.point_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.point_embedding, std=0.02)

    def encode_points(self, points_yx: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``B×N×2`` pixel (y, x) → ``B×N×D`` tokens (pixel centres, normalised by the image size)."""
        size = torch.tensor(image_size, dtype=torch.float32, device=points_yx.device)
        return self.positions((points_yx.float() + 0.5) / size) + self.point_embedding

    def dense(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``1×D×h×w`` encoding of the centres of an ``h×w`` token grid."""
        h, w = grid
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yx = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
        return self.positions(yx).permute(2, 0, 1).unsqueeze(0)
