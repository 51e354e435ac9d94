"""Weak labels: one box and/or one point per annotated object of a 2D slice, from sparse annotations.

Sparse annotations come as instance labels in which only some objects are drawn (labels > 0; the rest of
the slice is unknown) or as points (e.g. WDA's 15% centre clicks). An object is a 2D connected
component of one instance id. Its point is its innermost pixel (the peak of its distance transform,
inside even for curved objects); its box is ``(y0, x0, y1, x1)`` with inclusive pixel corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volseg.training.targets import innermost_pixels


@dataclass(frozen=True)
class WeakLabels:
    """The weak labels of one slice: ``points_yx`` ``n×2`` and, when the objects' extents are known,
    ``boxes_yxyx`` ``n×4`` (row ``i`` of both is object ``i``), else None."""

    points_yx: np.ndarray
    boxes_yxyx: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.points_yx)


def weak_labels_from_instances(labels_2d: np.ndarray) -> WeakLabels:
    """A point and a box for every 2D component of every instance id of ``labels_2d`` (``Y×X``, 0 = none)."""
    points, boxes = [], []
    for value in np.unique(labels_2d[labels_2d > 0]):
        components, n = ndimage.label(labels_2d == value)
        for peak, where in zip(innermost_pixels(components, n), ndimage.find_objects(components), strict=True):
            points.append(tuple(peak))
            boxes.append((where[0].start, where[1].start, where[0].stop - 1, where[1].stop - 1))
    return WeakLabels(np.asarray(points, dtype=np.float64).reshape(-1, 2),
                      np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def weak_labels_from_points(points_yx: np.ndarray) -> WeakLabels:
    """Points only (their objects' extents are unknown, so no boxes)."""
    return WeakLabels(np.asarray(points_yx, dtype=np.float64).reshape(-1, 2))


def instances_at_points(labels_2d: np.ndarray, points_yx: np.ndarray) -> np.ndarray:
    """``labels_2d`` keeping only the 2D objects that contain one of ``points_yx``: sparse instance
    annotations made from dense ones (benchmarks: the objects the WDA clicks select)."""
    out = np.zeros_like(labels_2d)
    yx = np.rint(np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)).astype(int)
    for value in np.unique(labels_2d[yx[:, 0], yx[:, 1]]) if len(yx) else []:
        if value == 0:
            continue
        components, _ = ndimage.label(labels_2d == value)
        hit = np.unique(components[yx[:, 0], yx[:, 1]])
        out[np.isin(components, hit[hit > 0])] = value
    return out
