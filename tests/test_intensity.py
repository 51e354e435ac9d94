"""Robust per-volume intensity normalisation: one range per volume, whatever reads it, and blockwise
output of the default Prompt-DAS (fine head, normalised input) equal to a whole-volume pass."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.conftest import TINY_PROMPTDAS, write_config
from volseg import intensity as intensity_module
from volseg.cli import main
from volseg.geometry import Box
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.intensity import IntensityRange, measure_intensity, sample_boxes
from volseg.io import open_volume
from volseg.models import input_contract
from volseg.models.checkpoint import load_checkpoint


def test_the_range_is_the_percentiles_of_a_lattice_over_the_whole_volume():
    volume = np.random.default_rng(0).integers(0, 256, (6, 300, 520)).astype(np.uint8)
    boxes = sample_boxes(volume.shape)
    assert len(boxes) == 4 * 4 * 4 and all(Box((0, 0, 0), volume.shape).contains(b) for b in boxes)
    assert {b.start[0] for b in boxes} == {0, 1, 3, 5} and {b.stop[2] for b in boxes} == {256, 344, 432, 520}
    found = measure_intensity(volume, (1, 99))
    values = np.concatenate([volume[b.slices].ravel() for b in boxes])
    assert (found.low, found.high) == tuple(np.percentile(values.astype(np.float64), [1, 99]))
    assert found.voxels == values.size


def test_the_range_does_not_depend_on_the_order_of_reads(monkeypatch):
    volume = np.random.default_rng(1).gamma(2.0, 30.0, (9, 200, 230)).astype(np.float32)
    reference = measure_intensity(volume, (0.5, 99.5))
    for seed in range(3):
        shuffled = sample_boxes(volume.shape)
        random.Random(seed).shuffle(shuffled)
        monkeypatch.setattr(intensity_module, "sample_boxes", lambda shape, boxes=shuffled: list(boxes))
        assert measure_intensity(volume, (0.5, 99.5)) == reference


def test_a_constant_volume_gets_a_unit_range_and_normalisation_clips():
    assert measure_intensity(np.full((2, 8, 8), 7, np.uint8)).bounds == (7.0, 8.0)
    contract = input_contract(TINY_PROMPTDAS)
    assert contract.percentiles == (1.0, 99.0)
    x = contract.normalize(torch.tensor([0, 50, 100, 150, 255], dtype=torch.uint8), (50.0, 150.0))
    assert x.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
        IntensityRange(3.0, 3.0)


@pytest.mark.parametrize("block", [[2, 16, 16], [4, 32, 48], [10, 80, 80]])
def test_blockwise_output_of_the_default_promptdas_equals_the_whole_volume(tmp_path, run_config, promptdas_checkpoint,
                                                                           capsys, block):
    model = {"name": "promptdas", "options": dict(TINY_PROMPTDAS.options), "checkpoint": str(promptdas_checkpoint)}
    config = write_config(tmp_path / "run.yaml", run_config(model=model, execution={"block": block,
                                                                                    "executor": "serial"}))
    assert main(["run", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    raw = open_volume(run_config()["input"]["url"])
    contract = input_contract(TINY_PROMPTDAS)
    expected_range = measure_intensity(raw, contract.percentiles)
    prob = open_volume(str(tmp_path / "out.zarr/prob"))
    assert prob.attributes["volseg"]["intensity"] == expected_range.to_json()
    predictor = TorchPredictor(load_checkpoint(promptdas_checkpoint, TINY_PROMPTDAS), contract, (1, 32, 32), 1,
                               intensity=expected_range.bounds)
    whole = predict_box(raw.read(raw.bounds), predictor, WindowGrid(raw.shape, (1, 32, 32), (1, 20, 24)), raw.bounds)
    np.testing.assert_allclose(prob.read(prob.bounds), whole[0], atol=1e-5, rtol=0)
