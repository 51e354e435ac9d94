"""Smooth blending weights for overlapping windows.

Each window's prediction is multiplied by a weight that is high in the window's centre and falls
smoothly towards its faces (where a model sees the least context), accumulated, and divided by the
sum of the weights. Because every weight is strictly positive, the normalised weights sum to exactly
one at every voxel, including voxels on the volume's faces covered by a single window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Weight at a window's outermost voxel relative to its centre. Strictly positive so that a voxel
#: covered only by window edges (a volume face) still has a defined, finite blend.
EDGE_FLOOR = 1e-3


def profile_1d(length: int, kind: str = "cosine") -> np.ndarray:
    """Weights along one window axis of ``length`` voxels, peak 1, minimum ``EDGE_FLOOR``.

    ``cosine``: a raised-cosine (Hann-like) bump, smooth and symmetric. ``gaussian``: sigma = length/8,
    as MONAI's Gaussian mode. ``constant``: uniform (the naive average). A length-1 axis (the z axis
    of a 2D model) has weight 1.
    """
    if length == 1 or kind == "constant":
        return np.ones(length, dtype=np.float32)
    centre_dist = (np.arange(length, dtype=np.float64) + 0.5) / length - 0.5  # in (-0.5, 0.5)
    if kind == "cosine":
        bump = np.cos(np.pi * centre_dist) ** 2
    elif kind == "gaussian":
        bump = np.exp(-0.5 * (centre_dist * length / (length / 8.0)) ** 2)
    else:
        raise ValueError(f"unknown blend kind {kind!r}")
    bump = bump / bump.max()
    return np.maximum(bump, EDGE_FLOOR).astype(np.float32)


def window_weights(window: Sequence[int], kind: str = "cosine") -> np.ndarray:
    """The separable weight array of a window (outer product of the per-axis profiles), float32."""
    weights = np.ones((1,) * len(window), dtype=np.float32)
    for ax, length in enumerate(window):
        shape = [1] * len(window)
        shape[ax] = length
        weights = weights * profile_1d(length, kind).reshape(shape)
    return weights
