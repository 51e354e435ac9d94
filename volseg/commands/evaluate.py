"""Scoring a semantic output against labels, streamed block by block (memory stays one block)."""

from __future__ import annotations

from typing import Any

import numpy as np

from volseg.errors import VolumeFormatError
from volseg.geometry import BlockGrid, read_box
from volseg.metrics import Confusion


def foreground_threshold(dtype: np.dtype, threshold: float) -> float:
    """The stored value equivalent to probability ``threshold`` in an output of ``dtype`` (integer
    outputs store probabilities scaled to the dtype's full range)."""
    return threshold if dtype.kind == "f" else threshold * float(np.iinfo(dtype).max)


def score_blockwise(probabilities: Any, labels: Any, grid: BlockGrid, threshold: float = 0.5) -> Confusion:
    """Foreground confusion counts of ``probabilities > threshold`` against ``labels > 0`` over the grid."""
    if tuple(probabilities.shape) != tuple(labels.shape):
        raise VolumeFormatError(
            f"The labels have shape {tuple(labels.shape)} but the prediction has "
            f"{tuple(probabilities.shape)}.",
            "score against the label volume of the segmented dataset (same scale).",
        )
    cut = foreground_threshold(np.dtype(probabilities.dtype), threshold)
    counts = Confusion()
    for block in grid:
        counts = counts + Confusion.of(read_box(probabilities, block.core) > cut,
                                       read_box(labels, block.core) > 0)
    return counts
