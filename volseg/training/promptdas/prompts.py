"""Point prompts for training: random subsets, merging, and padding to the model's tensors.

Points are pixel (y, x) coordinates in a 2D crop (integers are pixel centres), as ``M×2`` float arrays;
the model takes a batch as a padded ``B×N×2`` tensor with a ``B×N`` validity mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def random_subset(points_yx: np.ndarray, rng: np.random.Generator, unprompted: float = 0.0) -> np.ndarray:
    """A uniformly random number ``k`` in ``0 … M`` of the ``M`` points, chosen without replacement;
    with probability ``unprompted``, none at all.

    Source prompts are drawn like this so that the model learns to work with any number of prompts,
    none included (each size has probability ``1 / (M + 1)``, so a crop with many objects is almost
    never seen unprompted: ``unprompted`` raises that share, as a run without prompts needs).
    """
    points_yx = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    if unprompted and rng.random() < unprompted:
        return points_yx[:0]
    k = int(rng.integers(0, len(points_yx) + 1))
    return points_yx[np.sort(rng.choice(len(points_yx), size=k, replace=False))]


def merge_points(kept_yx: np.ndarray, extra_yx: np.ndarray, radius_vx: float) -> np.ndarray:
    """All of ``kept_yx`` plus the points of ``extra_yx`` farther than ``radius_vx`` from every kept one.

    Used to add detected peaks to sparse ground-truth points: a peak that is a ground-truth point seen
    again is dropped, so no object is prompted twice.
    """
    kept = np.asarray(kept_yx, dtype=np.float64).reshape(-1, 2)
    extra = np.asarray(extra_yx, dtype=np.float64).reshape(-1, 2)
    if len(kept) and len(extra):
        distance = np.linalg.norm(extra[:, None, :] - kept[None, :, :], axis=-1)
        extra = extra[distance.min(axis=1) > radius_vx]
    return np.concatenate([kept, extra])


def pad_points(points_yx: Sequence[np.ndarray], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` point arrays (``M_b×2``) → (``B×N×2`` float, ``B×N`` bool valid), ``N = max M_b``.

    Padded rows are (0, 0) and invalid; ``N`` is 0 when no crop has a point (the unprompted mode).
    """
    n = max((len(p) for p in points_yx), default=0)
    points = torch.zeros(len(points_yx), n, 2)
    valid = torch.zeros(len(points_yx), n, dtype=torch.bool)
    for i, p in enumerate(points_yx):
        p = np.asarray(p, dtype=np.float32).reshape(-1, 2)
        points[i, : len(p)] = torch.from_numpy(p)
        valid[i, : len(p)] = True
    return points.to(device), valid.to(device)
