"""The segment stage: :class:`SegmentationJob` reads a block with its windows' context, predicts, blends and
writes the core into the outputs (a :class:`~volseg.engine.stage.BlockStage`; any executor runs it).
It pickles small (volumes as their specs, the model as its weights), so Ray ships it to each actor once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.engine.stage import Pending
from volseg.errors import VolumeFormatError
from volseg.geometry import Block, Box, PointSet
from volseg.inference.blockwise import predict_box
from volseg.inference.planes import planes_read_box
from volseg.inference.predictor import Predictor
from volseg.inference.windows import WindowGrid
from volseg.io.point_index import PointIndex


@dataclass(frozen=True)
class OutputTarget:
    """An output volume and the prediction channels it stores (``channels``: consecutive indices into
    the C+1 stack)."""

    volume: Any
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        if list(self.channels) != list(range(self.channels[0], self.channels[0] + len(self.channels))):
            raise ValueError(f"output channels {self.channels} are not consecutive")


def to_storage(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert float predictions to an output dtype: floats as they are, integers as ``[0, 1]`` scaled
    to the dtype's full range and rounded (probabilities outside [0, 1] are clipped first)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    top = np.iinfo(dtype).max
    return np.rint(np.clip(values, 0.0, 1.0) * top).astype(dtype)


FINITE_FIX = ("replace them by finite grey values in [0, 1] (e.g. numpy.nan_to_num), or set roi to a region "
              "without them.")


def count_not_finite(values: np.ndarray) -> int:
    """How many values are NaN or ±Inf (0 for integer arrays)."""
    if values.dtype.kind != "f":
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


@dataclass(frozen=True)
class _WithPoints:
    """A block's pending voxels and the prompts in its read box (read from a point index)."""

    voxels: Pending
    points: PointSet

    def result(self) -> tuple[np.ndarray, PointSet]:
        return self.voxels.result(), self.points


class SegmentationJob:
    """Read core + context from ``source``, predict and blend, write the core into ``outputs``.

    ``points`` (volume coordinates) are routed as prompts to every window that contains them: a
    :class:`~volseg.geometry.PointSet` travels with the stage; a :class:`~volseg.io.point_index.PointIndex`
    stays in storage and each block reads the points in its read box (which holds every window it runs)."""

    name = "segment"

    def __init__(
        self,
        source: Any,
        outputs: Sequence[OutputTarget],
        predictor: Predictor,
        windows: WindowGrid,
        blend: str = "cosine",
        batch_windows: int = 16,
        points: PointSet | PointIndex | None = None,
        planes: Sequence[str] = ("xy",),
    ) -> None:
        self.source = source
        self.outputs = tuple(outputs)
        self.predictor = predictor
        self.windows = windows
        self.blend = blend
        self.batch_windows = batch_windows
        self.points = points
        self.planes = tuple(planes)

    def read_box(self, block: Block) -> Box:
        """The union of the global windows (of every plane) that overlap the block's core."""
        return planes_read_box(self.windows, block.core, self.planes)

    def read(self, block: Block) -> Pending:
        """Start reading everything ``block``'s windows need; ``.result()`` gives the array (and, from a
        point index, the prompts in the read box)."""
        box = self.read_box(block)
        voxels = self.source.read_async(box)
        return _WithPoints(voxels, self.points.read(box)) if isinstance(self.points, PointIndex) else voxels

    def compute(self, block: Block, data: np.ndarray | tuple[np.ndarray, PointSet]) -> np.ndarray:
        """``(C+1) × core`` blended predictions of the block; a block whose input holds NaN or ±Inf
        fails (the model would spread them over the block) with the count."""
        data, points = data if isinstance(data, tuple) else (data, self.points)
        bad = count_not_finite(data)
        if bad:
            raise VolumeFormatError(f"block {block.id}: the input holds {bad:,} NaN or infinite voxels in "
                                    f"{self.read_box(block)}.", FINITE_FIX)
        return predict_box(self.source, self.predictor, self.windows, block.core, self.blend, data,
                           self.batch_windows, points, self.planes)

    def write(self, block: Block, blended: np.ndarray) -> list[Pending]:
        """Start writing the block's core into every output; each future resolves once durable."""
        pending = []
        for target in self.outputs:
            first, last = target.channels[0], target.channels[-1]
            values = blended[first : last + 1]  # a view: an output's channels are contiguous
            if target.volume.num_channels is None:
                values = values[0]
            # ``blended`` is this block's own array and nothing changes it after compute: hand it over.
            pending.append(target.volume.write_async(block.core, to_storage(values, target.volume.dtype),
                                                     handover=True))
        return pending

    def outcome(self, block: Block, computed: np.ndarray) -> None:
        return None

    def to(self, device: str) -> None:
        self.predictor.to(device)
