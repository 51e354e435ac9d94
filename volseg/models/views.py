"""In-plane views of 2D images: quarter turns and a mirror, and where they move pixel coordinates.

One :class:`PlaneView` serves training (the geometric part of an augmentation,
:class:`volseg.training.augment.GeometricTransform`) and inference (test-time augmentation,
:class:`volseg.inference.predictor.TorchPredictor`), so an image and its points always move alike::

    image (… × Y × X) ──rot90 ×turns──▶ ──mirror x?──▶ view        undo: mirror x?, then rot90 ×(−turns)
    points (y, x), pixel centres at integers: the exact index maps of the same two steps
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PlaneView:
    """``turns`` quarter turns (``torch.rot90`` over the last two axes), then a mirror in x if ``mirrored``."""

    turns: int
    mirrored: bool

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (… × Y × X) as this view sees them (a new tensor, possibly strided: call
        ``.contiguous()`` before convolutions, which run several times slower on a turned, strided one)."""
        images = torch.rot90(images, self.turns, dims=(-2, -1))
        return torch.flip(images, dims=(-1,)) if self.mirrored else images

    def undo(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: maps of this view back in the original frame."""
        images = torch.flip(images, dims=(-1,)) if self.mirrored else images
        return torch.rot90(images, -self.turns, dims=(-2, -1)) if self.turns % 4 else images

    def points(self, points_yx: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
        """Where ``M×2`` pixel coordinates (y, x) of a ``Y×X`` image land in this view."""
        p = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2).copy()
        h, w = shape_yx
        for _ in range(self.turns % 4):  # rot90: out[i, j] = in[j, W-1-i]
            p = np.stack([w - 1 - p[:, 1], p[:, 0]], axis=1)
            h, w = w, h
        if self.mirrored:
            p[:, 1] = w - 1 - p[:, 1]
        return p


#: The views test-time augmentation averages, by count: none, the four quarter turns, and those mirrored.
VIEWS = {1: (PlaneView(0, False),), 4: tuple(PlaneView(k, False) for k in range(4)),
         8: tuple(PlaneView(k, m) for m in (False, True) for k in range(4))}
