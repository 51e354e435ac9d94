"""Training targets derived from labels: instance centres, Gaussian density maps and point disks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _split_touching(labels: np.ndarray) -> np.ndarray:
    """``labels`` with the pixels where two different non-zero ids touch (4-neighbours) set to 0."""
    out = labels.copy()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        differ = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        o = np.moveaxis(out, axis, 0)
        o[1:][differ] = 0
    return out


def instance_centres_2d(mask: np.ndarray) -> np.ndarray:
    """Centres of the 2D objects of a ``Y×X`` mask, as an ``N×2`` (y, x) int array.

    ``mask`` is binary (each connected component is an object) or instance ids (each connected
    component of each id is an object; where two ids touch they are kept apart). An object's centre is
    the maximum of its distance transform, so it lies inside the object even for curved or ring-shaped
    ones (a centroid may fall outside). The image border does not count as background, so an object
    cut by the border has its centre at the middle of its visible part's border side or deeper.
    """
    mask = np.asarray(mask)
    inside = mask > 0 if mask.dtype == bool else _split_touching(mask) > 0
    return innermost_pixels(*ndimage.label(inside))


def innermost_pixels(components: np.ndarray, n: int) -> np.ndarray:
    """The innermost pixel of each component ``1 … n`` of ``components`` (as ``ndimage.label`` returns
    them), as an ``n × ndim`` int array: the maximum of the distance transform to the background, which
    lies inside the object even for curved or ring-shaped ones."""
    if n == 0:
        return np.zeros((0, components.ndim), dtype=np.int64)
    distance = ndimage.distance_transform_edt(components > 0)
    peaks = ndimage.maximum_position(distance, components, index=np.arange(1, n + 1))
    return np.asarray(peaks, dtype=np.int64).reshape(n, components.ndim)


def gaussian_density(shape: tuple[int, int], centres: np.ndarray, sigma_vx: float) -> np.ndarray:
    """A ``Y×X`` map with a peak-1 Gaussian of ``sigma_vx`` at each centre; overlaps take the maximum.

    Centres (y, x) are rounded to the nearest pixel; centres outside the map are ignored.
    """
    density = np.zeros(shape, dtype=np.float32)
    radius = int(np.ceil(3 * sigma_vx))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma_vx**2)).astype(np.float32)
    for y, x in np.rint(np.asarray(centres, dtype=np.float64).reshape(-1, 2)).astype(np.int64):
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            continue
        y0, y1 = max(0, y - radius), min(shape[0], y + radius + 1)
        x0, x1 = max(0, x - radius), min(shape[1], x + radius + 1)
        patch = kernel[y0 - y + radius : y1 - y + radius, x0 - x + radius : x1 - x + radius]
        np.maximum(density[y0:y1, x0:x1], patch, out=density[y0:y1, x0:x1])
    return density


def density_target(mask: np.ndarray, sigma_vx: float) -> np.ndarray:
    """Per-slice Gaussian centre densities of a ``Z×Y×X`` mask or instance labels (2D objects in each
    slice, see :func:`instance_centres_2d`)."""
    return np.stack([gaussian_density(m.shape, instance_centres_2d(m), sigma_vx) for m in mask])


def point_disks(shape: tuple[int, int], points_yx: np.ndarray, radius_vx: float) -> np.ndarray:
    """A ``Y×X`` bool map, True within ``radius_vx`` of any point (y, x); points outside add nothing
    beyond the part of their disk that falls inside."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, dtype=bool)
    for y, x in np.asarray(points_yx, dtype=np.float64).reshape(-1, 2):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius_vx**2
    return out
