"""Intensity normalisation that survives a change of microscope: robust per-volume grey-value ranges.

Two microscopes rarely agree on grey values: serial-section TEM may spread its voxels over 14…217 of
uint8 where a FIB-SEM volume keeps to 78…196. A model that sees voxels scaled by the dtype's maximum
learns one microscope's contrast. Instead, each volume's grey values are mapped through its own
robust range: the ``(low, high)`` percentiles of a sample spread over the whole volume become 0 and 1
(values beyond are clipped), on every block of a run and every training crop of that volume.

The sample is a fixed lattice of boxes over the volume (``SAMPLE_LATTICE`` per axis, each
``SAMPLE_BOX`` voxels or the volume's extent), so the range depends only on the volume, never on the
order in which blocks are read, the block shape or the region of interest: blockwise output stays
equal to a whole-volume pass. A run computes it once and stores it with its outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.geometry import Box, read_box

#: Boxes of the sample, per axis (z, y, x), spread evenly over the volume.
SAMPLE_LATTICE = (4, 4, 4)
#: The shape of each sampled box (clipped to the volume).
SAMPLE_BOX = (1, 256, 256)


@dataclass(frozen=True)
class IntensityRange:
    """Grey values ``low`` → 0 and ``high`` → 1 (raw units of the volume), the ``percentiles`` of a
    sample of ``voxels`` voxels."""

    low: float
    high: float
    percentiles: tuple[float, float] = (1.0, 99.0)
    voxels: int = 0

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"intensity range ({self.low}, {self.high}) is empty")

    @property
    def bounds(self) -> tuple[float, float]:
        return self.low, self.high

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "percentiles": list(self.percentiles), "voxels": self.voxels}


def sample_boxes(shape: Sequence[int], lattice: Sequence[int] = SAMPLE_LATTICE,
                 box: Sequence[int] = SAMPLE_BOX) -> list[Box]:
    """The sample's boxes: ``lattice`` positions per axis, evenly spaced from the volume's start to its
    end, each of shape ``box`` clipped to the volume; repeated boxes (small volumes) are kept once."""
    shape = tuple(int(s) for s in shape)
    size = tuple(min(int(b), s) for b, s in zip(box, shape, strict=True))
    starts = [sorted({(s - c) * i // max(n - 1, 1) for i in range(n)})
              for s, c, n in zip(shape, size, lattice, strict=True)]
    return [Box.from_shape(size, (z, y, x)) for z in starts[0] for y in starts[1] for x in starts[2]]


def read_boxes(volume: Any, boxes: Sequence[Box]) -> list[np.ndarray]:
    """The voxels of each box, in order; a storage volume (``read_async``) reads them in parallel."""
    if hasattr(volume, "read_async"):
        pending = [volume.read_async(box) for box in boxes]
        return [np.asarray(p.result()) for p in pending]
    return [np.asarray(read_box(volume, box)) for box in boxes]


def measure_intensity(volume: Any, percentiles: Sequence[float] = (1.0, 99.0)) -> IntensityRange:
    """The robust grey-value range of ``volume`` (a :class:`volseg.io.Volume`, anything with ``shape``
    and ``read(box)``, or a numpy array): the ``percentiles`` of :func:`sample_boxes`.

    A volume whose sample is one grey value gets the range ``(v, v + 1)``."""
    parts = read_boxes(volume, sample_boxes(tuple(volume.shape)[-3:]))
    values = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
    low, high = (float(v) for v in np.percentile(values, [float(p) for p in percentiles]))
    if not high > low:
        high = low + 1.0
    return IntensityRange(low, high, (float(percentiles[0]), float(percentiles[1])), int(values.size))
