"""Blockwise prediction: read core + context, evaluate the global windows, blend, keep the core.

:func:`predict_box` is the whole computation of one block and also of a whole-volume pass (a block
whose core is the whole volume), which is why blockwise output equals whole-volume output: both sum,
in the same order, the same windows' predictions with the same weights at every voxel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from volseg.geometry import Box, Coord, PointSet, read_box
from volseg.inference.blend import window_weights
from volseg.inference.planes import PlanePredictor, plane_grid, planes_read_box
from volseg.inference.predictor import Predictor
from volseg.inference.windows import WindowGrid


@dataclass(frozen=True)
class WindowPlan:
    """The windows one box needs: their origins (C order), and the box of voxels they read."""

    origins: list[Coord]
    read_box: Box


def plan_windows(windows: WindowGrid, core: Box) -> WindowPlan:
    return WindowPlan(windows.overlapping(core), windows.read_box(core))


def predict_box(
    source: Any,
    predictor: Predictor,
    windows: WindowGrid,
    core: Box,
    blend: str = "cosine",
    data: np.ndarray | None = None,
    batch_windows: int = 16,
    points: PointSet | None = None,
    planes: Sequence[str] = ("xy",),
) -> np.ndarray:
    """Blended predictions of all windows over ``core``: ``(C+1) × core.shape`` float32.

    ``data``, when given, is ``source`` already read over the box of every window (``plan_windows(...)
    .read_box``, or :func:`~volseg.inference.planes.planes_read_box` for several planes; the
    prefetching executor passes it). Windows are evaluated ``batch_windows`` at a time. ``points`` is
    the one global prompt set (volume coordinates): every window receives exactly the points inside it,
    in its own coordinates, so a window sees the same prompts in every block. ``planes``: with more than
    xy, each plane's windows are blended on their own and the result is the planes' mean
    (:mod:`volseg.inference.planes`).
    """
    data_box = planes_read_box(windows, core, planes)
    if data is None:
        data = read_box(source, data_box)
    total = None
    for plane in planes:
        grid = plane_grid(windows, plane)
        plane_predictor = predictor if plane == "xy" else PlanePredictor(predictor, plane)
        blended = _predict_plane(data, data_box, plane_predictor, grid, core, blend, batch_windows, points)
        total = blended if total is None else np.add(total, blended, out=total)
    assert total is not None
    return total if len(planes) == 1 else np.divide(total, len(planes), out=total)


def _predict_plane(data: np.ndarray, data_box: Box, predictor: Predictor, windows: WindowGrid, core: Box,
                   blend: str, batch_windows: int, points: PointSet | None) -> np.ndarray:
    """One plane's blend over ``core`` from ``data`` (read over ``data_box``, which holds its windows)."""
    plan = plan_windows(windows, core)
    local = None if points is None else PointSet(points.inside(data_box) + np.asarray(data_box.start))
    weights = window_weights(windows.window, blend)
    channels = predictor.num_classes + 1
    accumulated = np.zeros((channels, *core.shape), dtype=np.float32)
    weight_sum = np.zeros(core.shape, dtype=np.float32)
    for batch in _batches(plan.origins, batch_windows):
        inputs = np.stack([window_input(data, data_box, windows, o) for o in batch])
        if local is None:
            predictions = predictor.predict(inputs)
        else:
            prompts = [local.inside(Box.from_shape(windows.window, o)) for o in batch]
            predictions = predictor.predict(inputs, prompts)
        for origin, prediction in zip(batch, predictions, strict=True):
            _accumulate(accumulated, weight_sum, core, Box.from_shape(windows.window, origin),
                        prediction, weights)
    return np.divide(accumulated, weight_sum, out=accumulated)


def _batches(items: Sequence[Coord], size: int) -> Iterator[Sequence[Coord]]:
    for begin in range(0, len(items), size):
        yield items[begin : begin + size]


def window_input(data: np.ndarray, read_box: Box, windows: WindowGrid, origin: Coord) -> np.ndarray:
    """The window at ``origin`` cut from ``data`` and mirror-padded on axes shorter than the window."""
    inside = windows.window_box(origin)
    arr = data[inside.relative_to(read_box)]
    missing = [w - s for w, s in zip(windows.window, arr.shape, strict=True)]
    if any(missing):
        arr = np.pad(arr, [(0, m) for m in missing], mode="symmetric")
    return arr


def _accumulate(
    accumulated: np.ndarray,
    weight_sum: np.ndarray,
    core: Box,
    window_box: Box,
    prediction: np.ndarray,
    weights: np.ndarray,
) -> None:
    """Add one window's weighted prediction to the core's accumulators, where they overlap."""
    overlap = window_box.intersect(core)
    if overlap.empty:
        return
    in_core = overlap.relative_to(core)
    in_window = overlap.relative_to(window_box)
    w = torch.from_numpy(weights[in_window])
    # In place and multi-threaded (torch shares the numpy buffers): no temporaries per window.
    torch.from_numpy(accumulated[(slice(None), *in_core)]).addcmul_(
        torch.from_numpy(prediction[(slice(None), *in_window)]), w)
    torch.from_numpy(weight_sum[in_core]).add_(w)
