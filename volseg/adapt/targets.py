"""Training targets derived from labels: instance centres and their Gaussian density maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def instance_centres_2d(mask: np.ndarray) -> np.ndarray:
    """Centres of the 2D objects of a binary ``Y×X`` mask, as an ``N×2`` (y, x) int array.

    An object's centre is the maximum of its distance transform, so it lies inside the object even
    for curved or ring-shaped ones (a centroid may fall outside).
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    distance = ndimage.distance_transform_edt(labels > 0)
    peaks = ndimage.maximum_position(distance, labels, index=np.arange(1, n + 1))
    return np.asarray(peaks, dtype=np.int64).reshape(-1, 2)


def gaussian_density(shape: tuple[int, int], centres: np.ndarray, sigma_vx: float) -> np.ndarray:
    """A ``Y×X`` map with a peak-1 Gaussian of ``sigma_vx`` at each centre; overlaps take the maximum."""
    density = np.zeros(shape, dtype=np.float32)
    radius = int(np.ceil(3 * sigma_vx))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma_vx**2)).astype(np.float32)
    for y, x in np.asarray(centres, dtype=np.int64):
        y0, y1 = max(0, y - radius), min(shape[0], y + radius + 1)
        x0, x1 = max(0, x - radius), min(shape[1], x + radius + 1)
        patch = kernel[y0 - y + radius : y1 - y + radius, x0 - x + radius : x1 - x + radius]
        np.maximum(density[y0:y1, x0:x1], patch, out=density[y0:y1, x0:x1])
    return density


def density_target(mask: np.ndarray, sigma_vx: float) -> np.ndarray:
    """Per-slice Gaussian centre densities of a binary ``Z×Y×X`` mask (2D instances in each slice)."""
    return np.stack([gaussian_density(m.shape, instance_centres_2d(m), sigma_vx) for m in mask])
