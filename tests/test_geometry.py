"""Box and BlockGrid: cores tile the roi exactly, halos are clipped, ids are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from volseg.errors import AlignmentError
from volseg.geometry import BlockGrid, Box


def test_box_algebra():
    a = Box((0, 2, 4), (5, 10, 9))
    assert a.shape == (5, 8, 5) and a.size == 200
    assert a.intersect(Box((3, 0, 0), (9, 4, 6))) == Box((3, 2, 4), (5, 4, 6))
    assert a.intersect(Box((6, 0, 0), (9, 4, 6))).empty
    assert a.grow(1) == Box((-1, 1, 3), (6, 11, 10))
    assert a.grow((0, 1, 2), (3, 0, 0)) == Box((0, 1, 2), (8, 10, 9))
    assert a.union(Box((9, 9, 9), (10, 11, 12))) == Box((0, 2, 4), (10, 11, 12))
    assert a.contains((4, 9, 8)) and not a.contains((5, 9, 8))
    assert Box((1, 3, 5), (2, 4, 6)).relative_to(a) == (slice(1, 2), slice(1, 2), slice(1, 2))
    assert Box.from_json(a.to_json()) == a
    with pytest.raises(ValueError):
        Box((0, 0, 0), (20, 1, 1)).relative_to(a)


def test_cores_tile_the_roi_exactly_once():
    bounds = Box.from_shape((13, 50, 37))
    roi = Box((4, 10, 0), (13, 50, 37))
    grid = BlockGrid.aligned(roi, (4, 20, 10), 3, bounds, (2, 10, 5))
    cover = np.zeros(bounds.shape, np.int32)
    for block in grid:
        cover[block.core.slices] += 1
        assert block.halo_box == block.core.grow(3).intersect(bounds)
        assert bounds.contains(block.halo_box) and block.halo_box.contains(block.core)
    assert (cover[roi.slices] == 1).all()
    assert cover.sum() == roi.size
    assert grid.grid_shape == (3, 2, 4) and len(grid) == 24


def test_block_ids_are_deterministic_and_invertible():
    bounds = Box.from_shape((9, 9, 9))
    grid = BlockGrid(bounds, (2, 4, 3), 1, bounds)
    blocks = list(grid)
    assert [b.id for b in blocks] == list(range(len(blocks)))
    for b in blocks:
        assert grid.block(b.id) == b
        assert grid.block_id(b.index) == b.id
    assert BlockGrid(bounds, (2, 4, 3), 1, bounds).block(17) == grid.block(17)


def test_halo_is_clipped_to_the_volume_not_the_roi():
    bounds = Box.from_shape((8, 8, 8))
    grid = BlockGrid(Box((2, 2, 2), (6, 6, 6)), (4, 4, 4), 3, bounds)
    (block,) = list(grid)
    assert block.halo_box == bounds


@pytest.mark.parametrize(
    ("roi", "core", "chunk", "message"),
    [
        (Box.from_shape((16, 64, 64)), (8, 48, 64), (8, 32, 32), "axis y"),
        (Box((0, 8, 0), (16, 64, 64)), (8, 32, 32), (8, 32, 32), "region of interest"),
        (Box((0, 0, 0), (16, 40, 64)), (8, 32, 32), (8, 32, 32), "region of interest"),
    ],
)
def test_misaligned_cores_are_refused_with_the_fix(roi, core, chunk, message):
    with pytest.raises(AlignmentError) as error:
        BlockGrid.aligned(roi, core, 0, Box.from_shape((16, 64, 64)), chunk)
    assert message in str(error.value) and "Fix:" in str(error.value)


def test_roi_may_end_on_the_volume_edge():
    bounds = Box.from_shape((10, 70, 70))
    grid = BlockGrid.aligned(bounds, (8, 64, 64), 0, bounds, (4, 32, 32))
    assert grid.grid_shape == (2, 2, 2)
    assert grid.block(grid.num_blocks - 1).core == Box((8, 64, 64), (10, 70, 70))
