"""Multiscale outputs, blockwise: each scale level computed from the one below, one block per few chunks.

A block of level k writes its core (whole chunks of level k) from the box of level k - 1 that its voxels
cover (the core times the factor, cut at the volume's edge), downsampled by tensorstore
(``tensorstore.downsample``): ``mean`` for probabilities and density, ``mode`` for instance labels. A
voxel of level k depends on that box only, so blockwise levels equal downsampling the whole volume, and
every pass is resumable like the others (its done-marks are named after the output and the level)::

    level 0  ████████████████   (the run's output)
    level 1  ████████            each block: read 2 × its core below, downsample, write its core
    level 2  ████
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tensorstore as ts

from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import BlockDone, Executor, PassStart, Pending, StageResult, run_stage
from volseg.geometry import Block, BlockGrid, Box
from volseg.io import Volume
from volseg.io.pyramid import create_level, level_factors

Method = Literal["mean", "mode"]
#: Voxels a block of a level aims at (whole chunks of that level).
BLOCK_VOXELS = 2**24


class DownsampleStage:
    """Level ``target`` from level ``source`` (``factor`` z, y, x) by ``method``; writes each core."""

    def __init__(self, source: Volume, target: Volume, factor: Sequence[int], method: Method, name: str) -> None:
        self.source, self.target = source, target
        self.factor = tuple(int(f) for f in factor)
        self.method = method
        self.name = name

    def source_box(self, block: Block) -> Box:
        start = tuple(s * f for s, f in zip(block.core.start, self.factor, strict=True))
        stop = tuple(min(e * f, n) for e, f, n in zip(block.core.stop, self.factor, self.source.shape, strict=True))
        return Box(start, stop)

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        return self.source.read_async(self.source_box(block))

    def compute(self, block: Block, data: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(data)
        factors = (1,) * (array.ndim - 3) + self.factor
        out = ts.downsample(ts.array(array), list(factors), self.method).read().result()
        return np.asarray(out, dtype=self.target.dtype)

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return [self.target.write_async(block.core, computed)]

    def outcome(self, block: Block, computed: np.ndarray) -> None:
        return None

    def to(self, device: str) -> None:
        return None


def level_grid(volume: Volume, roi: Box | None = None) -> BlockGrid:
    """Blocks of whole chunks of ``volume`` (one chunk deep, about :data:`BLOCK_VOXELS` each) over ``roi``
    widened to whole chunks (default: the whole volume)."""
    chunk = volume.write_chunk
    bounds = volume.bounds
    if roi is not None:
        start = tuple(s // c * c for s, c in zip(roi.start, chunk, strict=True))
        stop = tuple(min(-(-e // c) * c, n) for e, c, n in zip(roi.stop, chunk, bounds.stop, strict=True))
        bounds = Box(start, stop)
    grow = max(1, int(math.sqrt(BLOCK_VOXELS / max(1, math.prod(chunk)))))
    return BlockGrid.aligned(bounds, (chunk[0], chunk[1] * grow, chunk[2] * grow), 0, volume.bounds, chunk)


def build_pyramid(executor: Executor, volume: Volume, levels: int, method: Method, name: str,
                  ledger: BlockLedger | None = None, roi: Box | None = None, on_done: BlockDone | None = None,
                  on_start: PassStart | None = None) -> list[StageResult]:
    """Levels 1 … ``levels - 1`` of ``volume`` (level 0), each created then computed from the one below,
    over the part of each level that ``roi`` (of level 0; default all) covers; ``name`` names the passes'
    done-marks (``pyramid-<name>-<level>``)."""
    results: list[StageResult] = []
    below = volume
    for level, factor in enumerate(level_factors(volume.voxel_size_nm, levels), start=1):
        target = create_level(below, level, factor)
        if roi is not None:
            roi = Box(tuple(s // f for s, f in zip(roi.start, factor, strict=True)),
                      tuple(-(-e // f) for e, f in zip(roi.stop, factor, strict=True)))
        stage = DownsampleStage(below, target, factor, method, f"pyramid-{name}-{level}")
        result = run_stage(executor, stage, level_grid(target, roi), ledger, on_done, on_start)
        results.append(result)
        if result.stats.failed:
            break
        below = target
    return results
