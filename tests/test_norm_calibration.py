"""BatchNorm statistics calibrated on the input volume (``inference.calibrate_norms``, AdaBN): computed once
per volume from a lattice of windows, so blockwise output equals a whole-volume pass with those statistics,
and stamped in the output; Ray writes the serial executor's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CNN_PROMPTDAS, write_config
from volseg.cli import main
from volseg.geometry import read_box
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import CALIBRATION_LATTICE, TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.intensity import measure_intensity, sample_boxes
from volseg.io import open_volume
from volseg.models import build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, save_checkpoint
from volseg.models.norms import calibrate_norms, norm_digest


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory) -> Path:
    """A seeded random Prompt-DAS with the CNN (BatchNorm) encoder; its running statistics are the
    initial 0 / 1, far from any volume's."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    return save_checkpoint(path, build_model(CNN_PROMPTDAS), CNN_PROMPTDAS, {"mode": "test"})


def calibrated_reference(raw, checkpoint: Path) -> TorchPredictor:
    """The model with statistics re-estimated by hand on the lattice windows of ``raw``."""
    contract = input_contract(CNN_PROMPTDAS)
    bounds = measure_intensity(raw, contract.percentiles).bounds
    model = load_checkpoint(checkpoint, CNN_PROMPTDAS)
    boxes = sample_boxes(raw.shape, CALIBRATION_LATTICE, (1, 32, 32))
    assert len(boxes) == 4 * 4 * 4
    windows = torch.from_numpy(np.stack([read_box(raw, b) for b in boxes]))
    calibrate_norms(model, contract.normalize(windows, bounds).reshape(-1, 1, 32, 32), batch=4)
    return TorchPredictor(model, contract, (1, 32, 32), 1, intensity=bounds)


def run(tmp_path, run_config, checkpoint, capsys, name: str, calibrate: bool, execution: dict, *extra: str) -> int:
    model = {"name": "promptdas", "options": dict(CNN_PROMPTDAS.options), "checkpoint": str(checkpoint)}
    config = run_config(model=model, execution=execution,
                        inference={"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu",
                                   "calibrate_norms": calibrate},
                        output={"probabilities": str(tmp_path / f"{name}.zarr/prob"), "chunk": [2, 16, 16]})
    code = main(["run", str(write_config(tmp_path / f"{name}.yaml", config)), "--no-progress", *extra])
    capsys.readouterr()
    return code


@pytest.mark.parametrize("block", [[2, 16, 16], [10, 80, 80]])
def test_blockwise_output_with_calibrated_norms_equals_the_whole_volume(tmp_path, run_config, cnn_checkpoint, capsys,
                                                                        block):
    execution = {"block": block, "executor": "serial"}
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "on", True, execution) == 0
    raw = open_volume(run_config()["input"]["url"])
    reference = calibrated_reference(raw, cnn_checkpoint)
    whole = predict_box(raw.read(raw.bounds), reference, WindowGrid(raw.shape, (1, 32, 32), (1, 20, 24)), raw.bounds)
    prob = open_volume(str(tmp_path / "on.zarr/prob"))
    np.testing.assert_allclose(prob.read(prob.bounds), whole[0], atol=1e-5, rtol=0)
    assert prob.attributes["volseg"]["norms_sha256"] == norm_digest(reference.model)
    # the statistics matter: without them the same model writes something else
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "off", False, execution) == 0
    off = open_volume(str(tmp_path / "off.zarr/prob"))
    assert np.abs(off.read(off.bounds) - whole[0]).max() > 0.05
    assert off.attributes["volseg"]["norms_sha256"] is None


def test_a_calibrated_run_resumes_and_refuses_the_uncalibrated_one(tmp_path, run_config, cnn_checkpoint, capsys):
    execution = {"block": [4, 32, 48], "executor": "serial"}
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "on", True, execution) == 0
    before = open_volume(str(tmp_path / "on.zarr/prob")).read(open_volume(str(tmp_path / "on.zarr/prob")).bounds)
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "on", True, execution) == 0  # same signature: resumes
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "on", False, execution) == 2  # another run's output
    after = open_volume(str(tmp_path / "on.zarr/prob"))
    assert np.array_equal(after.read(after.bounds), before)


@pytest.mark.ray
def test_ray_writes_the_serial_bytes_with_calibrated_norms(ray_cluster, tmp_path, run_config, cnn_checkpoint, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run(tmp_path, run_config, cnn_checkpoint, capsys, "serial", True,
                   {"block": [4, 32, 48], "executor": "serial"}) == 0
    finally:
        torch.set_num_threads(threads)
    assert run(tmp_path, run_config, cnn_checkpoint, capsys, "ray", True,
               {"block": [4, 32, 48], "executor": "ray", "actors": 2, "cpus_per_actor": 2}) == 0
    serial, ray = (open_volume(str(tmp_path / f"{n}.zarr/prob")) for n in ("serial", "ray"))
    assert serial.read(serial.bounds).tobytes() == ray.read(ray.bounds).tobytes()
    assert serial.attributes["volseg"]["norms_sha256"] == ray.attributes["volseg"]["norms_sha256"]
