"""Training targets and the supervised loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volseg.data.synthetic import generate_volume
from volseg.errors import ConfigError
from volseg.evaluation.metrics import dice
from volseg.geometry import Box
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.models import ModelSpec, build_model, input_contract
from volseg.training.crops import CropSampler
from volseg.training.loop import SupervisedSettings, poly_lr, train_supervised
from volseg.training.losses import dice_loss, segmentation_loss
from volseg.training.targets import density_target, gaussian_density, instance_centres_2d


def test_centres_lie_inside_even_ring_shaped_objects():
    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    ring = (np.hypot(yy - 20, xx - 20) < 12) & (np.hypot(yy - 20, xx - 20) > 6)
    mask |= ring
    mask[2:6, 2:8] = True
    centres = instance_centres_2d(mask)
    assert len(centres) == 2
    assert all(mask[y, x] for y, x in centres)


def test_gaussian_density_peaks_at_one_on_each_centre():
    density = gaussian_density((30, 30), np.array([[5, 5], [20, 25]]), sigma_vx=2.0)
    assert density[5, 5] == pytest.approx(1.0) and density[20, 25] == pytest.approx(1.0)
    assert density[5, 9] == pytest.approx(np.exp(-16 / 8), rel=1e-5)
    assert density.max() == pytest.approx(1.0)
    assert density_target(np.zeros((2, 8, 8), bool), 2.0).sum() == 0


def test_segmentation_loss_ignores_invalid_voxels():
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    good = torch.tensor([[9.0, -9.0, 9.0, -9.0]])
    wrong_where_ignored = torch.tensor([[9.0, -9.0, -9.0, 9.0]])
    valid = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert segmentation_loss(wrong_where_ignored, target, valid) == pytest.approx(
        float(segmentation_loss(good, target, valid)), abs=1e-6)
    assert segmentation_loss(wrong_where_ignored, target) > segmentation_loss(good, target) + 1


def test_balanced_segmentation_loss_weighs_each_class_mean_by_its_share():
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    logits = torch.tensor([[0.5, 1.0, -2.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")[0]
    dice = segmentation_loss(logits, target, dice_weight=1.0) - bce.mean()  # the soft Dice term alone
    for share in (0.5, 0.25):
        expected = share * bce[0] + (1 - share) * bce[1:].mean() + dice
        got = segmentation_loss(logits, target, balanced=True, foreground_share=share)
        assert float(got) == pytest.approx(float(expected), rel=1e-6)


def test_dice_loss_is_the_soft_dice_over_valid_voxels():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    valid = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    p = torch.sigmoid(logits[0, :3])
    expected = 1 - (2 * (p * target[0, :3]).sum() + 1) / (p.sum() + 2 + 1)
    assert float(dice_loss(logits, target, valid)) == pytest.approx(float(expected), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, target)  # segmentation_loss = BCE + this Dice
    assert float(segmentation_loss(logits, target)) == pytest.approx(float(bce + dice_loss(logits, target)), rel=1e-6)


def test_poly_lr():
    assert poly_lr(1.0, 0, 100, 0.9) == 1.0
    assert poly_lr(1.0, 50, 100, 0.9) == pytest.approx(0.5**0.9)


def test_sampler_refuses_crops_larger_than_the_volume():
    with pytest.raises(ConfigError, match=r"train\.crop"):
        CropSampler(np.zeros((2, 8, 8), np.uint8), None, (1, 16, 8))


def test_supervised_training_learns_to_segment_a_held_out_volume():
    train = generate_volume((6, 128, 128), "tem", seed=5)
    test = generate_volume((4, 96, 96), "tem", seed=6)
    spec = ModelSpec("unet", options={"width": 8, "levels": 2})
    contract = input_contract(spec)

    def test_dice(model) -> float:
        predictor = TorchPredictor(model, contract, (1, 64, 64), 1)
        shape = test.raw.shape
        out = predict_box(test.raw, predictor, WindowGrid(shape, (1, 64, 64), (1, 32, 32)), Box.from_shape(shape))
        return dice(out[0] > 0.5, test.mito)

    torch.manual_seed(0)
    model = build_model(spec)
    before = test_dice(model)
    sampler = CropSampler(train.raw, train.labels, (1, 64, 64), seed=0)
    history = train_supervised(model, contract, sampler, SupervisedSettings(300, 4, 3e-3, 3.0, seed=0))
    after = test_dice(model)
    assert np.mean(history.losses[-20:]) < 0.75 * np.mean(history.losses[:20])
    assert after > 0.5 and after > before + 0.3, (before, after)
