"""Post-processing of the semantic output, blockwise: small 2D specks removed from the probabilities
(``output.min_area_nm2``), and components that no point prompt confirms (``prompts.confirm_nm``,
:class:`ConfirmStage`, on the same scheme).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volseg.engine.stage import Pending
from volseg.geometry import Block, Box, PointSet
from volseg.instances.labels import unit_range
from volseg.io import Volume
from volseg.io.point_index import PointIndex

#: A block's removal rule: ``(box, foreground, core, open sides)`` → (the core's pixels to remove, whether a
#: component meeting the core is in doubt); see :meth:`ComponentStage.rule`.
Removal = Callable[[Box, np.ndarray, tuple[slice, ...], Sequence[tuple[slice, ...]]], tuple[np.ndarray, bool]]

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
    """A block's core with its removed components' probabilities set to 0 (``None`` when it has none),
    how many probabilities that zeroed (all channels), and whether the block read past its first halo."""

    values: np.ndarray | None
    zeroed: int
    wide_read: bool


class ComponentStage:
    """Set to 0, in place, the probabilities of every 2D component of foreground (per z slice,
    8-connected) that the block's :meth:`rule` removes, block by block, with the bytes of one
    whole-volume pass. Foreground is ``probability > threshold`` after scaling integer dtypes back to
    [0, 1] (:func:`~volseg.instances.labels.unit_range`); each channel of a multi-channel output is
    cleaned on its own. Only block cores are written: pixels outside the grid's roi stay as they are.

    A block reads its core with the first of ``halos`` (pixels, y and x) and reads again with the next
    only while a component meeting its core is in doubt; the last halo leaves none in doubt (each rule's
    proof). Outcome: ``{"zeroed": probabilities set to 0, "wide_read": whether it read past the first}``."""

    name = "components"

    def __init__(self, probabilities: Volume, threshold: float, halos: Sequence[int]) -> None:
        self.probabilities = probabilities
        self.threshold = threshold
        self.halos = tuple(halos)

    def read_box(self, block: Block) -> Box:
        """The widest box a block reads: its core with the last halo (most read less)."""
        return self.box_with_halo(block, self.halos[-1])

    def box_with_halo(self, block: Block, halo_px: int) -> Box:
        """The core grown by ``halo_px`` in y and x, clipped to the volume (not to the roi)."""
        return block.core.grow((0, halo_px, halo_px)).intersect(self.probabilities.bounds)

    def read(self, block: Block) -> Pending:
        return self.probabilities.read_async(self.box_with_halo(block, self.halos[0]))

    def compute(self, block: Block, values: np.ndarray) -> CleanedCore:
        rule = self.rule(block)
        for i, halo in enumerate(self.halos):
            if i:
                values = self.probabilities.read(self.box_with_halo(block, halo))
            removed, doubtful = self._removed(block, values, halo, rule)
            if not doubtful:
                break
        assert not doubtful, f"{self.name}: a component stays in doubt with the widest halo"
        zeroed, wide_read = int(np.count_nonzero(removed)), halo > self.halos[0]
        if not zeroed:
            return CleanedCore(None, 0, wide_read)
        core = self._channels(values)[(slice(None), *block.core.relative_to(self.box_with_halo(block, halo)))].copy()
        core[removed] = 0
        return CleanedCore(core if self.probabilities.num_channels is not None else core[0], zeroed, wide_read)

    def _channels(self, values: np.ndarray) -> np.ndarray:
        """``values`` as (channel, z, y, x)."""
        return values if self.probabilities.num_channels is not None else values[np.newaxis]

    def _removed(self, block: Block, values: np.ndarray, halo_px: int, rule: Removal) -> tuple[np.ndarray, bool]:
        """The core's pixels to zero, per channel (channel, z, y, x), and whether a component is in doubt."""
        box = self.box_with_halo(block, halo_px)
        core, sides = block.core.relative_to(box), open_sides(box, self.probabilities.bounds)
        found = [rule(box, channel, core, sides) for channel in unit_range(self._channels(values)) > self.threshold]
        return np.stack([mask for mask, _ in found]), any(doubt for _, doubt in found)

    def rule(self, block: Block) -> Removal:
        """The block's rule (one per block, for every halo and channel): of a ``box``'s ``foreground``
        (z, y, x), the ``core``'s pixels to remove, and whether a component is in doubt."""
        raise NotImplementedError

    def write(self, block: Block, computed: CleanedCore) -> list[Pending]:
        if computed.values is None:
            return []
        return [self.probabilities.write_async(block.core, computed.values, handover=True)]

    def outcome(self, block: Block, computed: CleanedCore) -> dict[str, int | bool]:
        return {"zeroed": computed.zeroed, "wide_read": computed.wide_read}

    def to(self, device: str) -> None:
        return None


class MinAreaStage(ComponentStage):
    """Set to 0 the probabilities of every 2D component under ``min_px`` pixels (see the module
    docstring); halos ``min(min_px, FIRST_HALO_PX)``, then ``min_px``."""

    name = "min-area"

    def __init__(self, probabilities: Volume, threshold: float, min_px: int) -> None:
        super().__init__(probabilities, threshold, sorted({min(min_px, FIRST_HALO_PX), min_px}))
        self.min_px = min_px

    def rule(self, block: Block) -> Removal:
        return lambda box, foreground, core, sides: small_components(foreground, core, sides, self.min_px)


