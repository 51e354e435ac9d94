"""The supervised training loop (one process): crops → augment → model → losses → AdamW + poly LR."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from volseg.adapt.augment import flip_rotate, intensity_jitter
from volseg.adapt.losses import density_loss, segmentation_loss
from volseg.adapt.sampler import CropSampler
from volseg.adapt.targets import density_target
from volseg.allocator import keep_freed_memory
from volseg.models import InputContract

#: Called after each step with (step, total steps, loss, steps per second).
StepCallback = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class SupervisedSettings:
    steps: int
    batch_size: int
    learning_rate: float
    density_sigma_vx: float
    seed: int = 0
    weight_decay: float = 1e-4
    poly_power: float = 0.9


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """Polynomial decay from ``base`` at step 0 towards 0 at ``total``."""
    return base * (1 - step / total) ** power


def make_batch(sampler: CropSampler, contract: InputContract, n: int, sigma_vx: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``n`` 2D crops → (image B×1×Y×X standardised, mask B×1×Y×X, density B×1×Y×X)."""
    raw, labels = sampler.batch(n)
    if labels is None:
        raise ValueError("supervised training needs labels")
    raw = raw.reshape(-1, *raw.shape[-2:]) if contract.dims == 2 else raw
    mask = (labels > 0).reshape(raw.shape).astype(np.float32)
    density = density_target(mask.reshape(-1, *mask.shape[-2:]), sigma_vx).reshape(mask.shape)
    image = contract.normalize(torch.from_numpy(raw)).unsqueeze(1)
    return image, torch.from_numpy(mask).unsqueeze(1), torch.from_numpy(density).unsqueeze(1)


def train_supervised(model: nn.Module, contract: InputContract, sampler: CropSampler,
                     settings: SupervisedSettings, on_step: StepCallback | None = None) -> TrainHistory:
    """Train ``model`` in place on labelled crops; returns the loss of every step."""
    keep_freed_memory()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    history = TrainHistory()
    begin = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(settings.learning_rate, step, settings.steps, settings.poly_power)
        image, mask, density = make_batch(sampler, contract, settings.batch_size, settings.density_sigma_vx)
        image, mask, density = flip_rotate(generator, image, mask, density)
        image = intensity_jitter(generator, image)
        logits, predicted_density = model(image)
        loss = segmentation_loss(logits, mask) + density_loss(predicted_density, density)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, settings.steps, history.losses[-1], (step + 1) / (time.perf_counter() - begin))
    model.eval()
    history.seconds = time.perf_counter() - begin
    return history
