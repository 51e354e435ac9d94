"""The global window grid: where a model is applied, in volume coordinates.

Window origins are multiples of the stride counted from the volume's origin, so every block of a
blockwise run evaluates exactly the windows a single whole-volume pass would, at exactly the same
positions, on exactly the same voxels. The last window on each axis is snapped back to end on the
volume's far face, so no window reads outside the volume::

    volume    |0                                   37|
    windows   [0 ......... 16)                          window 16, stride 12
                          [12 ......... 28)
                                     [24 ......... 40)  <- would cross the face
                                  [21 ......... 37)     <- snapped: ends on the face instead

An axis shorter than its window gets one window at 0 that is padded (mirror) to the window size; on
such an axis every block reads the whole axis, so the padding is the same in every block.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from volseg.errors import ConfigError
from volseg.geometry import Box, Coord


def axis_origins(length: int, window: int, stride: int) -> np.ndarray:
    """Sorted window origins on one axis of ``length`` voxels (see the module docstring)."""
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    last = length - window
    origins = np.arange(0, last, stride, dtype=np.int64)
    return np.append(origins, last)


@dataclass(frozen=True)
class WindowGrid:
    """Windows of ``window`` voxels at ``stride`` over a volume of ``volume_shape`` (all z, y, x)."""

    volume_shape: Coord
    window: Coord
    stride: Coord

    def __post_init__(self) -> None:
        for name in ("volume_shape", "window", "stride"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.volume_shape) == len(self.window) == len(self.stride):
            raise ConfigError(
                f"Window {self.window}, stride {self.stride} and volume {self.volume_shape} differ in rank.",
                "give window and stride as three numbers (z, y, x).",
            )
        for ax, w, s in zip("zyx", self.window, self.stride, strict=False):
            if w < 1 or not 1 <= s <= w:
                raise ConfigError(
                    f"inference.window/stride on axis {ax} is {w}/{s}; a stride must be between 1 and "
                    "the window size, or voxels between windows would never be predicted.",
                    f"set inference.stride on axis {ax} to a value in 1..{max(w, 1)}.",
                )

    def origins(self, axis: int) -> np.ndarray:
        return axis_origins(self.volume_shape[axis], self.window[axis], self.stride[axis])

    def window_box(self, origin: Sequence[int]) -> Box:
        """The voxels a window at ``origin`` covers inside the volume (padding excluded)."""
        box = Box.from_shape(self.window, origin)
        return box.intersect(Box.from_shape(self.volume_shape))

    def axis_overlapping(self, axis: int, box: Box) -> np.ndarray:
        """Sorted origins on ``axis`` of the windows that cover at least one voxel of ``box`` there."""
        o = self.origins(axis)
        covered_stop = np.minimum(o + self.window[axis], self.volume_shape[axis])
        return o[(o < box.stop[axis]) & (covered_stop > box.start[axis])]

    def overlapping(self, box: Box) -> list[Coord]:
        """Origins of all windows that cover at least one voxel of ``box``, in C order."""
        per_axis = [self.axis_overlapping(ax, box).tolist() for ax in range(len(self.window))]
        return [tuple(c) for c in itertools.product(*per_axis)]

    def read_box(self, box: Box) -> Box:
        """The voxels a block must read to evaluate every window overlapping ``box``: from the first
        window's origin to the last window's end on each axis (clipped to the volume)."""
        start, stop = [], []
        for ax in range(len(self.window)):
            o = self.axis_overlapping(ax, box)
            start.append(int(o[0]))
            stop.append(min(int(o[-1]) + self.window[ax], self.volume_shape[ax]))
        return Box(tuple(start), tuple(stop))

    def count(self) -> int:
        n = 1
        for ax in range(len(self.window)):
            n *= len(self.origins(ax))
        return n
