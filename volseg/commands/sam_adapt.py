"""`volseg sam-adapt CONFIG`: the SAM-based methods (``sam_adapt.method``), each ending in a checkpoint.

- ``sam-prompt`` and ``all-in-sam`` train a SAM (``model.name: sam``; SAM's weights from
  ``sam_adapt.sam_checkpoint``) and write it — SAM and its added parts — as a volseg checkpoint that
  `volseg run` uses like any other (``model.checkpoint``), prompt-free or with prompts.
- ``dfg`` adapts the Prompt-DAS of ``sam_adapt.init`` with SAM's help and writes the adapted Prompt-DAS.

The card records the method, the data, SAM's weights and the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from volseg.commands.adapt import points_in_roi
from volseg.commands.progress import StepProgress
from volseg.commands.train import (
    TrainResult,
    check_training_outputs,
    checkpoint_refs,
    one_process,
    open_labelled,
    save_trained,
    volume_ref,
)
from volseg.config import Config, SamAdaptConfig
from volseg.errors import ConfigError
from volseg.geometry import Box, read_box
from volseg.inference.segment import check_input_dtype
from volseg.io.guard import PathRef, points_ref
from volseg.models import ModelSpec, build_model
from volseg.models.checkpoint import load_checkpoint
from volseg.models.sam.model import SamSegmenter, load_sam
from volseg.threads import torch_threads
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData
from volseg.training.sam.all_in_sam import AllInSamSettings, all_in_sam
from volseg.training.sam.dfg import DfgSettings, dfg_adapt
from volseg.training.sam.dfg_boxes import BoxSearchSettings
from volseg.training.sam.prompt_learning import learn_sam_prompts
from volseg.training.sam.tuning import SamTuneSettings
from volseg.training.sam.weak_labels import WeakLabels, weak_labels_from_instances, weak_labels_from_points

#: Mean-teacher density targets for dfg: Gaussians of this width (as `volseg adapt`'s default).
DFG_DENSITY_SIGMA_NM = 40.0


@dataclass(frozen=True)
class SamAdaptResult:
    """The written checkpoint (with history and loss curve) and lines describing the pseudo-labels."""

    trained: TrainResult
    lines: list[str]


def sam_model(spec: ModelSpec, sam_checkpoint: str | None, seed: int = 0) -> SamSegmenter:
    """A :class:`SamSegmenter` of ``spec`` with SAM's released weights, or randomly initialised (seeded)
    when ``sam_checkpoint`` is None (tests)."""
    if spec.name != "sam":
        raise ConfigError(f"This SAM method trains a SAM, but model.name is {spec.name!r}.",
                          "set model.name: sam with model.options (variant, head_prompt, prefix_tokens, adapter_dim).")
    if sam_checkpoint is not None:
        return load_sam(sam_checkpoint, spec)
    torch.manual_seed(seed)
    model = build_model(spec)
    assert isinstance(model, SamSegmenter)
    return model


def _tune_settings(cfg: SamAdaptConfig, train_decoder: bool) -> SamTuneSettings:
    return SamTuneSettings(steps=cfg.steps, batch_size=cfg.batch_size, crop=cfg.crop, learning_rate=cfg.learning_rate,
                           train_decoder=train_decoder, seed=cfg.seed)


def _weak_slices(cfg: SamAdaptConfig, raw: Any) -> tuple[list[int], list[WeakLabels]]:
    """The annotated z slices (at most ``max_slices``, a seeded random choice) and their weak labels."""
    assert cfg.target is not None
    if cfg.sparse_labels is not None:
        sparse = cfg.sparse_labels.open()
        if tuple(sparse.shape) != tuple(raw.shape):
            raise ConfigError(f"sam_adapt.sparse_labels has shape {sparse.shape}, the target {raw.shape}.",
                              "point sparse_labels at annotations of the target volume.")
        # Find the annotated planes one at a time, then read only the chosen ones again: memory stays at a
        # plane plus ``max_slices`` planes, whatever the volume's depth.
        zs = _choose([z for z in range(raw.shape[0]) if _plane(sparse, z).any()], cfg)
        return zs, [weak_labels_from_instances(_plane(sparse, z)) for z in zs]
    assert cfg.target.points is not None
    points = points_in_roi(cfg.target.points, cfg.target.raw)
    z_of = np.rint(points.zyx[:, 0]).astype(int)
    zs = _choose(sorted(set(z_of.tolist())), cfg)
    return zs, [weak_labels_from_points(points.zyx[z_of == z, 1:]) for z in zs]


def _choose(zs: list[int], cfg: SamAdaptConfig) -> list[int]:
    if not zs:
        raise ConfigError("The weak labels annotate no slice of the target.", "check sparse_labels / target.points.")
    if len(zs) <= cfg.max_slices:
        return zs
    return sorted(np.random.default_rng(cfg.seed).choice(zs, cfg.max_slices, replace=False).tolist())


def _plane(volume: Any, z: int) -> np.ndarray:
    return read_box(volume, Box((z, 0, 0), (z + 1, *volume.shape[1:])))[0]


def _read_slices(raw: Any, zs: list[int]) -> np.ndarray:
    return np.stack([_plane(raw, z) for z in zs])


def _train(cfg: SamAdaptConfig, config: Config, bar: StepProgress) -> tuple[nn.Module, Any, dict[str, Any], list[str]]:
    """Run the method; (model to save, history, card data, summary lines)."""
    spec = config.model.spec
    if cfg.method == "sam-prompt":
        assert cfg.labelled is not None
        model = sam_model(spec, cfg.sam_checkpoint, cfg.seed)
        raw, labels = open_labelled(cfg.labelled.raw, cfg.labelled.labels, "sam_adapt.labelled")
        history = learn_sam_prompts(model, DomainData(raw, labels), _tune_settings(cfg, False), on_step=bar)
        data = {"raw": cfg.labelled.raw.url, "labels": cfg.labelled.labels.url}
        return model, history, data, [f"learned {sum(p.numel() for p in model.added_parameters()):,} prompt "
                                      f"parameters; SAM's {sum(p.numel() for p in model.sam.parameters()):,} frozen"]
    assert cfg.target is not None
    raw = cfg.target.raw.open()
    check_input_dtype(raw.dtype, cfg.target.raw.url, "sam_adapt.target.raw.url")
    data = {"target": cfg.target.raw.url, "target_points": cfg.target.points,
            "sparse_labels": None if cfg.sparse_labels is None else cfg.sparse_labels.url}
    if cfg.method == "all-in-sam":
        model = sam_model(spec, cfg.sam_checkpoint, cfg.seed)
        zs, weak = _weak_slices(cfg, raw)
        settings = AllInSamSettings(cfg.prompt, cfg.supervise, cfg.margin_vx, cfg.min_size_vx,
                                    _tune_settings(cfg, True))
        history, pseudo = all_in_sam(model, _read_slices(raw, zs), weak, settings, on_step=bar)
        return model, history, data, [f"SAM pseudo-masks: {pseudo.kept} of {pseudo.prompted} weakly labelled "
                                      f"objects kept, on {len(zs)} slices ({cfg.prompt} prompts)"]
    assert cfg.init is not None
    target_model = load_checkpoint(cfg.init, spec, "sam_adapt.init")
    sam = sam_model(ModelSpec("sam", options={"variant": cfg.sam_variant}), cfg.sam_checkpoint, cfg.seed)
    search = BoxSearchSettings(step_vx=cfg.dfg_step_vx, feature_threshold=cfg.dfg_feature_threshold,
                               stable_iou=cfg.dfg_stable_iou, max_steps=cfg.dfg_max_steps)
    dfg = DfgSettings(cfg.dfg_slices, tuple(cfg.crop[1:]), cfg.dfg_seed_threshold, cfg.min_size_vx, cfg.min_size_vx,
                      search, cfg.seed)
    adapt = AdaptSettings(mode="uda", steps=cfg.steps, batch_size=cfg.batch_size, crop=cfg.crop,
                          learning_rate=cfg.learning_rate, seed=cfg.seed,
                          density_sigma=DFG_DENSITY_SIGMA_NM / float(raw.voxel_size_nm[2]))
    result, pseudo = dfg_adapt(target_model, sam, raw, dfg, adapt, on_step=bar)
    data["init"] = cfg.init
    return result.model, result.history, data, [f"DFG box prompts: {pseudo.kept} of {pseudo.tried} target objects "
                                                 f"stabilised on {len(pseudo.raw)} slices"]


def sam_adapt_paths(config: Config) -> list[PathRef]:
    """What `volseg sam-adapt` reads: its volumes, points, SAM's weights and the starting checkpoint."""
    cfg = config.sam_adapt
    assert cfg is not None
    inputs = volume_ref("sam_adapt.sparse_labels", cfg.sparse_labels)
    if cfg.labelled is not None:
        inputs += [*volume_ref("sam_adapt.labelled.raw", cfg.labelled.raw),
                   *volume_ref("sam_adapt.labelled.labels", cfg.labelled.labels)]
    if cfg.target is not None:
        inputs += [*volume_ref("sam_adapt.target.raw", cfg.target.raw),
                   *volume_ref("sam_adapt.target.labels", cfg.target.labels)]
        if cfg.target.points is not None:
            inputs.append(points_ref("sam_adapt.target.points", cfg.target.points))
    if cfg.sam_checkpoint is not None:
        inputs.append(PathRef("sam_adapt.sam_checkpoint", cfg.sam_checkpoint, "file"))
    return inputs + checkpoint_refs("sam_adapt.init", cfg.init)


