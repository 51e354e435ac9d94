"""`volseg demo`: everything end to end on data it generates itself.

Generates synthetic EM volumes in two microscope domains, trains Prompt-DAS on the labelled source
domain, adapts it to the target domain without labels (mean teacher), segments a held-out target
volume blockwise with the source-only and the adapted model, scores both against the labels and saves a
PNG montage (raw | source-only | adapted | labels). The demo owns its output folder: it reuses the
checkpoints and volumes an earlier demo left there and overwrites its predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from volseg.commands.adapt import adapt
from volseg.commands.run import RunResult, run
from volseg.commands.train import train
from volseg.config import Config, SyntheticConfig
from volseg.data.synthetic import generate_volume
from volseg.errors import OutputExistsError, VolumeNotFoundError
from volseg.evaluation.metrics import Confusion
from volseg.evaluation.streaming import score_blockwise
from volseg.geometry import Box
from volseg.io import create_volume, open_volume


@dataclass(frozen=True)
class Scored:
    run: RunResult
    score: Confusion


@dataclass(frozen=True)
class DemoResult:
    before: Scored
    after: Scored
    montage: Path
    seconds: float
    trained: list[str]
    mode: str


def write_synthetic(cfg: SyntheticConfig) -> None:
    """Generate one synthetic volume and write ``raw`` and ``mito`` arrays under ``cfg.url``; arrays
    there that the demo did not generate are never written (:class:`OutputExistsError`)."""
    for name in ("raw", "mito"):
        existing = _stamp(f"{cfg.url}/{name}")
        if existing is not None and not existing:
            raise OutputExistsError(f"synthetic url {cfg.url!r} holds {name}, which volseg's demo did not generate; "
                                    "the demo never writes over it.", "choose another synthetic url.")
    data = generate_volume(cfg.shape, cfg.domain, cfg.seed)
    stamp = {"volseg_synthetic": cfg.model_dump()}
    for name, array in (("raw", data.raw), ("mito", data.mito)):
        volume = create_volume(f"{cfg.url}/{name}", shape=array.shape, dtype=array.dtype,
                               voxel_size_nm=data.voxel_size_nm, exist_ok=True, kind="image")
        volume.write(volume.bounds, array)
        volume.update_attributes(stamp)


def _stamp(url: str) -> dict | None:
    """The demo's stamp on the volume at ``url``: None if nothing is there, ``{}`` if it has none."""
    try:
        volume = open_volume(url)
    except VolumeNotFoundError:
        return None
    return volume.attributes.get("volseg_synthetic") or {}


def already_generated(cfg: SyntheticConfig) -> bool:
    """Whether ``cfg``'s volumes exist as the demo generated them from this very config."""
    return all(_stamp(f"{cfg.url}/{name}") == cfg.model_dump() for name in ("raw", "mito"))


def _grey(a: np.ndarray, top: float) -> np.ndarray:
    return np.clip(a.astype(np.float32) / top * 255.0, 0, 255).astype(np.uint8)


def save_montage(panels: list[np.ndarray], path: Path) -> Path:
    """A PNG of 8-bit grey panels side by side, separated by white gaps."""
    gap = np.full((panels[0].shape[0], 4), 255, dtype=np.uint8)
    row = [p for panel in panels for p in (panel, gap)][:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(row, axis=1)).save(path)
    return path


def _segment_and_score(config: Config) -> Scored:
    assert config.output is not None and config.eval is not None
    result = run(config, overwrite=True, progress=False)
    score = score_blockwise(open_volume(config.output.probabilities), config.eval.labels.open(),
                            result.plan.grid, config.eval.threshold)
    return Scored(result, score)


def _source_only(config: Config) -> Config:
    """The same run with the source checkpoint, written beside the adapted outputs."""
    assert config.output is not None and config.train is not None
    out = config.output
    renamed = {"probabilities": out.probabilities + "_source_only",
               "density": None if out.density is None else out.density + "_source_only"}
    return config.model_copy(update={
        "model": config.model.model_copy(update={"checkpoint": config.train.checkpoint}),
        "output": out.model_copy(update=renamed),
    })


def demo(config: Config, progress: bool = True) -> DemoResult:
    begin = time.perf_counter()
    config.require("synthetic", "train", "adapt", "input", "output", "eval", command="demo")
    assert config.synthetic and config.train and config.adapt and config.output and config.eval
    for cfg in config.synthetic:
        if not already_generated(cfg):
            write_synthetic(cfg)
    trained = []
    if not Path(config.train.checkpoint).is_file():
        train(config, progress, overwrite=True)  # the demo owns its folder: a curve left by a stopped demo goes
        trained.append("source")
    if not Path(config.adapt.checkpoint).is_file():
        adapt(config, progress, overwrite=True)
        trained.append(config.adapt.mode)
    before = _segment_and_score(_source_only(config))
    after = _segment_and_score(config)
    z = after.run.plan.source.shape[0] // 2
    plane = Box((z, 0, 0), (z + 1, *after.run.plan.source.shape[1:]))
    top = float(np.iinfo(np.uint8).max) if config.output.dtype == "uint8" else 1.0
    panels = [_grey(after.run.plan.source.read(plane)[0], 255.0),
              _grey(open_volume(before.run.plan.outputs[0].url).read(plane)[0], top),
              _grey(open_volume(config.output.probabilities).read(plane)[0], top),
              _grey(config.eval.labels.open().read(plane)[0] > 0, 1.0)]
    montage = save_montage(panels, Path(config.output.probabilities).parent / "demo_montage.png")
    return DemoResult(before, after, montage, time.perf_counter() - begin, trained, config.adapt.mode)
