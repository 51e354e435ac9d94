"""Tuning the added parts of a frozen SAM with a Dice loss: the loop that prompt learning and All-in-SAM share.

SAM's own weights are frozen (``requires_grad`` off, so they get no gradient and AdamW never sees them);
only :meth:`~volseg.models.sam.model.SamSegmenter.added_parameters` (head prompt, prefix tokens, adapters) train,
plus, when asked (All-in-SAM), SAM's mask decoder. The forward is prompt-free, so the tuned model
segments without prompts at inference. Batches come from a callable, so the same loop trains on labelled
crops read from storage (:func:`labelled_crops`) and on pseudo-labelled slices held in memory
(:class:`SliceCrops`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from volseg.errors import ConfigError
from volseg.models import ModelSpec, input_contract
from volseg.models.sam.model import SamSegmenter
from volseg.training.augment import flip_rotate
from volseg.training.crops import CropSampler
from volseg.training.loop import StepCallback, TrainHistory, set_poly_lr
from volseg.training.losses import dice_loss

#: SAM's input contract: grey scaled to [0, 1] (SAM's own statistics are applied inside the model).
SAM_INPUT = input_contract(ModelSpec("sam"))


@dataclass(frozen=True)
class SamTuneSettings:
    """``steps`` of AdamW (``learning_rate``, poly decay ``poly_power``) on ``batch_size`` crops of ``crop``
    (z, y, x; each z slice a sample); ``train_decoder``: SAM's mask decoder trains too (All-in-SAM);
    ``seed``: crops and flips."""

    steps: int = 100
    batch_size: int = 2
    crop: tuple[int, int, int] = (1, 128, 128)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    train_decoder: bool = False
    seed: int = 0


@dataclass(frozen=True)
class SamBatch:
    """``image`` ``B×1×Y×X`` in [0, 1]; ``target`` and ``valid`` ``B×1×Y×X`` {0, 1} (valid 0: ignored)."""

    image: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor


def freeze_sam(model: SamSegmenter, train_decoder: bool = False) -> list[nn.Parameter]:
    """Freeze SAM's own weights (except its mask decoder with ``train_decoder``); the trainable parameters."""
    model.sam.requires_grad_(False)
    if train_decoder:
        model.sam.mask_decoder.requires_grad_(True)
    for p in model.added_parameters():
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("This SAM has nothing to train: no head prompt, prefix tokens or adapters, and a frozen "
                          "decoder.", "set model.options head_prompt, prefix_tokens and/or adapter_dim.")
    return trainable


def tune_sam(model: SamSegmenter, next_batch: Callable[[int], SamBatch], settings: SamTuneSettings,
             on_step: StepCallback | None = None) -> TrainHistory:
    """Train ``model``'s added parts (see the module docstring) for ``settings.steps`` steps on
    ``next_batch(step)``, prompt-free, with :func:`dice_loss`; returns the history, model in eval mode."""
    trainable = freeze_sam(model, settings.train_decoder)
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    device = next(model.parameters()).device
    history = TrainHistory()
    begin = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        set_poly_lr(optimizer, settings.learning_rate, step, settings.steps, settings.poly_power)
        batch = next_batch(step)
        logits = model(batch.image.to(device)).logits
        loss = dice_loss(logits, batch.target.to(device), batch.valid.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.record(float(loss.detach()), {"dice": float(loss.detach())})
        if on_step is not None:
            on_step(step + 1, settings.steps, history.losses[-1], (step + 1) / (time.perf_counter() - begin))
    model.eval()
    history.seconds = time.perf_counter() - begin
    return history


def _augmented(generator: torch.Generator, image: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
               ) -> SamBatch:
    return SamBatch(*flip_rotate(generator, image, target, valid))


def labelled_crops(sampler: CropSampler, settings: SamTuneSettings) -> Callable[[int], SamBatch]:
    """Batches of ``settings.batch_size`` labelled crops (labels > 0 = foreground, all valid), flipped and
    rotated alike; grey scaled to [0, 1] by the raw dtype's maximum."""
    generator = torch.Generator().manual_seed(settings.seed)

    def next_batch(step: int) -> SamBatch:
        crops = sampler.crops(settings.batch_size)
        raw = np.concatenate([c.raw for c in crops])
        labels = np.concatenate([c.labels for c in crops])
        image = grey_input(raw)
        target = torch.from_numpy((labels > 0).astype(np.float32)).unsqueeze(1)
        return _augmented(generator, image, target, torch.ones_like(target))

    return next_batch


@dataclass
class SliceCrops:
    """Random crops of in-memory 2D samples: ``raw`` ``K×Y×X`` with ``target``/``valid`` ``K×Y×X`` {0, 1}."""

    raw: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    crop_yx: tuple[int, int]
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.crop_yx = tuple(min(c, s) for c, s in zip(self.crop_yx, self.raw.shape[1:], strict=True))

    def __call__(self, step: int) -> SamBatch:
        k = self.rng.integers(0, len(self.raw), self.batch_size)
        cy, cx = self.crop_yx
        y = self.rng.integers(0, self.raw.shape[1] - cy + 1, self.batch_size)
        x = self.rng.integers(0, self.raw.shape[2] - cx + 1, self.batch_size)
        cut = [np.s_[i, a : a + cy, b : b + cx] for i, a, b in zip(k, y, x, strict=True)]

        def stack(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.stack([array[c] for c in cut]).astype(np.float32)).unsqueeze(1)

        image = grey_input(np.stack([self.raw[c] for c in cut]))
        return _augmented(self.generator, image, stack(self.target), stack(self.valid))


def grey_input(raw: np.ndarray) -> torch.Tensor:
    """``B×Y×X`` raw → ``B×1×Y×X`` float in [0, 1] (integers by their dtype's maximum)."""
    return SAM_INPUT.normalize(torch.from_numpy(np.ascontiguousarray(raw))).unsqueeze(1)