def sam_adapt(config: Config, progress: bool = True, overwrite: bool = False) -> SamAdaptResult:
    """Run ``sam_adapt.method`` with ``sam_adapt.threads`` torch threads and write ``sam_adapt.checkpoint``
    (see the module docstring); an existing checkpoint is replaced only with ``overwrite``."""
    config.require("sam_adapt", command="sam-adapt")
    assert config.sam_adapt is not None
    with torch_threads(config.sam_adapt.threads):
        return _sam_adapt(config, progress, overwrite)


def _sam_adapt(config: Config, progress: bool, overwrite: bool) -> SamAdaptResult:
    cfg = config.sam_adapt
    assert cfg is not None
    if cfg.method == "dfg" and config.model.name != "promptdas":
        raise ConfigError(f"method dfg adapts Prompt-DAS, but model.name is {config.model.name!r}.",
                          "set model: to the spec of the sam_adapt.init checkpoint (see its .json card).")
    check_training_outputs(config, sam_adapt_paths(config), "sam_adapt.checkpoint", cfg.checkpoint, overwrite)
    title = f"SAM {cfg.method}"
    bar = StepProgress(cfg.steps, title, progress)
    try:
        model, history, data, lines = _train(cfg, config, bar)
    finally:
        bar.close()
    if cfg.sam_checkpoint is None:
        lines.append("SAM weights: randomly initialised (no sam_adapt.sam_checkpoint; for tests only)")
    card = {"mode": cfg.method, "data": data, "sam_checkpoint": cfg.sam_checkpoint, "sam_adapt": cfg.model_dump()}
    trained = save_trained(cfg.checkpoint, model, config.model.spec, {**card, **one_process()}, history, title,
                           overwrite)
    return SamAdaptResult(trained, lines)
