"""`volseg train CONFIG`: supervised (source) training on a labelled volume → checkpoint + card + curve.

Prompt-DAS trains in the paper's source mode (each crop prompted by a random subset, 0 … all, of its
instance centres); other models train with the plain supervised loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volseg.adapt.loop import SupervisedSettings, TrainHistory, train_supervised
from volseg.adapt.sampler import CropSampler
from volseg.adapt.settings import AdaptSettings
from volseg.adapt.trainer import DomainData, train_promptdas
from volseg.commands.progress import StepProgress
from volseg.config import Config
from volseg.errors import VolumeFormatError
from volseg.inference.segment import check_input_dtype
from volseg.models import ModelSpec, build_model, input_contract
from volseg.models.checkpoint import save_checkpoint


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: TrainHistory
    curve: Path


def save_loss_curve(losses: list[float], path: Path, title: str) -> Path:
    """Plot the per-step loss (and a moving average) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_trained(path: str, model: nn.Module, spec: ModelSpec, card: dict[str, Any], history: TrainHistory,
                 title: str) -> TrainResult:
    """Write the checkpoint with its card (final loss and time added) and the loss curve beside it."""
    card = {**card, "steps": len(history.losses),
            "metrics": {**card.get("metrics", {}), "final_loss": float(np.mean(history.losses[-20:])),
                        "seconds": history.seconds}}
    checkpoint = save_checkpoint(path, model, spec, card)
    curve = save_loss_curve(history.losses, checkpoint.with_name(checkpoint.stem + "_loss.png"), title)
    return TrainResult(checkpoint, history, curve)


def open_labelled(raw_ref: Any, labels_ref: Any, field: str) -> tuple[Any, Any]:
    """Open a raw volume and its labels, checking dtype and that they cover the same voxels."""
    raw, labels = raw_ref.open(), labels_ref.open()
    check_input_dtype(raw.dtype, raw_ref.url, f"{field}.raw.url")
    if labels.shape != raw.shape:
        raise VolumeFormatError(
            f"{field}.labels {labels_ref.url!r} has shape {labels.shape} but {field}.raw {raw_ref.url!r} has "
            f"{raw.shape}.", "point both at arrays of the same dataset and scale.")
    return raw, labels


def train(config: Config, progress: bool = True) -> TrainResult:
    config.require("train", command="train")
    cfg = config.train
    assert cfg is not None
    raw, labels = open_labelled(cfg.raw, cfg.labels, "train")
    spec = config.model.spec
    contract = input_contract(spec)
    contract.check_window(cfg.crop)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    sigma_vx = cfg.density_sigma_nm / float(raw.voxel_size_nm[2])
    bar = StepProgress(cfg.steps, "training", progress)
    try:
        if getattr(model, "promptable", False):
            settings = AdaptSettings(mode="source", steps=cfg.steps, batch_size=cfg.batch_size, crop=cfg.crop,
                                     learning_rate=cfg.learning_rate, density_sigma=sigma_vx, seed=cfg.seed)
            result = train_promptdas(model, settings, source=DomainData(raw, labels), on_step=bar)
            model, history = result.model, result.history
        else:
            settings = SupervisedSettings(cfg.steps, cfg.batch_size, cfg.learning_rate, sigma_vx, cfg.seed)
            history = train_supervised(model, contract, CropSampler(raw, labels, cfg.crop, cfg.seed), settings,
                                       on_step=bar)
    finally:
        bar.close()
    card = {
        "mode": "source",
        "data": {"raw": cfg.raw.url, "labels": cfg.labels.url, "voxel_size_nm": list(raw.voxel_size_nm)},
        "training": cfg.model_dump(),
    }
    return save_trained(cfg.checkpoint, model, spec, card, history, f"{spec.name} source training")
