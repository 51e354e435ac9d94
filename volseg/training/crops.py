"""Random crops read straight from storage, with the point prompts that fall inside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from volseg.errors import ConfigError
from volseg.geometry import Box, Coord, PointSet, read_box
from volseg.intensity import measure_intensity


@dataclass(frozen=True)
class Crop:
    """One training crop.

    ``raw`` ``Z×Y×X`` as stored; ``labels`` likewise (instance ids or a mask) or None; ``points_zyx``
    ``N×3`` float, the points of the sampler's :class:`PointSet` inside ``box``, in crop coordinates
    (``N = 0`` when there are none or the sampler has no points); ``box`` where the crop was read.
    ``reach`` (−1: none) and ``nearby_zyx``: the points within ``reach`` slices above or below the crop,
    over its y, x extent, in crop coordinates (z may lie outside ``0 … Z−1``). ``neighbours`` (or None):
    ``2×Z×Y×X``, the raw slices ``k`` below (``[0]``) and ``k`` above (``[1]``) each crop slice, for a
    sampler's ``neighbour_slices`` k; ``neighbour_present`` ``2×Z`` says which lie inside the volume (the
    others are zeros).
    """

    raw: np.ndarray
    labels: np.ndarray | None
    points_zyx: np.ndarray
    box: Box
    reach: int = -1
    nearby_zyx: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    neighbours: np.ndarray | None = None
    neighbour_present: np.ndarray | None = None

    def points_in_slice(self, z: int) -> np.ndarray:
        """The ``M×2`` (y, x) points of crop slice ``z`` (points whose rounded z is ``z``)."""
        on = np.rint(self.points_zyx[:, 0]) == z
        return self.points_zyx[on, 1:]

    def points_near_slice(self, z: int) -> np.ndarray:
        """The ``M×2`` (y, x) points of the slices within ``reach`` of crop slice ``z``, projected onto it."""
        near = np.abs(np.rint(self.nearby_zyx[:, 0]) - z) <= self.reach
        return self.nearby_zyx[near, 1:]


@dataclass
class CropSampler:
    """Draws crops of ``crop`` voxels (z, y, x) at uniformly random positions of ``raw``.

    ``labels``, when given, is read over the same box; ``points`` (a global :class:`PointSet` of the
    volume, e.g. WDA's sparse annotations) is routed to each crop. Each sampler owns a random stream
    (``seed``); :meth:`box` also draws from a stream it is given (the per-crop streams of data-parallel
    training, :mod:`volseg.training.replicas`). ``percentiles`` (a model's input contract): ``intensity``
    is then the volume's robust grey-value range (:mod:`volseg.intensity`), to normalise its crops with,
    as inference normalises the volume's blocks; else None. ``reach`` (≥ 0): each crop also carries the
    points within ``reach`` slices of it (:attr:`Crop.nearby_zyx`, WDA's point confirmation).
    ``neighbour_slices`` (≥ 1): each crop also carries the raw slices that many below and above each of its
    slices (:attr:`Crop.neighbours`, the persistence of pseudo-labels).
    """

    raw: Any
    labels: Any | None
    crop: Coord
    seed: int = 0
    points: PointSet | None = None
    percentiles: tuple[float, float] | None = None
    point_share: float = 0.0
    reach: int = -1
    neighbour_slices: int = 0

    def __post_init__(self) -> None:
        self.crop = tuple(int(c) for c in self.crop)
        self.rng = np.random.default_rng(self.seed)
        shape = tuple(self.raw.shape[-3:])
        if self.labels is not None and tuple(self.labels.shape[-3:]) != shape:
            raise ConfigError(
                f"train.labels has shape {tuple(self.labels.shape)} but train.raw has {shape}; "
                "labels must cover the raw volume voxel for voxel.",
                "point train.labels at the label volume of the same dataset.",
            )
        if any(c > s for c, s in zip(self.crop, shape, strict=True)):
            raise ConfigError(f"train.crop {self.crop} is larger than the volume {shape}.",
                              "choose a crop that fits inside the volume on every axis.")
        self.shape = shape
        self.intensity = None if self.percentiles is None else measure_intensity(self.raw, self.percentiles).bounds

    def box(self, rng: np.random.Generator | None = None, anywhere: bool = False) -> Box:
        """A random crop box, drawn from ``rng`` (default: the sampler's own stream): uniformly placed,
        or, with probability ``point_share`` (when the sampler has points and not ``anywhere``), placed
        to hold a uniformly chosen point at a uniformly random position of the crop (shifted back inside
        the volume at its edges): sparse annotations are few, and a crop drawn anywhere rarely holds one."""
        rng = self.rng if rng is None else rng
        near_point = not anywhere and self.point_share > 0 and self.points is not None and len(self.points) > 0
        if near_point and rng.random() < self.point_share:
            point = np.rint(self.points.zyx[int(rng.integers(len(self.points)))]).astype(int)
            start = [int(np.clip(p - rng.integers(0, c), 0, s - c))
                     for p, s, c in zip(point, self.shape, self.crop, strict=True)]
        else:
            start = [int(rng.integers(0, s - c + 1)) for s, c in zip(self.shape, self.crop, strict=True)]
        return Box.from_shape(self.crop, start)

    def crop_at(self, box: Box) -> Crop:
        """The crop of ``box`` (raw, labels, points in box coordinates; neighbour slices, nearby points)."""
        raw = read_box(self.raw, box)
        labels = None if self.labels is None else read_box(self.labels, box)
        points = np.zeros((0, 3)) if self.points is None else self.points.inside(box)
        reach, nearby = -1, np.zeros((0, 3))
        if self.reach >= 0 and self.points is not None:
            reach, grow = self.reach, (self.reach, 0, 0)
            nearby = self.points.inside(box.grow(grow)) - np.asarray(grow, dtype=np.float64)
        neighbours = present = None
        if self.neighbour_slices > 0:
            neighbours, present = self.neighbours_of(box, raw.dtype)
        return Crop(raw, labels, points, box, reach, nearby, neighbours, present)

    def neighbours_of(self, box: Box, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The raw slices ``neighbour_slices`` below and above each slice of ``box``: ``2×Z×Y×X`` (zeros
        outside the volume) and which are inside, ``2×Z`` (one read per side, of the part inside)."""
        k, depth = self.neighbour_slices, box.shape[0]
        bounds = Box((0, 0, 0), self.shape)
        neighbours = np.zeros((2, *box.shape), dtype)
        present = np.zeros((2, depth), bool)
        for side, dz in enumerate((-k, k)):
            shifted = box.shift((dz, 0, 0))
            inside = shifted.intersect(bounds)
            if inside.empty:
                continue
            rows = slice(inside.start[0] - shifted.start[0], inside.stop[0] - shifted.start[0])
            neighbours[side, rows] = read_box(self.raw, inside)
            present[side, rows] = True
        return neighbours, present

    def crops(self, n: int) -> list[Crop]:
        """``n`` crops at random positions."""
        return [self.crop_at(self.box()) for _ in range(n)]

    def sample(self) -> tuple[np.ndarray, np.ndarray | None]:
        crop = self.crop_at(self.box())
        return crop.raw, crop.labels

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` crops stacked: raw ``n×Z×Y×X`` and labels likewise (or None)."""
        pairs = [self.sample() for _ in range(n)]
        raw = np.stack([p[0] for p in pairs])
        labels = None if self.labels is None else np.stack([p[1] for p in pairs])
        return raw, labels
