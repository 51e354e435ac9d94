"""Point sets in storage, indexed by place: Neuroglancer precomputed point annotations.

A run's prompts can be far too many for the driver to hold and ship to every actor (10⁷ clicked or
detected centres in a large volume). They are kept in a precomputed annotation collection instead, and
each block reads only the cells of its spatial index that meet the box it reads. The same collection is
an annotation layer Neuroglancer displays.

:class:`PointIndex` reads any POINT collection (unsharded spatial levels; every level's cells that meet a
box are read, points repeated across cells are kept once by id). volseg writes its own with one spatial
level whose cells are a run's block cores (or a multiple of them)::

    info                     "@type": "neuroglancer_annotations_v1", dimensions x, y, z in metres (the
                             volume's voxel size), lower_bound at the corner of the first cell
    spatial0/<ix>_<iy>_<iz>  uint64le count · count × float32le (x, y, z) · count × uint64le id

Coordinates follow Neuroglancer's convention (voxel *corners* at integers, plus the volume's voxel
offset): voxel index ``i`` is stored as ``i + 0.5 + offset``, exact in float32 for coordinates below
2²³. An empty cell has no key. Writing a cell replaces it, so a block that runs again rewrites the same
bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.errors import PointsError
from volseg.geometry import Box, Coord, PointSet
from volseg.io.points import annotation_info, decode_points, record_bytes, to_nm, to_voxels
from volseg.io.storage import open_kvstore, read_keys, storage_error, wait
from volseg.io.urls import VolumeURL, parse_url

LEVEL = "spatial0"


@dataclass
class PointIndex:
    """A precomputed point-annotation collection at ``url``, read as voxel indices of a volume of
    ``voxel_size_nm`` and ``voxel_offset`` (pickles as its URL and info)."""

    url: VolumeURL
    info: dict[str, Any]
    voxel_size_nm: tuple[float, float, float]
    voxel_offset: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def open(cls, url: str | VolumeURL, voxel_size_nm: Sequence[float],
             voxel_offset: Sequence[int] = (0, 0, 0)) -> PointIndex:
        location = parse_url(url) if isinstance(url, str) else url
        raw = read_keys(location, ["info"])["info"]
        info = annotation_info(location.url, raw)
        for level in info["spatial"]:
            if "sharding" in level:
                raise PointsError(f"{location.url}: spatial index level {level['key']!r} is sharded; volseg reads "
                                  "unsharded precomputed annotations.", "export the annotations unsharded.")
        return cls(location, info, _triple(voxel_size_nm, float), _triple(voxel_offset, int))

    @classmethod
    def create(cls, url: str | VolumeURL, bounds: Box, cell_shape: Coord, voxel_size_nm: Sequence[float],
               voxel_offset: Sequence[int] = (0, 0, 0)) -> PointIndex:
        """Write the ``info`` of an empty single-level collection over ``bounds`` (voxels), cut into cells of
        ``cell_shape`` from ``bounds.start``, and return it."""
        location = parse_url(url) if isinstance(url, str) else url
        size, offset = _triple(voxel_size_nm, float), _triple(voxel_offset, int)
        grid = [-(-extent // cell) for extent, cell in zip(bounds.shape, cell_shape, strict=True)]
        corner = [start + o for start, o in zip(bounds.start, offset, strict=True)]
        info = {
            "@type": "neuroglancer_annotations_v1",
            "dimensions": {axis: [size[i] * 1e-9, "m"] for axis, i in (("x", 2), ("y", 1), ("z", 0))},
            "lower_bound": corner[::-1],
            "upper_bound": [c + e for c, e in zip(corner, bounds.shape, strict=True)][::-1],
            "annotation_type": "POINT",
            "properties": [],
            "relationships": [],
            "by_id": {"key": "by_id"},
            "spatial": [{"key": LEVEL, "grid_shape": grid[::-1], "chunk_size": list(cell_shape)[::-1],
                         "limit": int(np.prod(cell_shape, dtype=np.int64))}],
        }
        _write(location, {"info": json.dumps(info, indent=1).encode()})
        return cls(location, info, size, offset)

    @property
    def bounds(self) -> Box:
        """The voxels the collection covers (from its lower and upper bounds)."""
        start = self._voxel(self.info["lower_bound"], np.floor)
        stop = self._voxel(self.info["upper_bound"], np.ceil)
        return Box(start, stop)

    @property
    def num_cells(self) -> int:
        return sum(int(np.prod(level["grid_shape"], dtype=np.int64)) for level in self.info["spatial"])

    # -- reading --------------------------------------------------------------------------------------
    def keys(self, box: Box) -> list[str]:
        """The keys of every cell, on every level, that may hold a point whose voxel lies in ``box``."""
        low, high = self._corner(box.start), self._corner(box.stop)  # the voxels' extent
        keys = []
        for level in self.info["spatial"]:
            lower = np.asarray(self.info["lower_bound"], float)
            chunk = np.asarray(level["chunk_size"], float)
            first = np.maximum(np.floor((low - lower) / chunk), 0).astype(int)
            last = np.minimum(np.ceil((high - lower) / chunk), level["grid_shape"]).astype(int)
            cells = itertools.product(*(range(a, b) for a, b in zip(first, last, strict=True)))
            keys += [f"{level['key']}/{'_'.join(map(str, cell))}" for cell in cells]
        return keys

    def read(self, box: Box) -> PointSet:
        """The points whose voxel (rounded index) lies in ``box``, in volume voxel indices."""
        points: dict[int, np.ndarray] = {}
        record = record_bytes(self.info)
        for data in read_keys(self.url, self.keys(box)).values():
            if data:
                points.update(decode_points(bytes(data), 3, record))
        coords = np.stack([points[k] for k in sorted(points)]) if points else np.zeros((0, 3))
        found = to_voxels(coords.astype(np.float64), self.info["dimensions"], self.voxel_size_nm, self.voxel_offset,
                          self.url.url)
        return PointSet(found.inside(box) + np.asarray(box.start, dtype=np.float64))

    def _corner(self, voxel: Sequence[int]) -> np.ndarray:
        """The low corner of voxel (z, y, x) in this collection's coordinates (in the order of its
        dimensions). A point is in the voxel whose extent holds it; rounding errors of the units only
        ever add a cell to read."""
        dimensions = self.info["dimensions"]
        zyx = np.asarray(voxel, float) + np.asarray(self.voxel_offset, float)
        nm = dict(zip("zyx", zyx * np.asarray(self.voxel_size_nm), strict=True))
        return np.asarray([nm[axis] / to_nm(dimensions[axis], self.url.url) for axis in dimensions])

    def _voxel(self, coordinate: Sequence[float], rounding: Any) -> tuple[int, ...]:
        """A corner in this collection's coordinates → voxel index (z, y, x), rounded by ``rounding``."""
        dimensions = self.info["dimensions"]
        nm = {axis: c * to_nm(dimensions[axis], self.url.url) for axis, c in zip(dimensions, coordinate, strict=True)}
        zyx = np.asarray([nm[axis] for axis in "zyx"]) / np.asarray(self.voxel_size_nm) - np.asarray(self.voxel_offset)
        return tuple(int(v) for v in rounding(np.round(zyx, 6)))

    # -- writing (single-level collections made by :meth:`create`) ----------------------------------------
    def cells_of(self, voxels: np.ndarray) -> np.ndarray:
        """The (z, y, x) cell index of each voxel (an ``N×3`` array of voxel indices)."""
        level = self.info["spatial"][0]
        start = np.asarray(self.info["lower_bound"][::-1]) - np.asarray(self.voxel_offset)
        return (np.asarray(voxels).reshape(-1, 3) - start) // np.asarray(level["chunk_size"][::-1])

    def cell_key(self, cell: Sequence[int]) -> str:
        """The key of cell (z, y, x) (keys name cells in the x, y, z order of the dimensions)."""
        return f"{self.info['spatial'][0]['key']}/{'_'.join(str(int(c)) for c in cell[::-1])}"

    def encode(self, zyx: np.ndarray, ids: np.ndarray) -> bytes:
        """One cell's bytes: points (voxel indices) and their ids."""
        xyz = (np.asarray(zyx, np.float64) + 0.5 + np.asarray(self.voxel_offset))[:, ::-1]
        return (np.uint64(len(zyx)).astype("<u8").tobytes() + xyz.astype("<f4").tobytes()
                + np.asarray(ids, "<u8").tobytes())

    def write_cell(self, voxel: Sequence[int], zyx: np.ndarray, ids: np.ndarray) -> Any:
        """Start writing the points of the cell holding ``voxel`` (all of them, replacing the cell); a
        future that resolves once durable."""
        key = self.cell_key(self.cells_of(np.asarray(voxel))[0])
        return open_kvstore(self.url).write(key, self.encode(zyx, ids))

    def write(self, points: PointSet) -> None:
        """Write every point, grouped by cell (ids: their rank in ``points``)."""
        if len(points) == 0:
            return
        cells, which = np.unique(self.cells_of(np.rint(points.zyx).astype(np.int64)), axis=0, return_inverse=True)
        order = np.argsort(which.ravel(), kind="stable")
        bounds = np.searchsorted(which.ravel()[order], np.arange(len(cells) + 1))
        _write(self.url, {self.cell_key(cell): self.encode(points.zyx[rows], rows)
                          for cell, rows in zip(cells, np.split(order, bounds[1:-1]), strict=True)})


def _write(url: VolumeURL, items: dict[str, bytes]) -> None:
    """Write ``items`` concurrently, each waiting at most the storage timeout; one line on failure."""
    try:
        store = open_kvstore(url)
        for pending in [store.write(key, value) for key, value in items.items()]:
            wait(pending, url)
    except ValueError as error:
        raise storage_error(error, url, f"Could not write point annotations under {url.url}", PointsError,
                            "check that the storage is writable.") from error


def _triple(values: Sequence[Any], kind: type) -> tuple[Any, Any, Any]:
    a, b, c = (kind(v) for v in values)
    return a, b, c
