"""`volseg train CONFIG`: supervised (source) training on a labelled volume → checkpoint + card + curve.

Prompt-DAS trains in the paper's source mode (each crop prompted by a random subset, 0 … all, of its
instance centres), in one process or, with ``cluster.workers`` > 1, data-parallel under Ray Train (the same
loop, see :mod:`volseg.training.distributed`); other models train with the plain supervised loop, in one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volseg.commands.progress import StepProgress
from volseg.config import Config, TrainConfig, VolumeRef
from volseg.errors import ConfigError, VolumeFormatError
from volseg.inference.segment import check_input_dtype, check_not_empty
from volseg.io.guard import PathRef, check_outputs
from volseg.models import ModelSpec, build_model, input_contract
from volseg.models.checkpoint import (
    CURVE_SOFTWARE,
    card_path,
    check_checkpoint_output,
    curve_path,
    save_checkpoint,
)
from volseg.threads import torch_threads
from volseg.training.augment import WIDE
from volseg.training.crops import CropSampler
from volseg.training.loop import SupervisedSettings, TrainHistory, train_supervised
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, TrainingInputs, train_promptdas
from volseg.training.replicas import Replica


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: TrainHistory
    curve: Path


def save_loss_curve(losses: list[float], path: Path, title: str, guard: dict[str, Any] | None = None) -> Path:
    """Plot the per-step loss (and a moving average) to a PNG; with the adaptation ``guard``'s report,
    its signals below (foreground ratio, confidence, agreement, centred share; the stop marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if guard is not None and guard.get("checks"):
        fig, (ax, below) = plt.subplots(2, 1, figsize=(6, 6), dpi=100, sharex=True)
        _plot_guard(below, guard)
    else:
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
    fig.savefig(path, metadata={"Software": CURVE_SOFTWARE})
    plt.close(fig)
    return path


def _plot_guard(ax: Any, guard: dict[str, Any]) -> None:
    checks = guard["checks"]
    steps = [c["step"] for c in checks]
    for name in ("ratio", "confidence", "agreement", "centred_ratio"):
        ax.plot(steps, [c[name] for c in checks], marker=".", label=name.replace("_", " "))
    if guard.get("stopped_at") is not None:
        ax.axvline(guard["stopped_at"], color="red", lw=1, label="stopped")
    ax.set_xlabel("step")
    ax.set_ylabel("guard signals")
    ax.legend(fontsize=7)

def save_trained(path: str, model: nn.Module, spec: ModelSpec, card: dict[str, Any], history: TrainHistory,
                 title: str, overwrite: bool = False) -> TrainResult:
    """Write the checkpoint with its card (steps, final loss and time added) and the loss curve beside it;
    an existing checkpoint is replaced only with ``overwrite``."""
    summary = history.card()
    card = {**card, **summary, "metrics": {**card.get("metrics", {}), **summary["metrics"]}}
    checkpoint = save_checkpoint(path, model, spec, card, replace=overwrite)
    curve = save_loss_curve(history.losses, curve_path(checkpoint), title, history.guard)
    return TrainResult(checkpoint, history, curve)


def volume_ref(field: str, ref: VolumeRef | None) -> list[PathRef]:
    return [] if ref is None else [PathRef(f"{field}.url", ref.url)]


def checkpoint_refs(field: str, path: str | None) -> list[PathRef]:
    """A checkpoint and the card (and loss curve) beside it, as files named by ``field``."""
    if path is None:
        return []
    return [PathRef(field, path, "file"), PathRef(f"{field} (its card)", str(card_path(path)), "file"),
            PathRef(f"{field} (its loss curve)", str(curve_path(path)), "file")]


def check_training_outputs(config: Config, inputs: list[PathRef], field: str, checkpoint: str,
                           overwrite: bool) -> None:
    """Before any training: the checkpoint (with its card, curve and, under Ray Train, its run storage)
    must not touch an input, must be writable, and may replace an existing one only with ``overwrite``
    (and only one volseg wrote)."""
    outputs = checkpoint_refs(field, checkpoint)
    if config.cluster.workers > 1:
        storage = config.cluster.storage or str(Path(checkpoint).with_suffix(".ray"))
        outputs.append(PathRef("cluster.storage", storage))
    check_outputs(inputs, outputs)
    check_checkpoint_output(checkpoint, field, overwrite)


def train_inputs(config: Config) -> list[PathRef]:
    """What `volseg train` reads."""
    cfg = config.train
    assert cfg is not None
    return [*volume_ref("train.raw", cfg.raw), *volume_ref("train.labels", cfg.labels)]


def open_labelled(raw_ref: Any, labels_ref: Any, field: str) -> tuple[Any, Any]:
    """Open a raw volume and its labels, checking dtype and that they cover the same voxels."""
    raw, labels = raw_ref.open(f"{field}.raw"), labels_ref.open(f"{field}.labels")
    check_input_dtype(raw.dtype, raw_ref.url, f"{field}.raw.url")
    check_not_empty(raw, raw_ref.url, f"{field}.raw.url")
    if labels.shape != raw.shape:
        raise VolumeFormatError(
            f"{field}.labels {labels_ref.url!r} has shape {labels.shape} but {field}.raw {raw_ref.url!r} has "
            f"{raw.shape}.", "point both at arrays of the same dataset and scale.")
    return raw, labels


def one_process() -> dict[str, int]:
    """The card's record of a run trained in this process: one worker, and its torch threads (float results
    depend on them)."""
    return {"workers": 1, "threads": torch.get_num_threads()}


def train_and_save(config: Config, prepare: Callable[[], TrainingInputs], inputs: TrainingInputs,
                   card: dict[str, Any], output: str, title: str, progress: bool, overwrite: bool = False
                   ) -> TrainResult:
    """Train Prompt-DAS on ``inputs`` (built by ``prepare()``) and save it at ``output`` with ``card``.

    ``cluster.workers`` 0 or 1: the training loop in this process. More: the same loop under Ray Train,
    each worker calling ``prepare`` itself; the card then also records the ``distributed`` run.
    """
    workers = config.cluster.workers
    if workers <= 1:
        bar = StepProgress(inputs.settings.steps, title, progress)
        try:
            result = train_promptdas(inputs.model, inputs.settings, inputs.source, inputs.target, on_step=bar)
        finally:
            bar.close()
        return save_trained(output, result.model, config.model.spec, {**card, **one_process()}, result.history,
                            title, overwrite)
    from volseg.training.distributed import TrainingJob, train_distributed

    per_worker = len(Replica(0, workers).shard(inputs.settings.batch_size))
    run = train_distributed(TrainingJob(prepare, config.model.spec, card, output, config.cluster))
    distributed = {"backend": run.backend, "per_worker_batch": per_worker, "run": run.checkpoint,
                   "resumed_from": run.resumed_from, "checkpoint_every": config.cluster.checkpoint_every}
    return save_trained(output, run.model, config.model.spec, {**card, "workers": workers, "distributed": distributed},
                        run.history, title, overwrite)


def source_inputs(config: Config, model: nn.Module | None = None) -> TrainingInputs:
    """Prompt-DAS source training (``train:``): the labelled volume, opened in this process, and ``model``
    (default: built from ``model:``, seeded with ``train.seed``)."""
    cfg = config.train
    assert cfg is not None
    raw, labels = open_labelled(cfg.raw, cfg.labels, "train")
    input_contract(config.model.spec).check_window(cfg.crop)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model(config.model.spec)
    settings = AdaptSettings(mode="source", steps=cfg.steps, batch_size=cfg.batch_size, crop=cfg.crop,
                             learning_rate=cfg.learning_rate, density_sigma=_sigma_vx(cfg, raw), seed=cfg.seed,
                             unprompted_share=cfg.unprompted_share,
                             source_augment=dataclasses.replace(WIDE, zoom=cfg.zoom))
    return TrainingInputs(model, settings, DomainData(raw, labels))


def _sigma_vx(cfg: TrainConfig, raw: Any) -> float:
    return cfg.density_sigma_nm / float(raw.voxel_size_nm[2])


def train(config: Config, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train ``model:`` on ``train:`` with ``train.threads`` torch threads and write ``train.checkpoint``
    (replacing one only with ``overwrite``)."""
    config.require("train", command="train")
    assert config.train is not None
    with torch_threads(config.train.threads):
        return _train(config, progress, overwrite)


def _train(config: Config, progress: bool, overwrite: bool) -> TrainResult:
    cfg = config.train
    assert cfg is not None
    check_training_outputs(config, train_inputs(config), "train.checkpoint", cfg.checkpoint, overwrite)
    spec = config.model.spec
    title = f"{spec.name} source training"
    card = {"mode": "source", "data": {"raw": cfg.raw.url, "labels": cfg.labels.url}, "training": cfg.model_dump()}
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if getattr(model, "promptable", False):
        inputs = source_inputs(config, model)
        card["data"]["voxel_size_nm"] = list(inputs.source.raw.voxel_size_nm)
        return train_and_save(config, partial(source_inputs, config), inputs, card, cfg.checkpoint, title, progress,
                              overwrite)
    if config.cluster.workers > 1:
        raise ConfigError(f"cluster.workers is {config.cluster.workers}, but data-parallel training runs "
                          f"Prompt-DAS only and model.name is {spec.name!r}.",
                          "set cluster.workers to 0 (or 1) to train this model in one process.")
    raw, labels = open_labelled(cfg.raw, cfg.labels, "train")
    contract = input_contract(spec)
    contract.check_window(cfg.crop)
    settings = SupervisedSettings(cfg.steps, cfg.batch_size, cfg.learning_rate, _sigma_vx(cfg, raw), cfg.seed)
    bar = StepProgress(cfg.steps, "training", progress)
    try:
        history = train_supervised(model, contract, CropSampler(raw, labels, cfg.crop, cfg.seed,
                                                                   percentiles=contract.percentiles), settings,
                                   on_step=bar)
    finally:
        bar.close()
    card["data"]["voxel_size_nm"] = list(raw.voxel_size_nm)
    return save_trained(cfg.checkpoint, model, spec, {**card, **one_process()}, history, title, overwrite)
