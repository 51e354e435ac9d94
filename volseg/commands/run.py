"""`volseg run CONFIG`: segment a volume blockwise and write the outputs."""

from __future__ import annotations

from dataclasses import dataclass

from volseg.commands.progress import BlockProgress
from volseg.config import Config
from volseg.inference.executor import RunStats, SerialExecutor
from volseg.inference.segment import SegmentationPlan, make_job, open_outputs, plan_segmentation


@dataclass(frozen=True)
class RunResult:
    plan: SegmentationPlan
    stats: RunStats

    def summary_lines(self) -> list[str]:
        plan, stats = self.plan, self.stats
        lines = [
            f"segmented {stats.voxels:,} voxels in {stats.blocks_done} blocks "
            f"(block core {plan.grid.core_shape}, window {plan.windows.window}, "
            f"stride {plan.windows.stride})",
            f"wall time {stats.seconds:.1f} s, {stats.voxels_per_second / 1e6:.2f} Mvoxels/s "
            f"on {plan.predictor.device}",
        ]
        if plan.points is not None:
            lines.append(f"prompts: {len(plan.points)} points from {plan.config.prompts.points}")
        lines += [f"{spec.name}: {spec.url}" for spec in plan.outputs]
        lines.append(f"run signature {plan.signature[:16]}")
        return lines


def run(config: Config, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Plan (validating everything), create outputs, and run every block serially."""
    plan = plan_segmentation(config, overwrite)
    job = make_job(plan, open_outputs(plan))
    bar = BlockProgress(plan.grid.num_blocks, plan.grid.roi.size, progress)
    try:
        stats = SerialExecutor(config.execution.prefetch).run(job, plan.grid, on_done=bar)
    finally:
        bar.close()
    return RunResult(plan, stats)
