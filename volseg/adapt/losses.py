"""Losses: segmentation (binary cross-entropy + soft Dice, with an ignore mask) and density MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                      dice_weight: float = 1.0, balanced: bool = False) -> torch.Tensor:
    """BCE + soft Dice between ``logits`` and a {0,1} ``target`` (same shape, B×C×…).

    ``valid`` (same shape, {0,1}) masks voxels out of both terms (pseudo-labels mark uncertain voxels
    invalid); with no valid voxel the loss is 0. ``balanced``: the BCE is the mean of the foreground
    voxels' mean and the background voxels' mean (a class with no valid voxel counts 0), so a few
    confident foreground pseudo-labels are not outvoted by abundant background ones.
    """
    valid = torch.ones_like(target) if valid is None else valid
    bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    if balanced:
        foreground, background = target * valid, (1 - target) * valid
        bce = 0.5 * ((bce_map * foreground).sum() / foreground.sum().clamp_min(1.0)
                     + (bce_map * background).sum() / background.sum().clamp_min(1.0))
    else:
        bce = bce_map.sum() / valid.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    target = target * valid
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice_weight * dice


def density_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target centre densities."""
    return F.mse_loss(predicted, target)
