"""`volseg adapt CONFIG`: mean-teacher adaptation (UDA / WDA) or the target oracle.

Starts from ``adapt.init`` (a source-trained checkpoint), trains on crops sampled straight from the
volumes, in one process or, with ``cluster.workers`` > 1, data-parallel under Ray Train (the same loop,
see :mod:`volseg.training.distributed`), and writes a checkpoint whose card records the mode, the data
(source, target, points), the starting checkpoint, the settings and the workers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from volseg.commands.train import (
    TrainResult,
    check_training_outputs,
    checkpoint_refs,
    open_labelled,
    train_and_save,
    volume_ref,
)
from volseg.config import Config, VolumeRef
from volseg.errors import ConfigError
from volseg.geometry import Box, PointSet
from volseg.inference.segment import check_input_dtype, check_not_empty
from volseg.io.guard import PathRef, points_ref
from volseg.io.points import read_points
from volseg.models import build_model
from volseg.models.checkpoint import load_checkpoint, read_card
from volseg.threads import torch_threads
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, TrainingInputs


def adapt_inputs(config: Config) -> TrainingInputs:
    """The model (from ``adapt.init``, else built and seeded with ``adapt.seed``), the settings and the
    source / target domains of ``adapt:``, opened in this process."""
    cfg = config.adapt
    assert cfg is not None
    spec = config.model.spec
    target_raw = cfg.target.raw.open("adapt.target.raw")
    check_input_dtype(target_raw.dtype, cfg.target.raw.url, "adapt.target.raw.url")
    check_not_empty(target_raw, cfg.target.raw.url, "adapt.target.raw.url")
    points = None
    if cfg.target.points is not None:
        points = points_in_roi(cfg.target.points, cfg.target.raw)
    target_labels = None
    if cfg.target.labels is not None:
        target_raw, target_labels = open_labelled(cfg.target.raw, cfg.target.labels, "adapt.target")
    source = None
    if cfg.source is not None:
        source = DomainData(*open_labelled(cfg.source.raw, cfg.source.labels, "adapt.source"))
    if cfg.init is not None:
        model = load_checkpoint(cfg.init, spec, "adapt.init")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
    settings = AdaptSettings.from_config(cfg, target_voxel_nm=float(target_raw.voxel_size_nm[2]),
                                         source_voxel_nm=None if source is None else float(source.raw.voxel_size_nm[2]),
                                         target_depth_nm=float(target_raw.voxel_size_nm[0]))
    return TrainingInputs(model, settings, source, DomainData(target_raw, target_labels, points))


def points_in_roi(points_file: str, ref: VolumeRef) -> PointSet:
    """The points of a file over the whole volume of ``ref``, keeping (in its ``roi``'s coordinates) the
    ones inside its ``roi``: the points of the slices held out for testing are not training points."""
    whole = VolumeRef(url=ref.url, scale=ref.scale, backend=ref.backend).open()
    points = read_points(points_file, whole.voxel_size_nm, whole.voxel_offset, whole.bounds)
    if ref.roi is None:
        return points
    return PointSet(points.inside(Box(ref.roi.start, ref.roi.stop)))


def adapt_paths(config: Config) -> list[PathRef]:
    """What `volseg adapt` reads: the volumes, the points and the starting checkpoint."""
    cfg = config.adapt
    assert cfg is not None
    inputs = [*volume_ref("adapt.target.raw", cfg.target.raw), *volume_ref("adapt.target.labels", cfg.target.labels)]
    if cfg.source is not None:
        inputs += [*volume_ref("adapt.source.raw", cfg.source.raw),
                   *volume_ref("adapt.source.labels", cfg.source.labels)]
    if cfg.target.points is not None:
        inputs.append(points_ref("adapt.target.points", cfg.target.points))
    return inputs + checkpoint_refs("adapt.init", cfg.init)


def adapt(config: Config, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Adapt as ``adapt:`` says, with ``adapt.threads`` torch threads, and write ``adapt.checkpoint``
    (replacing one only with ``overwrite``)."""
    config.require("adapt", command="adapt")
    assert config.adapt is not None
    with torch_threads(config.adapt.threads):
        return _adapt(config, progress, overwrite)


def _adapt(config: Config, progress: bool, overwrite: bool) -> TrainResult:
    cfg = config.adapt
    assert cfg is not None
    spec = config.model.spec
    if spec.name != "promptdas":
        raise ConfigError(f"`volseg adapt` adapts Prompt-DAS, but model.name is {spec.name!r}.",
                          "set model.name: promptdas (and model.options as the source checkpoint's card says).")
    check_training_outputs(config, adapt_paths(config), "adapt.checkpoint", cfg.checkpoint, overwrite)
    inputs = adapt_inputs(config)
    assert inputs.target is not None
    points = inputs.target.points
    card: dict[str, Any] = {
        "mode": cfg.mode,
        "data": {
            "source": None if cfg.source is None else {"raw": cfg.source.raw.url, "labels": cfg.source.labels.url},
            "target": cfg.target.raw.url,
            "target_points": cfg.target.points,
            "target_points_count": None if points is None else len(points),
            "target_labels": None if cfg.target.labels is None else cfg.target.labels.url,
        },
        "init": {"checkpoint": cfg.init, "card": read_card(cfg.init) if cfg.init else None},
        "adaptation": cfg.model_dump(),
    }
    return train_and_save(config, partial(adapt_inputs, config), inputs, card, cfg.checkpoint,
                          f"Prompt-DAS {cfg.mode}", progress, overwrite)
