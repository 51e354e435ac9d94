"""The central invariant: blockwise prediction equals one whole-volume pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import CNN_PROMPTDAS
from volseg.geometry import BlockGrid, Box
from volseg.inference.blend import window_weights
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid, axis_origins
from volseg.models import ModelSpec, build_model, input_contract


def make_predictor(spec: ModelSpec, window, seed: int = 0) -> TorchPredictor:
    torch.manual_seed(seed)
    model = build_model(spec)
    return TorchPredictor(model, input_contract(spec), window, spec.num_classes, batch_size=5)


def blockwise(volume, predictor, windows, core_shape, blend="cosine"):
    shape = volume.shape
    grid = BlockGrid(Box.from_shape(shape), core_shape, 0, Box.from_shape(shape))
    out = np.full((predictor.num_classes + 1, *shape), np.nan, dtype=np.float32)
    for block in grid:
        out[(slice(None), *block.core.slices)] = predict_box(volume, predictor, windows, block.core, blend)
    return out


CASES = [
    # (volume shape, model spec, window, stride, block core): odd shapes, blocks smaller than a window,
    # a z axis shorter than a 3D window, strides that do not divide the volume.
    ((5, 37, 41), ModelSpec("convnet", options={"depth": 4}), (1, 16, 12), (1, 11, 7), (2, 9, 13)),
    ((3, 50, 29), ModelSpec("unet", options={"width": 4, "levels": 2}), (1, 16, 16), (1, 10, 12), (3, 7, 29)),
    ((7, 23, 31), ModelSpec("convnet", num_classes=2, options={"dims": 3}), (4, 12, 10), (3, 5, 7), (2, 5, 6)),
    ((3, 19, 22), ModelSpec("convnet", options={"dims": 3}), (8, 8, 8), (4, 8, 5), (1, 4, 9)),
    # Prompt-DAS whose CNN encoder runs to stride 32, on windows that are no multiple of 32
    ((2, 61, 55), ModelSpec("promptdas", options={**CNN_PROMPTDAS.options, "encoder_stride": 32}),
     (1, 40, 40), (1, 24, 28), (2, 17, 23)),
    # Prompt-DAS with the U-Net encoder and head (InstanceNorm, full-resolution levels), windows no multiple of 16
    ((2, 61, 55), ModelSpec("promptdas", options={**CNN_PROMPTDAS.options, "encoder": "unet"}),
     (1, 40, 40), (1, 24, 28), (2, 17, 23)),
]


@pytest.mark.parametrize(("shape", "spec", "window", "stride", "core"), CASES)
def test_blockwise_equals_whole_volume(shape, spec, window, stride, core):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, size=shape, dtype=np.uint8)
    predictor = make_predictor(spec, window)
    windows = WindowGrid(shape, window, stride)
    whole = predict_box(volume, predictor, windows, Box.from_shape(shape))
    blocks = blockwise(volume, predictor, windows, core)
    assert not np.isnan(blocks).any()
    assert np.abs(blocks - whole).max() <= 1e-5
    # the blend is not trivially constant: predictions really vary over the volume
    assert whole[0].std() > 1e-3


def test_blend_is_a_partition_of_unity_at_faces():
    # A predictor that outputs 1 everywhere must blend to exactly 1 everywhere, faces included.
    class Ones:
        window = (1, 9, 6)
        num_classes = 1

        def predict(self, windows):
            return np.ones((len(windows), 2, *windows.shape[1:]), dtype=np.float32)

    shape = (2, 20, 17)
    out = predict_box(np.zeros(shape, np.uint8), Ones(), WindowGrid(shape, (1, 9, 6), (1, 4, 5)),
                      Box.from_shape(shape))
    np.testing.assert_allclose(out, 1.0, rtol=0, atol=1e-6)


def test_window_origins_are_global_and_inside_the_volume():
    np.testing.assert_array_equal(axis_origins(37, 16, 12), [0, 12, 21])
    np.testing.assert_array_equal(axis_origins(16, 16, 12), [0])
    np.testing.assert_array_equal(axis_origins(5, 16, 12), [0])
    windows = WindowGrid((1, 37, 37), (1, 16, 16), (1, 12, 12))
    # a block far from the origin sees the same window positions as the whole volume
    assert {o[1] for o in windows.overlapping(Box((0, 13, 0), (1, 14, 37)))} == {0, 12}


def test_blend_weights_are_smooth_and_positive():
    w = window_weights((1, 32, 32))
    assert w.min() > 0 and w.max() == pytest.approx(1.0)
    assert w[0, 16, 16] > w[0, 2, 16] > w[0, 0, 16]
    # separable and symmetric
    np.testing.assert_allclose(w[0], w[0].T)
    np.testing.assert_allclose(w[0, ::-1], w[0])


def test_blockwise_equals_whole_volume_with_global_prompts():
    from volseg.geometry import PointSet

    spec = ModelSpec("promptdas", options={"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2,
                                           "decoder_mlp": 32, "projection_dim": 8})
    shape, window, stride = (3, 44, 52), (1, 24, 24), (1, 16, 12)
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 256, size=shape, dtype=np.uint8)
    points = PointSet(np.array([[0, 10, 12], [0, 20, 30], [1, 5, 40], [2, 40, 3], [2, 22, 22]]))
    predictor = make_predictor(spec, window)
    windows = WindowGrid(shape, window, stride)
    whole = predict_box(volume, predictor, windows, Box.from_shape(shape), points=points)
    unprompted = predict_box(volume, predictor, windows, Box.from_shape(shape))
    grid = BlockGrid(Box.from_shape(shape), (2, 13, 21), 0, Box.from_shape(shape))
    blocks = np.full_like(whole, np.nan)
    for block in grid:
        blocks[(slice(None), *block.core.slices)] = predict_box(volume, predictor, windows, block.core, points=points)
    assert np.abs(blocks - whole).max() <= 1e-5
    assert np.abs(whole - unprompted).max() > 1e-4  # the prompts do change the prediction
