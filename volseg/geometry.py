"""Boxes and block grids in voxel coordinates, axis order (z, y, x).

All coordinates are integer voxel indices of the volume's array, starting at 0 (a volume's voxel offset
in physical space is metadata, carried by :class:`volseg.io.Volume`, and never enters these types).

A :class:`BlockGrid` cuts a region of interest into block **cores** — what each block writes — and
gives each block a **halo** around its core — what it may read for context. Cores are whole multiples of
the output's storage chunk (or shard), so no two blocks ever write into the same chunk::

    chunk grid   |....|....|....|....|....|..|      (last chunk cut by the volume edge)
    block cores  |=========|=========|=======|      core_shape = 2 chunks; the last core is clipped
    halo of #1   <--|=========|-->                  halo grows the core, clipped at the volume edge

Block ids are C-order indices into the grid of cores, so a retry or a resume hits the same block.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.errors import AlignmentError, PointsError

Coord = tuple[int, ...]


def _coord(values: Sequence[int] | int, ndim: int | None = None) -> Coord:
    if isinstance(values, int):
        if ndim is None:
            raise TypeError("a scalar coordinate needs ndim")
        return (int(values),) * ndim
    return tuple(int(v) for v in values)


@dataclass(frozen=True, order=True)
class Box:
    """A half-open box ``[start, stop)`` of voxels.

    A box with ``stop <= start`` on any axis is empty; its shape is clamped to 0 on that axis.
    """

    start: Coord
    stop: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _coord(self.start))
        object.__setattr__(self, "stop", _coord(self.stop))
        if len(self.start) != len(self.stop):
            raise ValueError(f"Box start {self.start} and stop {self.stop} differ in rank")

    @classmethod
    def from_shape(cls, shape: Sequence[int], start: Sequence[int] | None = None) -> Box:
        """The box of ``shape`` voxels whose first voxel is ``start`` (default: the origin)."""
        begin = (0,) * len(shape) if start is None else _coord(start)
        return cls(begin, tuple(b + s for b, s in zip(begin, shape, strict=True)))

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> Coord:
        return tuple(max(0, e - b) for b, e in zip(self.start, self.stop, strict=True))

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def empty(self) -> bool:
        return self.size == 0

    @property
    def slices(self) -> tuple[slice, ...]:
        """Slices that cut this box out of an array that starts at the origin."""
        return tuple(slice(b, e) for b, e in zip(self.start, self.stop, strict=True))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices that cut this box out of an array holding ``outer`` (which must contain it)."""
        if not outer.contains(self):
            raise ValueError(f"{self} is not inside {outer}")
        return tuple(
            slice(b - o, e - o) for b, e, o in zip(self.start, self.stop, outer.start, strict=True)
        )

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        return Box(start, tuple(max(s, e) for s, e in zip(start, stop, strict=True)))

    def union(self, other: Box) -> Box:
        """The smallest box containing both (an empty box contributes nothing)."""
        if self.empty:
            return other
        if other.empty:
            return self
        start = tuple(min(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(max(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        return Box(start, stop)

    def grow(self, before: Sequence[int] | int, after: Sequence[int] | int | None = None) -> Box:
        """Grow by ``before`` voxels below ``start`` and ``after`` (default: ``before``) above ``stop``."""
        lo = _coord(before, self.ndim)
        hi = lo if after is None else _coord(after, self.ndim)
        return Box(
            tuple(s - g for s, g in zip(self.start, lo, strict=True)),
            tuple(e + g for e, g in zip(self.stop, hi, strict=True)),
        )

    def shift(self, offset: Sequence[int]) -> Box:
        off = _coord(offset)
        return Box(
            tuple(s + o for s, o in zip(self.start, off, strict=True)),
            tuple(e + o for e, o in zip(self.stop, off, strict=True)),
        )

    def contains(self, other: Box | Sequence[int]) -> bool:
        """Whether a box (empty boxes are contained anywhere) or a point lies inside."""
        if isinstance(other, Box):
            if other.empty:
                return True
            return all(
                a <= b and e >= f
                for a, b, e, f in zip(self.start, other.start, self.stop, other.stop, strict=True)
            )
        return all(a <= p < e for a, p, e in zip(self.start, other, self.stop, strict=True))

    def to_json(self) -> dict[str, list[int]]:
        return {"start": list(self.start), "stop": list(self.stop)}

    @classmethod
    def from_json(cls, data: dict[str, Sequence[int]]) -> Box:
        return cls(tuple(data["start"]), tuple(data["stop"]))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{b}:{e}" for b, e in zip(self.start, self.stop, strict=True)) + ")"


@dataclass(frozen=True)
class Block:
    """One block of a grid: ``core`` is written by it alone; ``halo_box`` is what it may read."""

    id: int
    index: Coord
    core: Box
    halo_box: Box


@dataclass(frozen=True)
class BlockGrid:
    """A region of interest cut into chunk-aligned block cores, each with a halo.

    ``roi`` is tiled by cores of ``core_shape`` starting at ``roi.start``; cores at the far edge of the
    roi are clipped to it. Halos grow each core by ``halo`` voxels on every side and are clipped to
    ``bounds`` (the whole volume), never to the roi, so blocks at the roi's edge still see real context.
    """

    roi: Box
    core_shape: Coord
    halo: Coord
    bounds: Box

    def __post_init__(self) -> None:
        object.__setattr__(self, "core_shape", _coord(self.core_shape))
        object.__setattr__(self, "halo", _coord(self.halo, self.roi.ndim))
        if any(c <= 0 for c in self.core_shape):
            raise AlignmentError(
                f"Block core shape {self.core_shape} has a non-positive axis.",
                "give every axis of the block core a positive size (z, y, x).",
            )
        if any(h < 0 for h in self.halo):
            raise AlignmentError(f"Block halo {self.halo} is negative.", "use a halo >= 0 on every axis.")
        if not self.bounds.contains(self.roi):
            raise AlignmentError(
                f"The region of interest {self.roi} reaches outside the volume {self.bounds}.",
                "shrink the region of interest to lie inside the volume.",
            )

    @classmethod
    def aligned(
        cls,
        roi: Box,
        core_shape: Sequence[int],
        halo: Sequence[int] | int,
        bounds: Box,
        write_chunk: Sequence[int],
    ) -> BlockGrid:
        """A grid whose cores each cover whole storage chunks of shape ``write_chunk``.

        ``write_chunk`` is the unit a writer owns: the chunk shape, or the shard shape of a sharded
        array. Raises :class:`AlignmentError` when a core or the roi would split such a unit between
        two blocks, because two blocks writing one chunk race and one block's voxels are lost.
        """
        core = _coord(core_shape)
        chunk = _coord(write_chunk)
        axes = "zyx" if len(core) == 3 else [str(i) for i in range(len(core))]
        for ax, c, k in zip(axes, core, chunk, strict=True):
            if c % k:
                raise AlignmentError(
                    f"Block core (execution.block) {tuple(core)} is not a whole number of output chunks "
                    f"{tuple(chunk)} on axis {ax} ({c} % {k} = {c % k}). Two blocks would write into one chunk "
                    "and overwrite each other's voxels.",
                    f"set execution.block on axis {ax} to a multiple of {k}, e.g. {max(k, c // k * k)}.",
                )
        for ax, s, e, k, b in zip(axes, roi.start, roi.stop, chunk, bounds.stop, strict=True):
            if s % k or (e % k and e != b):
                raise AlignmentError(
                    f"The region of interest (roi) {roi} does not start and end on output chunk borders "
                    f"(chunk {tuple(chunk)}) on axis {ax}, so its edge blocks would share chunks with "
                    "voxels outside it.",
                    f"align roi start and stop on axis {ax} to multiples of {k} (the stop may also be "
                    "the volume's edge).",
                )
        return cls(roi, core, _coord(halo, roi.ndim), bounds)

    @property
    def grid_shape(self) -> Coord:
        return tuple(-(-s // c) for s, c in zip(self.roi.shape, self.core_shape, strict=True))

    @property
    def num_blocks(self) -> int:
        n = 1
        for g in self.grid_shape:
            n *= g
        return n

    def block_id(self, index: Sequence[int]) -> int:
        """The C-order id of the block at grid ``index``."""
        bid = 0
        for i, g in zip(index, self.grid_shape, strict=True):
            if not 0 <= i < g:
                raise IndexError(f"block index {tuple(index)} outside grid {self.grid_shape}")
            bid = bid * g + i
        return bid

    def block(self, block_id: int) -> Block:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} outside 0..{self.num_blocks - 1}")
        index = []
        rest = block_id
        for g in reversed(self.grid_shape):
            index.append(rest % g)
            rest //= g
        return self._make(tuple(reversed(index)))

    def _make(self, index: Coord) -> Block:
        start = tuple(r + i * c for r, i, c in zip(self.roi.start, index, self.core_shape, strict=True))
        core = Box.from_shape(self.core_shape, start).intersect(self.roi)
        halo_box = core.grow(self.halo).intersect(self.bounds)
        return Block(self.block_id(index), index, core, halo_box)

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self._make(tuple(index))

    def __len__(self) -> int:
        return self.num_blocks


def read_box(source: Any, box: Box) -> np.ndarray:
    """Read ``box`` from a :class:`volseg.io.Volume` (anything with ``read``) or a numpy-like array."""
    if hasattr(source, "read"):
        return source.read(box)
    return np.asarray(source[box.slices])


@dataclass(frozen=True)
class PointSet:
    """Points in voxel coordinates (z, y, x) of a volume: one global set of prompts or annotations.

    ``zyx`` is an ``N×3`` float array (voxel centres are integers). :meth:`inside` routes the set to any
    box — a block, a window, a training crop — in that box's own coordinates, so every box that
    contains a point sees it at the same place whoever asks.
    """

    zyx: np.ndarray

    def __post_init__(self) -> None:
        points = np.asarray(self.zyx, dtype=np.float64).reshape(-1, 3)
        order = np.lexsort((points[:, 2], points[:, 1], points[:, 0]))
        object.__setattr__(self, "zyx", points[order])

    def __len__(self) -> int:
        return len(self.zyx)

    def inside(self, box: Box) -> np.ndarray:
        """The points whose voxel (rounded coordinate) lies in ``box``, relative to ``box.start``."""
        lo = np.searchsorted(self.zyx[:, 0], box.start[0] - 0.5, side="left")
        hi = np.searchsorted(self.zyx[:, 0], box.stop[0] - 0.5, side="left")
        candidates = self.zyx[lo:hi]
        voxel = np.rint(candidates)
        keep = np.all((voxel >= box.start) & (voxel < box.stop), axis=1)
        return candidates[keep] - np.asarray(box.start, dtype=np.float64)

    def check_inside(self, bounds: Box, source: str) -> None:
        """Raise :class:`PointsError` naming ``source`` if any point lies outside ``bounds``."""
        voxel = np.rint(self.zyx)
        outside = ~np.all((voxel >= bounds.start) & (voxel < bounds.stop), axis=1)
        if outside.any():
            first = tuple(float(v) for v in self.zyx[np.argmax(outside)])
            raise PointsError(
                f"{source}: {int(outside.sum())} of {len(self)} points lie outside the volume "
                f"{bounds} (z, y, x), e.g. {first}.",
                "give points as voxel indices z, y, x of this volume (check the axis order and scale).",
            )


def slices_within(distance_nm: float, slice_nm: float) -> int:
    """How many whole slices of ``slice_nm`` fit in ``distance_nm`` (the reach in z of a point
    confirmation: ``adapt.confirm_points_nm``, ``prompts.confirm_nm``)."""
    return int(distance_nm // slice_nm)


def slices_apart(distance_nm: float, slice_nm: float) -> int:
    """The slice offset nearest ``distance_nm`` in slices of ``slice_nm``, at least one (the neighbours a
    persistence check compares with: ``adapt.persistence_nm``)."""
    return max(1, round(distance_nm / slice_nm))
