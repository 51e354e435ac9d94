"""Ortho-plane inference: windows laid in the xz and yz planes reach the 2D model as its slices (prompts
too), and the planes' mean stays blockwise == whole-volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volseg.errors import ConfigError
from volseg.geometry import BlockGrid, Box, PointSet
from volseg.inference.blockwise import predict_box
from volseg.inference.planes import PLANE_SETS, PlanePredictor, check_planes, plane_grid, planes_read_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.models import ModelSpec, build_model, input_contract


class SliceProbe:
    """A 2D "model" over ``B×1×R×C`` slices: probability = the slice's grey values / 255; density = the
    column index, plus 100 at every prompt's pixel. So the output shows which volume axis became which
    slice axis, and where the prompts landed."""

    num_classes = 1
    window = (1, 8, 8)

    def predict(self, windows, prompts=None):
        assert windows.shape[1] == 1  # a model slice, whatever plane the window lies in
        out = np.zeros((len(windows), 2, *windows.shape[1:]), np.float32)
        out[:, 0] = windows / 255.0
        out[:, 1] = np.arange(windows.shape[-1], dtype=np.float32)
        for i, points in enumerate(prompts or []):
            for z, r, c in np.asarray(points).reshape(-1, 3).astype(int):
                assert z == 0
                out[i, 1, 0, r, c] += 100
        return out


@pytest.mark.parametrize(("plane", "column_axis", "shape"), [("xz", 2, (8, 1, 8)), ("yz", 1, (8, 8, 1))])
def test_a_plane_window_reaches_the_model_as_its_slice_and_comes_back(plane, column_axis, shape):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, size=(3, *shape)).astype(np.float32)
    prompts = [np.array([[5, 0, 2]]) if plane == "xz" else np.array([[5, 2, 0]]), np.zeros((0, 3)), np.zeros((0, 3))]
    out = PlanePredictor(SliceProbe(), plane).predict(windows, prompts)
    assert out.shape == (3, 2, *shape)
    assert np.array_equal(out[:, 0], windows / 255.0)  # every voxel back where it was read
    columns = np.broadcast_to(np.arange(8).reshape([-1 if a == column_axis else 1 for a in range(3)]), shape)
    expected = np.broadcast_to(columns, (3, *shape)).astype(np.float32).copy()
    expected[0][tuple(prompts[0][0])] += 100  # the prompt came back at its own voxel
    assert np.array_equal(out[:, 1], expected)
    assert PlanePredictor(SliceProbe(), plane).window == shape


def test_plane_grids_lay_the_window_and_stride_in_their_plane():
    windows = WindowGrid((20, 30, 40), (1, 8, 8), (1, 6, 5))
    assert plane_grid(windows, "xy") is windows
    assert (plane_grid(windows, "xz").window, plane_grid(windows, "xz").stride) == ((8, 1, 8), (6, 1, 5))
    assert (plane_grid(windows, "yz").window, plane_grid(windows, "yz").stride) == ((8, 8, 1), (6, 5, 1))
    core = Box((10, 10, 10), (12, 14, 16))
    box = planes_read_box(windows, core, PLANE_SETS["ortho"])
    for plane in PLANE_SETS["ortho"]:
        assert box.contains(plane_grid(windows, plane).read_box(core))
    assert box.shape[0] > core.shape[0]  # the xz and yz windows reach above and below the block


def test_ortho_blockwise_equals_whole_volume_with_prompts():
    spec = ModelSpec("promptdas", options={"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2,
                                           "decoder_mlp": 32, "projection_dim": 8})
    shape, window, stride = (19, 26, 23), (1, 16, 16), (1, 10, 9)
    torch.manual_seed(0)
    predictor = TorchPredictor(build_model(spec), input_contract(spec), window, 1, batch_size=7)
    volume = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    points = PointSet(np.array([[3, 10, 12], [9, 20, 3], [15, 5, 18]], float))
    windows = WindowGrid(shape, window, stride)
    planes = PLANE_SETS["ortho"]
    whole = predict_box(volume, predictor, windows, Box.from_shape(shape), points=points, planes=planes)
    grid = BlockGrid(Box.from_shape(shape), (7, 11, 9), 0, Box.from_shape(shape))
    blocks = np.full_like(whole, np.nan)
    for block in grid:
        blocks[(slice(None), *block.core.slices)] = predict_box(volume, predictor, windows, block.core,
                                                                points=points, planes=planes)
    assert np.abs(blocks - whole).max() <= 1e-5
    # the planes' mean, each plane as a run of its own
    each = [predict_box(volume, predictor, windows, Box.from_shape(shape), points=points, planes=(p,))
            for p in planes]
    assert np.abs(whole - sum(each) / 3).max() <= 1e-5
    assert np.abs(each[0] - each[1]).max() > 1e-3  # the planes really see different images


def test_ortho_is_refused_where_it_cannot_mean_what_it_says():
    check_planes("ortho", (1, 64, 64), (5.0, 5.0, 5.0), 2, "lucchi.zarr")  # FIB-SEM: fine
    check_planes("xy", (1, 64, 32), (50.0, 4.6, 4.6), 3, "vnc.zarr")  # xy: nothing to check
    with pytest.raises(ConfigError, match=r"stretched 10\.9×.*inference.planes: xy"):
        check_planes("ortho", (1, 64, 64), (50.0, 4.6, 4.6), 2, "vnc.zarr")
    with pytest.raises(ConfigError, match="square slice"):
        check_planes("ortho", (1, 64, 32), (5.0, 5.0, 5.0), 2, "lucchi.zarr")
    with pytest.raises(ConfigError, match="3D"):
        check_planes("ortho", (8, 64, 64), (5.0, 5.0, 5.0), 3, "lucchi.zarr")
