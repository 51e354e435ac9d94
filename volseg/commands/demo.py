"""`volseg demo`: everything end to end on data it generates itself.

Generates synthetic EM volumes, trains a small model on one, segments another blockwise, scores the
result against its labels, and saves a PNG montage (raw | prediction | labels). The demo owns its
output folder: it regenerates or overwrites what an earlier demo run left there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from volseg.commands.evaluate import score_blockwise
from volseg.commands.run import RunResult, run
from volseg.commands.train import train
from volseg.config import Config, SyntheticConfig
from volseg.data.synthetic import generate_volume
from volseg.errors import VolsegError
from volseg.geometry import Box
from volseg.io import create_volume, open_volume
from volseg.metrics import Confusion


@dataclass(frozen=True)
class DemoResult:
    run: RunResult
    score: Confusion
    montage: Path
    seconds: float
    trained: bool


def write_synthetic(cfg: SyntheticConfig) -> None:
    """Generate one synthetic volume and write ``raw`` and ``mito`` arrays under ``cfg.url``."""
    data = generate_volume(cfg.shape, cfg.domain, cfg.seed)
    stamp = {"volseg_synthetic": cfg.model_dump()}
    for name, array in (("raw", data.raw), ("mito", data.mito)):
        volume = create_volume(f"{cfg.url}/{name}", shape=array.shape, dtype=array.dtype,
                               voxel_size_nm=data.voxel_size_nm, exist_ok=True,
                               kind="image")
        volume.write(volume.bounds, array)
        volume.update_attributes(stamp)


def _already_written(cfg: SyntheticConfig) -> bool:
    try:
        attrs = open_volume(f"{cfg.url}/mito").attributes
    except VolsegError:  # not generated yet (or unreadable: regenerate it)
        return False
    return attrs.get("volseg_synthetic") == cfg.model_dump()


def save_montage(raw: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """A PNG of one slice: raw | probability | labels side by side (grey, 8-bit)."""
    def grey(a: np.ndarray, top: float) -> np.ndarray:
        return np.clip(a.astype(np.float32) / top * 255.0, 0, 255).astype(np.uint8)

    prob_top = 1.0 if probabilities.dtype.kind == "f" else float(np.iinfo(probabilities.dtype).max)
    gap = np.full((raw.shape[0], 4), 255, dtype=np.uint8)
    row = np.concatenate([grey(raw, 255.0), gap, grey(probabilities, prob_top), gap,
                          grey(labels > 0, 1.0)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)
    return path


def demo(config: Config, progress: bool = True) -> DemoResult:
    begin = time.perf_counter()
    config.require("synthetic", "train", "input", "output", "eval", command="demo")
    assert config.synthetic and config.train and config.output and config.eval and config.input
    for cfg in config.synthetic:
        if not _already_written(cfg):
            write_synthetic(cfg)
    trained = False
    if config.model.checkpoint is None or not Path(config.model.checkpoint).is_file():
        train(config, progress)
        trained = True
    result = run(config, overwrite=True, progress=progress)
    probabilities = open_volume(config.output.probabilities)
    labels = config.eval.labels.open()
    score = score_blockwise(probabilities, labels, result.plan.grid, config.inference.threshold)
    z = probabilities.shape[0] // 2
    plane = Box((z, 0, 0), (z + 1, *probabilities.shape[1:]))
    montage = save_montage(result.plan.source.read(plane)[0], probabilities.read(plane)[0],
                           labels.read(plane)[0],
                           Path(config.output.probabilities).parent / "demo_montage.png")
    return DemoResult(result, score, montage, time.perf_counter() - begin, trained)