# --- confirmation by point prompts ----------------------------------------------------------------------

#: Components wider than this (y or x) are kept unjudged by ``prompts.confirm_nm``: the widest halo a
#: block reads, so that every judged component is seen whole. Organelles this wide are not the specks
#: and blobs that confirmation is for.
CONFIRM_EXTENT_NM = 2000.0


def confirm_extent_pixels(voxel_size_nm: Sequence[float]) -> int:
    """:data:`CONFIRM_EXTENT_NM` in pixels of the finer of y and x (rounded up)."""
    return units_of(CONFIRM_EXTENT_NM, min(float(voxel_size_nm[1]), float(voxel_size_nm[2])))


def unconfirmed_components(foreground: np.ndarray, core: tuple[slice, ...], sides: Sequence[tuple[slice, ...]],
                           points_zyx: np.ndarray, reach: int, max_extent_px: int) -> tuple[np.ndarray, bool]:
    """Of a box's ``foreground`` (z, y, x): the core's pixels that lie in 2D components (per slice,
    8-connected) holding no point of a slice within ``reach`` slices, spanning at most ``max_extent_px``
    pixels in y and in x, and touching none of the open ``sides``; and whether a component meeting the
    core is in doubt (no point seen, narrow as far as seen, but touching a side: it may go on outside the
    box, to a point or past the extent). ``points_zyx`` (``M×3``) are in the box's coordinates; their z may
    lie outside the box by up to ``reach``; a point confirms the component under its rounded (y, x).

    Exact with a halo of ``max_extent_px``: a component running from the core to the box's outermost row
    spans at least ``max_extent_px + 1`` pixels, so it is never judged."""
    removed = np.zeros(foreground.shape, bool)
    doubtful = False
    voxels = np.rint(np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)).astype(int)
    in_plane = np.all((voxels[:, 1:] >= 0) & (voxels[:, 1:] < foreground.shape[1:]), axis=1)
    voxels = voxels[in_plane]
    for z in range(foreground.shape[0]):
        labels, count = ndimage.label(foreground[z], structure=np.ones((3, 3), bool))
        if count == 0:
            continue
        near = voxels[np.abs(voxels[:, 0] - z) <= reach]
        confirmed = np.zeros(count + 1, bool)
        confirmed[labels[near[:, 1], near[:, 2]]] = True
        wide = np.zeros(count + 1, bool)
        wide[1:] = [max(s.stop - s.start for s in found) > max_extent_px for found in ndimage.find_objects(labels)]
        touching = np.zeros(count + 1, bool)
        for side in sides:
            touching[labels[side[1:]]] = True
        in_core = np.zeros(count + 1, bool)
        in_core[labels[core[1:]]] = True
        judged = ~confirmed & ~wide
        judged[0] = False
        doubtful |= bool((judged & touching & in_core).any())
        removed[z] = (judged & ~touching)[labels]
    return removed[core], doubtful


class ConfirmStage(ComponentStage):
    """``prompts.confirm_nm``: set to 0 the probabilities of every 2D component that no point prompt of a
    slice within ``reach`` slices confirms (see :func:`unconfirmed_components`), components wider than
    ``max_extent_px`` excepted. Sparse points mark a share of the objects of every slice; an organelle
    that spans many slices then holds, in nearly every slice, a point of a slice nearby, while a
    false-positive blob holds none.

    ``points``: the run's prompts (a set, or a point index in storage); each block reads those of its
    :meth:`read_box` once. Halos 64, 256, ..., up to ``max_extent_px``."""

    name = "confirm"

    def __init__(self, probabilities: Volume, threshold: float, points: PointSet | PointIndex, reach: int,
                 max_extent_px: int) -> None:
        halos = [min(FIRST_HALO_PX * 4**i, max_extent_px) for i in range(16)]
        super().__init__(probabilities, threshold, sorted(set(halos)))
        self.points, self.reach, self.max_extent_px = points, reach, max_extent_px

    def read_box(self, block: Block) -> Box:
        """The widest probabilities read, grown by ``reach`` in z: where its points come from."""
        return super().read_box(block).grow((self.reach, 0, 0)).intersect(self.probabilities.bounds)

    def rule(self, block: Block) -> Removal:
        """The block's points are read once, those of its :meth:`read_box` (every box it judges, grown by
        ``reach`` in z, lies inside it)."""
        widest = self.read_box(block)
        points = PointSet(points_within_reach(self.points, widest, 0, widest) + np.asarray(widest.start, np.float64))

        def removable(box: Box, foreground: np.ndarray, core: tuple[slice, ...],
                      sides: Sequence[tuple[slice, ...]]) -> tuple[np.ndarray, bool]:
            zyx = points_within_reach(points, box, self.reach, self.probabilities.bounds)
            return unconfirmed_components(foreground, core, sides, zyx, self.reach, self.max_extent_px)

        return removable


def points_within_reach(points: PointSet | PointIndex, box: Box, reach: int, bounds: Box) -> np.ndarray:
    """The points (``M×3``, relative to ``box.start``) whose voxel lies in ``box`` grown by ``reach`` slices
    in z (within ``bounds``): those that may confirm a component of ``box``."""
    reach_box = box.grow((reach, 0, 0)).intersect(bounds)
    found = points.read(reach_box) if isinstance(points, PointIndex) else points
    return found.inside(reach_box) + np.asarray(reach_box.start, np.float64) - np.asarray(box.start, np.float64)
