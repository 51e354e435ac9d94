"""`volseg train CONFIG`: supervised training on a labelled volume, saved as a checkpoint + card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volseg.adapt.loop import SupervisedSettings, TrainHistory, train_supervised
from volseg.adapt.sampler import CropSampler
from volseg.commands.progress import StepProgress
from volseg.config import Config
from volseg.errors import VolumeFormatError
from volseg.inference.segment import check_input_dtype
from volseg.models import build_model, input_contract
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


def train(config: Config, progress: bool = True) -> TrainResult:
    config.require("train", command="train")
    cfg = config.train
    assert cfg is not None
    raw = cfg.raw.open()
    labels = cfg.labels.open()
    if labels.shape != raw.shape:
        raise VolumeFormatError(
            f"train.labels {cfg.labels.url!r} has shape {labels.shape} but train.raw {cfg.raw.url!r} has "
            f"{raw.shape}.", "point both at arrays of the same dataset and scale.")
    check_input_dtype(raw.dtype, cfg.raw.url, "train.raw.url")
    spec = config.model.spec
    contract = input_contract(spec)
    contract.check_window(cfg.crop)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    sigma_vx = cfg.density_sigma_nm / float(raw.voxel_size_nm[2])
    settings = SupervisedSettings(cfg.steps, cfg.batch_size, cfg.learning_rate, sigma_vx, cfg.seed)
    bar = StepProgress(cfg.steps, "training", progress)
    try:
        history = train_supervised(model, contract, CropSampler(raw, labels, cfg.crop, cfg.seed),
                                   settings, on_step=bar)
    finally:
        bar.close()
    card = {
        "mode": "source",
        "data": {"raw": cfg.raw.url, "labels": cfg.labels.url, "voxel_size_nm": list(raw.voxel_size_nm)},
        "training": cfg.model_dump(),
        "steps": cfg.steps,
        "metrics": {"final_loss": float(np.mean(history.losses[-20:])), "seconds": history.seconds},
    }
    checkpoint = save_checkpoint(cfg.checkpoint, model, spec, card)
    curve = save_loss_curve(history.losses, checkpoint.with_name(checkpoint.stem + "_loss.png"),
                            f"{spec.name} source training")
    return TrainResult(checkpoint, history, curve)
