"""Global density peaks, found blockwise: the prompts of `prompts.auto` runs.

A voxel is a peak when its density is at least ``threshold`` and it beats every other voxel of the box
of half-width ``radius`` around it, ties going to the lower global (z, y, x) index. The rule only looks
``radius`` voxels away, so each block reads its core grown by ``radius`` (clipped to the volume; the
volume's outside counts as −∞) and keeps the peaks in its core: the union over blocks is exactly the
peak set of one whole-volume pass, whatever the block shape, and no peak is found twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from volseg.geometry import Block, Box, Coord, PointSet


def peak_radius(min_distance_nm: float, voxel_size_nm: Sequence[float], window: Coord) -> Coord:
    """Half-width in voxels per axis of the peak neighbourhood; 0 along z for 2D (one-slice) windows,
    whose prompts live in one slice each."""
    radius = [max(1, round(min_distance_nm / v)) for v in voxel_size_nm]
    if window[0] == 1:
        radius[0] = 0
    return tuple(radius)


def local_peaks(values: np.ndarray, box: Box, core: Box, threshold: float, radius: Coord) -> np.ndarray:
    """Peaks (N×3 global z, y, x) inside ``core`` of ``values``, the density over ``box`` ⊇ core ± radius
    (clipped to the volume)."""
    values = np.asarray(values, dtype=np.float32)
    size = tuple(2 * r + 1 for r in radius)
    top = ndimage.maximum_filter(values, size=size, mode="constant", cval=-np.inf)
    inner = np.zeros(values.shape, bool)
    inner[core.relative_to(box)] = True
    candidates = np.argwhere((values >= threshold) & (values == top) & inner)
    keep = []
    for voxel in candidates:
        lo = np.maximum(voxel - radius, 0)
        hi = np.minimum(voxel + np.asarray(radius) + 1, values.shape)
        neighbourhood = values[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        ties = np.argwhere(neighbourhood == values[tuple(voxel)]) + lo
        # the lexicographically smallest voxel of a tie wins (local and global order agree)
        keep.append(tuple(ties[np.lexsort(ties.T[::-1])][0]) == tuple(voxel))
    peaks = candidates[np.asarray(keep, bool)] if len(candidates) else candidates
    return (peaks + np.asarray(box.start)).astype(np.int64).reshape(-1, 3)


class PeakStage:
    """Block stage finding the density peaks of each core (reads ``density``).

    With an ``index`` (a :class:`~volseg.io.point_index.PointIndex` whose cells are the grid's block cores),
    each block writes its peaks into its own cell, ids ``(block id + 1) << 32 | rank``, and the driver
    keeps nothing; a resumed run finds them there. Without one, the outcome is the block's peaks as
    ``[[z, y, x], ...]``, kept in the done-mark (for `volseg peaks`, which gathers them into one file)."""

    name = "peaks"

    def __init__(self, density: Any, threshold: float, radius: Coord, index: Any = None) -> None:
        self.density = density
        self.threshold = threshold
        self.radius = tuple(radius)
        self.index = index

    def read_box(self, block: Block) -> Box:
        """The core grown by the peak radius, clipped to the volume."""
        return block.core.grow(self.radius).intersect(self.density.bounds)

    def read(self, block: Block) -> Any:
        return self.density.read_async(self.read_box(block))

    def compute(self, block: Block, data: np.ndarray) -> np.ndarray:
        return local_peaks(data, self.read_box(block), block.core, self.threshold, self.radius)

    def write(self, block: Block, computed: np.ndarray) -> list[Any]:
        if self.index is None or len(computed) == 0:  # an empty cell has no key
            return []
        ids = ((block.id + 1) << 32) + np.arange(len(computed), dtype=np.uint64)
        return [self.index.write_cell(block.core.start, computed, ids)]

    def outcome(self, block: Block, computed: np.ndarray) -> list[list[int]] | None:
        return computed.tolist() if self.index is None else None

    def to(self, device: str) -> None:
        return None


def gather_peaks(outcomes: Mapping[int, Any]) -> PointSet:
    """One global point set from every block's peaks."""
    rows = [np.asarray(points, dtype=np.float64).reshape(-1, 3) for points in outcomes.values()]
    return PointSet(np.concatenate(rows) if rows else np.zeros((0, 3)))
