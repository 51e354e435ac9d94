"""Prompts kept in storage, indexed by place (issue 14, item 3): a block reads exactly the points in its
read box, from the cells of a Neuroglancer precomputed annotation collection that meet the box."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_points import write_precomputed_points
from volseg.geometry import Box, PointSet
from volseg.io.point_index import PointIndex
from volseg.io.points import read_points

VOXEL_NM = (40.0, 4.0, 4.0)
OFFSET = (3, 5, 7)
BOUNDS = Box((0, 0, 0), (20, 300, 200))
CELL = (4, 64, 48)


def random_boxes(rng: np.random.Generator, bounds: Box, count: int) -> list[Box]:
    boxes = []
    for _ in range(count):
        start = rng.integers(bounds.start, bounds.stop)
        stop = rng.integers(start + 1, np.asarray(bounds.stop) + 1)
        boxes.append(Box(tuple(int(v) for v in start), tuple(int(v) for v in stop)))
    return boxes


@pytest.fixture
def points() -> PointSet:
    rng = np.random.default_rng(0)
    whole = np.column_stack([rng.integers(0, s, 400) for s in BOUNDS.stop]).astype(float)
    # a quarter off the voxel centres, some exactly between two voxels (rounded as PointSet.inside rounds)
    whole[:100] += rng.uniform(-0.5, 0.5, (100, 3))
    whole[100:110, 2] += 0.5
    return PointSet(np.clip(whole, 0, np.asarray(BOUNDS.stop) - 1))


def test_a_box_reads_exactly_its_points(tmp_path, points):
    index = PointIndex.create(str(tmp_path / "prompts"), BOUNDS, CELL, VOXEL_NM, OFFSET)
    index.write(points)
    reopened = PointIndex.open(str(tmp_path / "prompts"), VOXEL_NM, OFFSET)
    assert reopened.bounds == BOUNDS and reopened.num_cells == 5 * 5 * 5
    for box in random_boxes(np.random.default_rng(1), BOUNDS, 200):
        expected = points.inside(box) + np.asarray(box.start, float)
        np.testing.assert_allclose(reopened.read(box).zyx, expected, atol=1e-4, err_msg=str(box))
    whole = reopened.read(BOUNDS).zyx
    assert len(whole) == len(points)


def test_a_block_core_reads_its_own_cell_only(tmp_path, points):
    index = PointIndex.create(str(tmp_path / "prompts"), BOUNDS, CELL, VOXEL_NM, OFFSET)
    assert index.keys(Box((4, 64, 96), (8, 128, 144))) == ["spatial0/2_1_1"]
    assert len(index.keys(Box((3, 60, 90), (9, 130, 150)))) == 3 * 3 * 3  # a core and its halo


def test_neuroglancer_reads_the_collection(tmp_path, points):
    """The collection volseg writes reads back through the general precomputed reader (Neuroglancer's
    format: info, one spatial level, count · float32 x, y, z · uint64 ids per cell)."""
    index = PointIndex.create(str(tmp_path / "prompts"), BOUNDS, CELL, VOXEL_NM, OFFSET)
    index.write(points)
    every = read_points(str(tmp_path / "prompts"), VOXEL_NM, OFFSET)
    np.testing.assert_allclose(every.zyx, points.zyx, atol=1e-4)
    assert (tmp_path / "prompts" / "spatial0").is_dir() and len(list((tmp_path / "prompts" / "spatial0").iterdir())) > 1


def test_a_multi_level_collection_from_elsewhere_routes_by_box(tmp_path):
    """A collection written by another tool (two spatial levels, properties, nm-scaled dimensions): each
    box gets the points of the whole collection that lie in it, each once."""
    levels = [{(0, 0, 0): [(1, [10.5, 20.5, 2.5])]},
              {(0, 0, 0): [(2, [3.5, 3.5, 0.5]), (3, [30.5, 5.5, 1.5])],
               (1, 1, 0): [(4, [40.5, 60.5, 6.5]), (1, [10.5, 20.5, 2.5])]}]
    write_precomputed_points(tmp_path / "points", levels, [[1, 1, 1], [2, 2, 1]])
    voxel = (40.0, 4.0, 4.0)
    whole = read_points(str(tmp_path / "points"), voxel)
    index = PointIndex.open(str(tmp_path / "points"), voxel)
    assert len(whole) == 4
    for box in random_boxes(np.random.default_rng(2), Box((0, 0, 0), (8, 64, 64)), 100):
        np.testing.assert_allclose(index.read(box).zyx, whole.inside(box) + np.asarray(box.start, float), atol=1e-4)
