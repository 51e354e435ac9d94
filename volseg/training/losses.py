"""Losses: segmentation (binary cross-entropy + soft Dice, with an ignore mask) and density MSE.

Both are ratios of sums over the whole batch. ``total`` sums those statistics over data-parallel
replicas (:meth:`volseg.training.replicas.Replica.total`) before the division, so a replica computes the
loss of the global batch; the default keeps them local (one process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: Sums a vector of batch statistics over the replicas (identity: this batch only).
Total = Callable[[torch.Tensor], torch.Tensor]


def local(statistics: torch.Tensor) -> torch.Tensor:
    """The :data:`Total` of one process: the statistics of its own batch."""
    return statistics


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                      dice_weight: float = 1.0, balanced: bool = False, foreground_share: float = 0.5,
                      total: Total = local) -> torch.Tensor:
    """BCE + soft Dice between ``logits`` and a {0,1} ``target`` (same shape, B×C×…).

    ``valid`` (same shape, {0,1}) masks voxels out of both terms (pseudo-labels mark uncertain voxels
    invalid); with no valid voxel the loss is 0. ``balanced``: the BCE is the mean of the foreground
    voxels' mean and the background voxels' mean (a class with no valid voxel counts 0), so a few
    confident foreground pseudo-labels are not outvoted by abundant background ones;
    ``foreground_share`` is the foreground mean's weight in that average (0.5: equal; lower leans
    towards the unbalanced BCE, whose share is the foreground's voxel fraction).
    """
    valid = torch.ones_like(target) if valid is None else valid
    bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    if balanced:
        foreground, background = target * valid, (1 - target) * valid
        sums = [(bce_map * foreground).sum(), foreground.sum(), (bce_map * background).sum(), background.sum()]
    else:
        sums = [bce_map.sum(), valid.sum()]
    prob = torch.sigmoid(logits) * valid
    target = target * valid
    s = total(torch.stack([*sums, (prob * target).sum(), prob.sum(), target.sum()]))
    bce = s[0] / s[1].clamp_min(1.0)
    if balanced:
        bce = foreground_share * bce + (1 - foreground_share) * s[2] / s[3].clamp_min(1.0)
    return bce + dice_weight * _soft_dice(s[-3], s[-2], s[-1])


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              total: Total = local) -> torch.Tensor:
    """The soft Dice loss alone (SAM tuning), over the valid voxels of the whole batch."""
    valid = torch.ones_like(target) if valid is None else valid
    prob = torch.sigmoid(logits) * valid
    target = target * valid
    return _soft_dice(*total(torch.stack([(prob * target).sum(), prob.sum(), target.sum()])))


def _soft_dice(overlap: torch.Tensor, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 − (2·Σpt + 1) / (Σp + Σt + 1)`` from the three sums (smoothed: 0 when both are empty)."""
    return 1 - (2 * overlap + 1) / (predicted + target + 1)


def density_loss(predicted: torch.Tensor, target: torch.Tensor, total: Total = local) -> torch.Tensor:
    """Mean squared error between predicted and target centre densities."""
    s = total(torch.stack([((predicted - target) ** 2).sum(), predicted.new_tensor(float(predicted.numel()))]))
    return s[0] / s[1]
