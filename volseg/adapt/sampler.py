"""Random crops read straight from storage, for training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.errors import ConfigError
from volseg.geometry import Box, Coord, read_box


@dataclass
class CropSampler:
    """Draws crops of ``crop`` voxels (z, y, x) at uniformly random positions of ``raw``.

    ``labels``, when given, is read over the same box. Each sampler owns its random stream (``seed``),
    so parallel workers with different seeds draw different crops reproducibly.
    """

    raw: Any
    labels: Any | None
    crop: Coord
    seed: int = 0

    def __post_init__(self) -> None:
        self.crop = tuple(int(c) for c in self.crop)
        self.rng = np.random.default_rng(self.seed)
        shape = tuple(self.raw.shape[-3:])
        if self.labels is not None and tuple(self.labels.shape[-3:]) != shape:
            raise ConfigError(
                f"train.labels has shape {tuple(self.labels.shape)} but train.raw has {shape}; "
                "labels must cover the raw volume voxel for voxel.",
                "point train.labels at the label volume of the same dataset.",
            )
        if any(c > s for c, s in zip(self.crop, shape, strict=True)):
            raise ConfigError(f"train.crop {self.crop} is larger than the volume {shape}.",
                              "choose a crop that fits inside the volume on every axis.")
        self.shape = shape

    def box(self) -> Box:
        start = [int(self.rng.integers(0, s - c + 1)) for s, c in zip(self.shape, self.crop, strict=True)]
        return Box.from_shape(self.crop, start)

    def sample(self) -> tuple[np.ndarray, np.ndarray | None]:
        box = self.box()
        raw = read_box(self.raw, box)
        labels = None if self.labels is None else read_box(self.labels, box)
        return raw, labels

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``n`` crops stacked: raw ``n×Z×Y×X`` and labels likewise (or None)."""
        pairs = [self.sample() for _ in range(n)]
        raw = np.stack([p[0] for p in pairs])
        labels = None if self.labels is None else np.stack([p[1] for p in pairs])
        return raw, labels
