"""Post-processing of the semantic output: small 2D specks removed from the probabilities, blockwise.

With ``output.min_area_nm2``, every connected component of foreground (probability > threshold, per z
slice, 8-connected in y and x) whose area is under ``min_px`` pixels (``min_area_nm2`` over a pixel's
area, rounded up) has its probabilities set to 0. :class:`MinAreaStage` does this in place, block by
block, on any executor, and writes the bytes one whole-volume pass would.

**Exact.** A block reads its core and a halo of ``h`` pixels in y and x (none in z: components never
leave their slice). The read box's *open* sides are those that are not the volume's edge. A component
that meets the core and touches no open side lies wholly inside the box, so its area is seen whole. One
that touches an open side runs from the core to the box's outermost row, through ``h + 1`` rows, so it
has at least ``h + 1`` pixels::

    volume edge (closed)                  open side: the volume goes on
    |<- halo ->|<------- core ------->|<---- h ---->|
    |          |        o o o o o o o o o o o o o o x     o ... x: one component, through h + 1 columns
    |       o o|o o o                 |             |     o ... o: touches no open side, seen whole

With ``h >= min_px`` such a component is never small. To keep reads small, a block first reads a halo
of ``min(min_px, FIRST_HALO_PX)`` and reads again with ``h = min_px`` only when a component meeting its
core touches an open side while it still counts fewer than ``min_px`` pixels.

**Safe side by side.** Neighbouring blocks clean their cores while reading each other's as halo. Only
whole small components are ever zeroed, and zeroing one neither joins nor splits any other: whatever
mix of cleaned and not yet cleaned neighbours a block reads, every large component looks as it was
(never small), and whatever it sees of a small one is part of it (fewer than ``min_px`` pixels, so
removed). A block writes only its own core, which nobody else writes; a block cleaned a second time
(a crash before its done-mark) finds nothing more to remove.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volseg.engine.stage import Pending
from volseg.geometry import Block, Box
from volseg.instances.labels import unit_range
from volseg.io import Volume

#: Halo (pixels, y and x) of a block's first read; only a doubt about a component sends it further.
FIRST_HALO_PX = 64
#: Which pixels touch: the 8 neighbours within a z slice, none across slices.
SLICE_NEIGHBOURS = np.zeros((3, 3, 3), bool)
SLICE_NEIGHBOURS[1] = True


def min_area_pixels(min_area_nm2: float, voxel_size_nm: Sequence[float]) -> int:
    """The least area, in pixels, of a kept component: ``min_area_nm2`` over a pixel's area (voxel
    y × voxel x), rounded up. Below 2 nothing is removed (every component has a pixel)."""
    return units_of(min_area_nm2, float(voxel_size_nm[1]) * float(voxel_size_nm[2]))


def units_of(amount: float, unit: float) -> int:
    """How many ``unit`` make up ``amount``, rounded up (a hair of float error does not add one)."""
    return max(0, math.ceil(amount / unit - 1e-9))


def open_sides(box: Box, bounds: Box) -> list[tuple[slice, ...]]:
    """The outermost row or column of ``box`` (relative slices, z, y, x) on each y/x side where the
    volume ``bounds`` go on past it."""
    sides = []
    for axis in (1, 2):
        for inside, edge, row in ((box.start[axis], bounds.start[axis], slice(0, 1)),
                                  (box.stop[axis], bounds.stop[axis], slice(-1, None))):
            if inside != edge:
                side = [slice(None)] * 3
                side[axis] = row
                sides.append(tuple(side))
    return sides


def small_components(foreground: np.ndarray, core: tuple[slice, ...], sides: Sequence[tuple[slice, ...]],
                     min_px: int) -> tuple[np.ndarray, bool]:
    """Of a box's ``foreground`` (z, y, x): the core's pixels that lie in components of fewer than
    ``min_px`` pixels touching none of the open ``sides`` (a mask of the core's shape), and whether a
    component meeting the core is in doubt (fewer than ``min_px`` pixels seen, but touching a side, so
    it may go on outside the box)."""
    labels, count = ndimage.label(foreground, structure=SLICE_NEIGHBOURS)
    small = np.bincount(labels.ravel(), minlength=count + 1) < min_px
    small[0] = False
    touching = np.zeros(count + 1, bool)
    for side in sides:
        touching[labels[side]] = True
    core_labels = labels[core]
    in_core = np.zeros(count + 1, bool)
    in_core[core_labels] = True
    return (small & ~touching)[core_labels], bool((small & touching & in_core).any())


@dataclass(frozen=True)
class CleanedCore:
    """A block's core with its small components' probabilities set to 0 (``None`` when it has none),
    how many probabilities that zeroed (all channels), and whether the block read the full halo."""

    values: np.ndarray | None
    zeroed: int
    wide_read: bool


class MinAreaStage:
    """Set to 0 the probabilities of every 2D component under ``min_px`` pixels, in place (see the
    module docstring). Foreground is ``probability > threshold`` after scaling integer dtypes back to
    [0, 1] (:func:`~volseg.instances.labels.unit_range`); each channel of a multi-channel output is
    cleaned on its own. Only block cores are written: pixels outside the grid's roi stay as they are.

    Outcome: ``{"zeroed": probabilities set to 0, "wide_read": whether the block read min_px of halo}``."""

    name = "min-area"

    def __init__(self, probabilities: Volume, threshold: float, min_px: int) -> None:
        self.probabilities = probabilities
        self.threshold = threshold
        self.min_px = min_px

    @property
    def first_halo_px(self) -> int:
        return min(self.min_px, FIRST_HALO_PX)

    def read_box(self, block: Block) -> Box:
        """The widest box a block reads: its core with a halo of ``min_px`` (most read less)."""
        return self.box_with_halo(block, self.min_px)

    def box_with_halo(self, block: Block, halo_px: int) -> Box:
        """The core grown by ``halo_px`` in y and x, clipped to the volume (not to the roi)."""
        return block.core.grow((0, halo_px, halo_px)).intersect(self.probabilities.bounds)

    def read(self, block: Block) -> Pending:
        return self.probabilities.read_async(self.box_with_halo(block, self.first_halo_px))

    def compute(self, block: Block, values: np.ndarray) -> CleanedCore:
        halo = self.first_halo_px
        removed, doubtful = self._small(block, values, halo)
        if doubtful:  # impossible once halo == min_px (module docstring)
            halo = self.min_px
            values = self.probabilities.read(self.box_with_halo(block, halo))
            removed, _ = self._small(block, values, halo)
        zeroed, wide_read = int(np.count_nonzero(removed)), halo > self.first_halo_px
        if not zeroed:
            return CleanedCore(None, 0, wide_read)
        core = self._channels(values)[(slice(None), *block.core.relative_to(self.box_with_halo(block, halo)))].copy()
        core[removed] = 0
        return CleanedCore(core if self.probabilities.num_channels is not None else core[0], zeroed, wide_read)

    def _channels(self, values: np.ndarray) -> np.ndarray:
        """``values`` as (channel, z, y, x)."""
        return values if self.probabilities.num_channels is not None else values[np.newaxis]

    def _small(self, block: Block, values: np.ndarray, halo_px: int) -> tuple[np.ndarray, bool]:
        """The core's pixels to zero, per channel (channel, z, y, x), and whether a component is in doubt."""
        box = self.box_with_halo(block, halo_px)
        core, sides = block.core.relative_to(box), open_sides(box, self.probabilities.bounds)
        found = [small_components(channel, core, sides, self.min_px)
                 for channel in unit_range(self._channels(values)) > self.threshold]
        return np.stack([mask for mask, _ in found]), any(doubt for _, doubt in found)

    def write(self, block: Block, computed: CleanedCore) -> list[Pending]:
        if computed.values is None:
            return []
        return [self.probabilities.write_async(block.core, computed.values, handover=True)]

    def outcome(self, block: Block, computed: CleanedCore) -> dict[str, int | bool]:
        return {"zeroed": computed.zeroed, "wide_read": computed.wide_read}

    def to(self, device: str) -> None:
        return None
