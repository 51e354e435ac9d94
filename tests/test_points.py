"""Point files and global prompt routing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from volseg.errors import PointsError
from volseg.geometry import Box, PointSet
from volseg.io.points import read_points


def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text("3,10,20\n4,11,21\n")
    (tmp_path / "b.csv").write_text("x,id,y,z\n20,7,10,3\n21,8,11,4\n")
    for name in ("a.csv", "b.csv"):
        np.testing.assert_array_equal(read_points(tmp_path / name).zyx, [[3, 10, 20], [4, 11, 21]])


def test_neuroglancer_layer_in_physical_units(tmp_path):
    layer = {
        "type": "annotation",
        "name": "clicks",
        "annotations": [{"type": "point", "id": "1", "point": [40.5, 20.5, 3.5]},
                        {"type": "line", "id": "2", "pointA": [0, 0, 0], "pointB": [1, 1, 1]}],
    }
    state = {"dimensions": {"x": [4e-9, "m"], "y": [4e-9, "m"], "z": [40e-9, "m"]}, "layers": [layer]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    # same voxel size as the viewer: voxel corners at integers → centres at .5 → indices
    np.testing.assert_allclose(read_points(tmp_path / "state.json", (40, 4, 4)).zyx, [[3, 20, 40]])
    # a volume at twice the voxel size and an offset of (1, 2, 3) voxels
    zyx = read_points(tmp_path / "state.json", (80, 8, 8), (1, 2, 3)).zyx
    np.testing.assert_allclose(zyx, [[3.5 / 2 - 0.5 - 1, 20.5 / 2 - 0.5 - 2, 40.5 / 2 - 0.5 - 3]])
    # a bare layer without dimensions is in this volume's voxels
    (tmp_path / "layer.json").write_text(json.dumps(layer))
    np.testing.assert_allclose(read_points(tmp_path / "layer.json").zyx, [[3, 20, 40]])


def test_points_outside_the_volume_name_the_file(tmp_path):
    (tmp_path / "p.csv").write_text("z,y,x\n1,1,1\n9,1,1\n1,50,1\n")
    with pytest.raises(PointsError) as error:
        read_points(tmp_path / "p.csv", bounds=Box.from_shape((5, 40, 40)))
    assert "p.csv" in str(error.value) and "2 of 3 points" in str(error.value)


@pytest.mark.parametrize(("text", "match"), [("z,y\n1,2\n", "no column x"), ("1,2,a\n", "three numbers")])
def test_malformed_csv(tmp_path, text, match):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(PointsError, match=match):
        read_points(tmp_path / "p.csv")


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "p.txt").write_text("1,2,3")
    with pytest.raises(PointsError, match=r"\.csv and \.json"):
        read_points(tmp_path / "p.txt")
    with pytest.raises(PointsError, match="does not exist"):
        read_points(tmp_path / "none.csv")


def test_routing_gives_each_box_its_points_in_its_own_coordinates():
    points = PointSet(np.array([[2, 5, 5], [2, 9, 9], [3, 5, 5], [7, 1, 1]]))
    np.testing.assert_array_equal(points.inside(Box((2, 4, 4), (3, 10, 10))), [[0, 1, 1], [0, 5, 5]])
    assert len(points.inside(Box((4, 0, 0), (7, 10, 10)))) == 0
    np.testing.assert_array_equal(points.inside(Box((7, 0, 0), (8, 2, 2))), [[0, 1, 1]])


def write_precomputed_points(root, levels: list[dict[tuple[int, int, int], list[tuple[int, list[float]]]]],
                             grid_shapes: list[list[int]]) -> None:
    """A precomputed point-annotation collection written by hand from Neuroglancer's spec: one float32
    and one uint8 property (so each record is 12 + 4 + 1 bytes, padded to 20), unsharded spatial levels."""
    root.mkdir()
    info = {"@type": "neuroglancer_annotations_v1",
            "dimensions": {"x": [4e-9, "m"], "y": [4e-9, "m"], "z": [40e-9, "m"]},
            "lower_bound": [0, 0, 0], "upper_bound": [64, 64, 8], "annotation_type": "POINT",
            "properties": [{"id": "score", "type": "float32"}, {"id": "kind", "type": "uint8"}],
            "relationships": [], "by_id": {"key": "by_id"},
            "spatial": [{"key": f"level{i}", "grid_shape": shape, "chunk_size": [64 / shape[0], 64 / shape[1], 8],
                         "limit": 2} for i, shape in enumerate(grid_shapes)]}
    (root / "info").write_text(json.dumps(info))
    for i, cells in enumerate(levels):
        (root / f"level{i}").mkdir()
        for cell, entries in cells.items():
            body = b"".join(np.asarray(xyz, "<f4").tobytes() + np.float32(0.5).tobytes() + b"\x07" + b"\0" * 3
                            for _, xyz in entries)
            ids = np.asarray([key for key, _ in entries], "<u8").tobytes()
            (root / f"level{i}" / "_".join(map(str, cell))).write_bytes(
                np.uint64(len(entries)).tobytes() + body + ids)


def test_precomputed_point_annotations_from_disk_and_over_http(tmp_path):
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    levels = [{(0, 0, 0): [(5, [40.5, 20.5, 3.5]), (9, [2.5, 60.5, 0.5])]},
              {(1, 0, 0): [(11, [33.5, 1.5, 7.5])], (0, 1, 0): [(12, [10.5, 40.5, 2.5]), (9, [2.5, 60.5, 0.5])]}]
    write_precomputed_points(tmp_path / "points", levels, [[1, 1, 1], [2, 2, 1]])
    expected = [[0, 60, 2], [2, 40, 10], [3, 20, 40], [7, 1, 33]]    # z, y, x voxel indices; id 9 once
    np.testing.assert_allclose(read_points(tmp_path / "points", (40, 4, 4)).zyx, expected)

    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"precomputed://http://127.0.0.1:{server.server_address[1]}/points"
        np.testing.assert_allclose(read_points(url, (40, 4, 4)).zyx, expected)
        with pytest.raises(PointsError, match="outside the volume"):
            read_points(url, (40, 4, 4), bounds=Box((0, 0, 0), (4, 64, 64)))
    finally:
        server.shutdown()
        server.server_close()


def test_a_directory_that_is_no_annotation_collection_is_refused(tmp_path):
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "info").write_text(json.dumps({"type": "image", "scales": []}))
    with pytest.raises(PointsError, match="not a point annotation collection"):
        read_points(tmp_path / "vol")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PointsError, match="no info file"):
        read_points(tmp_path / "empty")
