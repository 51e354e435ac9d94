"""Test-time augmentation (``inference.tta``): each window's prediction is the mean over in-plane views
(quarter turns, mirror images), prompts turned with the image. The mean is the same whatever view of the
window comes in; a run with it equals a whole-volume pass with it, blockwise, and is a run of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import CNN_PROMPTDAS, write_config
from volseg.cli import main
from volseg.geometry import Box
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.intensity import measure_intensity
from volseg.io import open_volume
from volseg.models import build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, save_checkpoint
from volseg.models.views import VIEWS


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CNN_PROMPTDAS).eval()


@pytest.mark.parametrize("view", VIEWS[8])
def test_a_view_moves_points_where_it_moves_their_pixels(view):
    image = torch.zeros(5, 7)
    image[1, 5] = 1
    turned = view.apply(image)
    assert torch.nonzero(turned)[0].tolist() == view.points(np.array([[1.0, 5.0]]), (5, 7))[0].tolist()
    assert torch.equal(view.undo(turned), image)


def predictor(model: torch.nn.Module, tta: int) -> TorchPredictor:
    return TorchPredictor(model, input_contract(CNN_PROMPTDAS), (1, 32, 32), 1, intensity=(0.0, 255.0), tta=tta)


@pytest.mark.parametrize("view", VIEWS[8][1:])
def test_the_mean_over_all_views_is_the_same_for_every_view_of_a_window(model, view):
    window = np.random.default_rng(0).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)
    prompts = [np.array([[0, 3.0, 20.0], [0, 25.0, 9.0]]), np.zeros((0, 3))]
    turned_window = view.apply(torch.from_numpy(window)).numpy()
    turned_prompts = [np.column_stack([p[:, 0], view.points(p[:, 1:], (32, 32))]) for p in prompts]

    def seen_back(tta: int) -> tuple[np.ndarray, np.ndarray]:
        p = predictor(model, tta)
        direct = p.predict(window, prompts)
        back = view.undo(torch.from_numpy(p.predict(turned_window, turned_prompts))).numpy()
        return direct, back

    direct, back = seen_back(8)
    np.testing.assert_allclose(back, direct, atol=1e-5, rtol=0)
    plain, plain_back = seen_back(1)  # one view is not invariant: the test can fail
    assert np.abs(plain_back - plain).max() > 1e-3
    four, four_back = seen_back(4)
    if not view.mirrored:  # the four quarter turns are closed under turning
        np.testing.assert_allclose(four_back, four, atol=1e-5, rtol=0)


def test_one_view_is_the_plain_forward_pass(model):
    window = np.random.default_rng(1).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    with torch.inference_mode():
        x = input_contract(CNN_PROMPTDAS).normalize(torch.from_numpy(window), (0.0, 255.0)).reshape(3, 1, 32, 32)
        logits, density = model(x)[:2]
    out = predictor(model, 1).predict(window)
    assert np.array_equal(out[:, 0, 0], torch.sigmoid(logits)[:, 0].numpy())
    assert np.array_equal(out[:, 1, 0], density[:, 0].numpy())


ROI = Box((0, 0, 0), (4, 72, 80))  # 4 slices keep the test quick


def run(tmp_path, run_config, checkpoint, capsys, name: str, tta: int, block) -> int:
    model = {"name": "promptdas", "options": dict(CNN_PROMPTDAS.options), "checkpoint": str(checkpoint)}
    config = run_config(model=model, execution={"block": block, "executor": "serial"}, roi=ROI.to_json(),
                        inference={"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu",
                                   "tta": tta},
                        output={"probabilities": str(tmp_path / f"{name}.zarr/prob"), "chunk": [2, 16, 16]})
    code = main(["run", str(write_config(tmp_path / f"{name}.yaml", config)), "--no-progress"])
    capsys.readouterr()
    return code


def test_blockwise_output_with_tta_equals_the_whole_volume_and_is_a_run_of_its_own(tmp_path, run_config, model,
                                                                                   capsys):
    block = [2, 32, 48]  # 2 × 3 × 2 blocks that cut through windows in every axis
    checkpoint = save_checkpoint(tmp_path / "cnn.safetensors", model, CNN_PROMPTDAS, {"mode": "test"})
    assert run(tmp_path, run_config, checkpoint, capsys, "tta", 4, block) == 0
    raw = open_volume(run_config()["input"]["url"])
    contract = input_contract(CNN_PROMPTDAS)
    reference = TorchPredictor(load_checkpoint(checkpoint, CNN_PROMPTDAS), contract, (1, 32, 32), 1,
                               intensity=measure_intensity(raw, contract.percentiles).bounds, tta=4)
    whole = predict_box(raw, reference, WindowGrid(raw.shape, (1, 32, 32), (1, 20, 24)), ROI)
    prob = open_volume(str(tmp_path / "tta.zarr/prob"))
    written = prob.read(ROI)
    np.testing.assert_allclose(written, whole[0], atol=1e-5, rtol=0)
    # another number of views writes another output: its run is refused there, and nothing changes
    assert run(tmp_path, run_config, checkpoint, capsys, "tta", 1, block) == 2
    assert np.array_equal(open_volume(str(tmp_path / "tta.zarr/prob")).read(ROI), written)
