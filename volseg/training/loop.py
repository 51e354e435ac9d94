"""Training loops (one process): shared bookkeeping, and the supervised loop of non-promptable models.

The Prompt-DAS loop (source training and mean-teacher adaptation) is in :mod:`volseg.training.promptdas.trainer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from volseg.allocator import keep_freed_memory
from volseg.models import InputContract
from volseg.training.augment import flip_rotate, intensity_jitter
from volseg.training.crops import CropSampler
from volseg.training.losses import density_loss, segmentation_loss
from volseg.training.targets import density_target

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
    """Per-step total ``losses``, per-step loss ``components`` by name (e.g. ``source_seg``, ``pcl``)
    and batch statistics, and the wall-clock ``seconds`` of the whole run."""

    losses: list[float] = field(default_factory=list)
    components: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    #: What the adaptation guard saw (:class:`volseg.training.promptdas.guard.GuardReport` as JSON), if one ran.
    guard: dict[str, Any] | None = None

    def record(self, loss: float, components: dict[str, float] | None = None) -> None:
        self.losses.append(loss)
        for name, value in (components or {}).items():
            self.components.setdefault(name, []).append(value)

    def card(self) -> dict[str, Any]:
        """What a checkpoint card says about the run: ``steps`` and ``metrics`` (``final_loss``, the mean
        of the last 20 losses, and ``seconds``)."""
        card: dict[str, Any] = {"steps": len(self.losses),
                                "metrics": {"final_loss": float(np.mean(self.losses[-20:])), "seconds": self.seconds}}
        if self.guard is not None:
            card["adaptation_guard"] = self.guard
        return card

    def to_json(self) -> dict[str, Any]:
        return {"losses": self.losses, "components": self.components, "seconds": self.seconds, "guard": self.guard}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainHistory:
        return cls(list(data["losses"]), {k: list(v) for k, v in data["components"].items()}, data["seconds"],
                   data.get("guard"))


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """Polynomial decay from ``base`` at step 0 towards 0 at ``total``."""
    return base * (1 - step / total) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int, power: float) -> None:
    """Set every parameter group's learning rate to :func:`poly_lr` of this step."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(base, step, total, power)


def make_batch(sampler: CropSampler, contract: InputContract, n: int, sigma_vx: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``n`` 2D crops → (image B×1×Y×X standardised, mask B×1×Y×X, density B×1×Y×X)."""
    raw, labels = sampler.batch(n)
    if labels is None:
        raise ValueError("supervised training needs labels")
    raw = raw.reshape(-1, *raw.shape[-2:]) if contract.dims == 2 else raw
    mask = (labels > 0).reshape(raw.shape).astype(np.float32)
    density = density_target(mask.reshape(-1, *mask.shape[-2:]), sigma_vx).reshape(mask.shape)
    image = contract.normalize(torch.from_numpy(raw), sampler.intensity).unsqueeze(1)
    return image, torch.from_numpy(mask).unsqueeze(1), torch.from_numpy(density).unsqueeze(1)


def train_supervised(model: nn.Module, contract: InputContract, sampler: CropSampler,
                     settings: SupervisedSettings, on_step: StepCallback | None = None) -> TrainHistory:
    """Train a non-promptable ``model`` (``model(image) → (logits, density)``) in place on labelled
    crops; returns the loss of every step."""
    keep_freed_memory()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    history = TrainHistory()
    begin = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        set_poly_lr(optimizer, settings.learning_rate, step, settings.steps, settings.poly_power)
        image, mask, density = make_batch(sampler, contract, settings.batch_size, settings.density_sigma_vx)
        image, mask, density = flip_rotate(generator, image, mask, density)
        image = intensity_jitter(generator, image)
        logits, predicted_density = model(image)
        seg = segmentation_loss(logits, mask)
        det = density_loss(predicted_density, density)
        loss = seg + det
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.record(loss.item(), {"seg": seg.item(), "det": det.item()})
        if on_step is not None:
            on_step(step + 1, settings.steps, history.losses[-1], (step + 1) / (time.perf_counter() - begin))
    model.eval()
    history.seconds = time.perf_counter() - begin
    return history
