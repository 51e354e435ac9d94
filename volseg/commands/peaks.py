"""`volseg peaks CONFIG --out points.csv`: a run's density map → its global peaks, as a points file.

This chains Prompt-DAS into SAM, which has no density head of its own: segment with Prompt-DAS writing
``output.density``, export that map's peaks, and give the file to a SAM run as ``prompts.points`` (each
peak then prompts one object). Peaks are found exactly as ``prompts.auto`` finds them (blockwise, equal
to a whole-volume search; ``prompts.peak_threshold`` and ``prompts.min_distance_nm`` of the config, or
their defaults) and written as a CSV of voxel indices ``z,y,x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volseg.config import Config, PromptsConfig
from volseg.engine.serial import SerialExecutor
from volseg.errors import ConfigError, OutputExistsError
from volseg.geometry import BlockGrid, PointSet
from volseg.inference.peaks import PeakStage, gather_peaks, peak_radius
from volseg.io import open_volume
from volseg.io.guard import PathRef, check_outputs

#: Blocks of the peak search: the density's storage chunks grown to about this many voxels.
PEAK_BLOCK_VOXELS = 1 << 24


def export_peaks(config: Config, out: str | Path) -> PointSet:
    """Find the peaks of ``config.output.density`` and write them to ``out`` (CSV ``z,y,x``), which
    must not exist yet (volseg never replaces a file it cannot tell it wrote)."""
    config.require("output", command="peaks")
    assert config.output is not None
    if config.output.density is None:
        raise ConfigError(f"{config.source_path or 'config'}: output.density is not set, so there is no density "
                          "map to take peaks from.", "run Prompt-DAS with output.density set, and name it here.")
    target = PathRef("--out", str(out), "file")
    check_outputs([PathRef("output.density", config.output.density)], [target])
    if Path(out).exists():
        raise OutputExistsError(f"--out {str(out)!r} already exists; volseg never replaces it.",
                                "choose another --out path.")
    density = open_volume(config.output.density)
    prompts = config.prompts
    threshold = prompts.peak_threshold if prompts else PromptsConfig.model_fields["peak_threshold"].default
    distance = prompts.min_distance_nm if prompts else PromptsConfig.model_fields["min_distance_nm"].default
    radius = peak_radius(distance, density.voxel_size_nm, config.inference.window)
    core = list(density.chunk_shape)
    while int(np.prod(core)) < PEAK_BLOCK_VOXELS and core[0] < density.shape[0]:
        core[0] += density.chunk_shape[0]
    grid = BlockGrid(density.bounds, tuple(core), 0, density.bounds)
    stats = SerialExecutor(config.execution.prefetch).run(PeakStage(density, threshold, radius), grid)
    points = gather_peaks(stats.outcomes)
    order = np.lexsort(points.zyx.T[::-1]) if len(points) else np.zeros(0, int)
    rows = "".join(f"{int(z)},{int(y)},{int(x)}\n" for z, y, x in points.zyx[order])
    with open(out, "x") as file:  # "x": fails rather than replace a file that appeared meanwhile
        file.write("z,y,x\n" + rows)
    return points
