"""DFG's box-prompt search: grow a box per object under feature guidance until SAM's mask stops changing.

An object starts as a small box around its seed point. Each step, every side of the box whose outer
strip (``step_vx`` wide, along that side) looks like the object — mean ``similarity`` to the object's
feature prototype at least ``feature_threshold`` — moves out by the strip; when no side moves, the box
grows by ``step_vx`` on every side (a probe). SAM draws a mask for each box; the search keeps the box
whose mask hardly differs from the previous box's (IoU ≥ ``stable_iou``: SAM's mask has *stabilised*)
and gives the object up after ``max_steps`` without that::

    ┌─────────────┐          similarity high beyond a side → that side moves out
    │  ┌───────┐  │          mask(box_k) ≈ mask(box_k−1)  → keep box_k and its mask
    │  │ seed• │  │
    │  └───────┘  │
    └─────────────┘

Boxes are ``(y0, x0, y1, x1)`` with inclusive pixel corners, clipped to the image. Everything here is
numpy and a ``segment(box) → mask`` callable, so the search is testable without SAM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Box2D = tuple[int, int, int, int]


@dataclass(frozen=True)
class BoxSearchSettings:
    """``initial_half_vx``: the first box spans the seed ± this; ``step_vx``: how far a side moves;
    ``feature_threshold``: least mean similarity of a strip for its side to move; ``stable_iou``: mask IoU
    between consecutive boxes at which SAM's mask counts as stable; ``max_steps``: growth steps allowed."""

    initial_half_vx: int = 4
    step_vx: int = 4
    feature_threshold: float = 0.5
    stable_iou: float = 0.9
    max_steps: int = 16


@dataclass(frozen=True)
class BoxSearch:
    """The search's outcome: the kept ``box`` and its ``mask``; ``stable`` False when the mask never
    stabilised (then box and mask are the last tried, and the object should be dropped); ``steps`` taken."""

    box: Box2D
    mask: np.ndarray
    stable: bool
    steps: int


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; two empty masks agree completely (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def first_stable(masks: Sequence[np.ndarray], stable_iou: float) -> int | None:
    """The first ``k ≥ 1`` with ``IoU(masks[k], masks[k − 1]) ≥ stable_iou``, or None."""
    return next((k for k in range(1, len(masks)) if mask_iou(masks[k], masks[k - 1]) >= stable_iou), None)


def clip_box(box: Sequence[float], shape: tuple[int, int]) -> Box2D:
    y0, x0, y1, x1 = (int(np.rint(v)) for v in box)
    return (max(y0, 0), max(x0, 0), min(y1, shape[0] - 1), min(x1, shape[1] - 1))


def box_contains(box: Box2D, mask: np.ndarray) -> bool:
    """Whether every True pixel of ``mask`` lies inside ``box``."""
    ys, xs = np.nonzero(mask)
    return not len(ys) or (box[0] <= ys.min() and ys.max() <= box[2] and box[1] <= xs.min() and xs.max() <= box[3])


def grow_box(box: Box2D, similarity: np.ndarray, step_vx: int, threshold: float) -> Box2D:
    """``box`` with each side moved out by its outer strip where the strip's mean ``similarity`` (``Y×X``)
    is at least ``threshold`` (sides at the image border stay)."""
    y0, x0, y1, x1 = box
    h, w = similarity.shape
    strips = {
        "top": (similarity[max(y0 - step_vx, 0) : y0, x0 : x1 + 1], max(y0 - step_vx, 0)),
        "bottom": (similarity[y1 + 1 : y1 + 1 + step_vx, x0 : x1 + 1], min(y1 + step_vx, h - 1)),
        "left": (similarity[y0 : y1 + 1, max(x0 - step_vx, 0) : x0], max(x0 - step_vx, 0)),
        "right": (similarity[y0 : y1 + 1, x1 + 1 : x1 + 1 + step_vx], min(x1 + step_vx, w - 1)),
    }
    moved = {side: edge for side, (strip, edge) in strips.items() if strip.size and strip.mean() >= threshold}
    return (moved.get("top", y0), moved.get("left", x0), moved.get("bottom", y1), moved.get("right", x1))


def search_box(seed_yx: Sequence[float], similarity: np.ndarray, segment: Callable[[Box2D], np.ndarray],
               settings: BoxSearchSettings) -> BoxSearch:
    """Grow a box from ``seed_yx`` under ``similarity`` guidance, asking ``segment`` (SAM) for each box's
    mask, until the mask stabilises (see the module docstring)."""
    shape = similarity.shape
    r = settings.initial_half_vx
    box = clip_box((seed_yx[0] - r, seed_yx[1] - r, seed_yx[0] + r, seed_yx[1] + r), shape)
    mask = segment(box)
    for step in range(1, settings.max_steps + 1):
        grown = grow_box(box, similarity, settings.step_vx, settings.feature_threshold)
        if grown == box:
            s = settings.step_vx
            grown = clip_box((box[0] - s, box[1] - s, box[2] + s, box[3] + s), shape)
        if grown == box:  # the box is the whole image and SAM's mask still moved: nothing left to try
            return BoxSearch(box, mask, False, step)
        grown_mask = segment(grown)
        if first_stable([mask, grown_mask], settings.stable_iou) is not None:
            return BoxSearch(grown, grown_mask, True, step)
        box, mask = grown, grown_mask
    return BoxSearch(box, mask, False, settings.max_steps)
