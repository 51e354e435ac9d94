"""`volseg run CONFIG`: segment a volume blockwise and write the outputs, resuming where a run stopped.

Passes, each a block stage run by the configured executor (serial, or Ray actors) with done-marks in
the output's ledger: ``segment`` (probabilities and density); or, with ``prompts.auto``, ``density``
(prompt-free density map), ``peaks`` (global density peaks) and ``segment`` prompted by those peaks;
then ``min-area`` with ``output.min_area_nm2`` (small 2D components zeroed in the probabilities),
``confirm`` with ``prompts.confirm_nm`` (components no prompt confirms zeroed) and the instance passes
with ``instances``.
Blocks marked done under the same run signature are skipped; a block that fails every attempt is
reported by id, the other blocks still finish, and the next run retries only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from volseg.commands.progress import BlockProgress
from volseg.config import Config
from volseg.engine.lease import Leases, holding
from volseg.engine.ledger import BlockLedger
from volseg.engine.serial import SerialExecutor
from volseg.engine.stage import BlockStage, RunStats, StageResult, run_stage
from volseg.geometry import Block, BlockGrid, PointSet
from volseg.inference.job import OutputTarget
from volseg.inference.peaks import PeakStage, peak_radius
from volseg.inference.postprocess import CONFIRM_EXTENT_NM, ConfirmStage, MinAreaStage, min_area_pixels
from volseg.inference.pyramid import build_pyramid
from volseg.inference.segment import (
    SegmentationPlan,
    check_device,
    check_existing_outputs,
    make_confirm,
    make_job,
    make_min_area,
    open_outputs,
    plan_segmentation,
    resolve_device,
)
from volseg.instances.run import InstanceResult, run_instances
from volseg.io import open_volume
from volseg.io.point_index import PointIndex
from volseg.threads import torch_threads


@dataclass
class RunResult:
    plan: SegmentationPlan
    passes: list[StageResult] = field(default_factory=list)
    executor: str = "serial"
    seconds: float = 0.0
    prompts: PointSet | PointIndex | None = None
    instances: InstanceResult | None = None

    @property
    def stats(self) -> RunStats:
        """The segmenting pass."""
        return next((p.stats for p in reversed(self.passes) if p.name.startswith("segment")), self.passes[-1].stats)

    @property
    def failed(self) -> dict[int, str]:
        return {k: v for p in self.passes for k, v in p.stats.failed.items()}

    def failure_message(self) -> str:
        failed = self.failed
        ids = sorted(failed)
        shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        first = failed[ids[0]]
        return (f"{len(ids)} of {self.plan.grid.num_blocks} blocks failed after "
                f"{self.plan.config.execution.max_attempts} attempts: block ids {shown} (block {ids[0]}: {first}). "
                "Every other block is written and marked done; run the same command again to retry only "
                "the missing blocks.")

    def summary_lines(self) -> list[str]:
        plan = self.plan
        voxels = plan.grid.roi.size
        done = sum(p.stats.blocks_done for p in self.passes)
        resumed = sum(p.resumed for p in self.passes)
        retried = sum(p.stats.retried for p in self.passes)
        lines = [
            f"segmented {voxels:,} voxels in {plan.grid.num_blocks} blocks "
            f"(block core {plan.grid.core_shape}, window {plan.windows.window}, stride {plan.windows.stride}, "
            f"planes {'+'.join(plan.planes)})",
            f"wall time {self.seconds:.1f} s, {voxels / max(self.seconds, 1e-9) / 1e6:.2f} Mvoxels/s on "
            f"{self.executor}; {done} block runs, {resumed} resumed from an earlier run, {retried} retried",
        ]
        if len(self.passes) > 1:
            lines.append("passes: " + ", ".join(f"{p.name} {p.stats.seconds:.1f} s" for p in self.passes))
        if self.prompts is not None:
            config = plan.config.prompts
            origin = "density peaks (prompts.auto)" if config is not None and config.auto else config.points
            count = "" if plan.points is None else f"{len(plan.points)} points "
            where = f", indexed at {self.prompts.url.url}" if isinstance(self.prompts, PointIndex) else ""
            lines.append(f"prompts: {count}from {origin}{where}")
        lines += self.min_area_lines() + self.confirm_lines()
        lines.append(f"model {plan.config.model.name} from {plan.config.model.checkpoint}"
                     + _adapted_on(plan.checkpoint_card))
        lines += [f"{spec.name}: {spec.url}" for spec in plan.outputs]
        if self.instances is not None:
            lines += self.instances.summary_lines()
        lines.append(f"run signature {plan.signature[:16]}")
        lines.append(self.viewer_line())
        return lines

    def min_area_lines(self) -> list[str]:
        """What the ``min-area`` pass removed (nothing when it did not run)."""
        zeroed, output = self._zeroed(MinAreaStage.name), self.plan.config.output
        if zeroed is None or output is None:
            return []
        min_px = min_area_pixels(output.min_area_nm2, self.plan.source.voxel_size_nm)
        return [f"min area: {zeroed:,} probabilities set to 0, in 2D components under {output.min_area_nm2:g} nm² "
                f"({min_px} pixels)"]

    def confirm_lines(self) -> list[str]:
        """What the ``confirm`` pass removed (nothing when it did not run)."""
        zeroed, prompts = self._zeroed(ConfirmStage.name), self.plan.config.prompts
        if zeroed is None or prompts is None:
            return []
        return [f"confirm: {zeroed:,} probabilities set to 0, in 2D components holding no prompt of a slice within "
                f"{prompts.confirm_nm:g} nm (components wider than {CONFIRM_EXTENT_NM:g} nm kept)"]

    def _zeroed(self, name: str) -> int | None:
        """The probabilities the post-processing pass ``name`` set to 0 (``None``: it did not run)."""
        found = next((p for p in self.passes if p.name == name), None)
        return None if found is None else sum(outcome["zeroed"] for outcome in found.stats.outcomes.values())

    def viewer_line(self) -> str:
        """Where to look at the result: a Neuroglancer link, or for local volumes `volseg view`."""
        from volseg.commands.view import link, needs_server, neuroglancer_state

        config = self.plan.config
        if needs_server(config):
            return (f"view in Neuroglancer: volseg view {config.source_path or 'CONFIG'} "
                    "(serves the local volumes and prints the link)")
        return f"Neuroglancer: {link(neuroglancer_state(config, self.prompts))}"


def _adapted_on(card: dict[str, Any]) -> str:
    """' (uda on TARGET from SOURCE, 300 steps, 2 workers)' from a checkpoint card: what the model was
    trained or adapted on, so a run names the data behind its weights."""
    data = card.get("data") or {}
    mode = card.get("mode")
    if not isinstance(data, dict) or not (mode or data):
        return ""
    target, source = data.get("target"), data.get("source")
    source_raw = source.get("raw") if isinstance(source, dict) else None
    trained_on = target or data.get("raw")
    parts = [str(mode or "trained")]
    if trained_on:
        parts.append(f"on {trained_on}" + (f" (source {source_raw})" if source_raw else ""))
    if card.get("steps"):
        parts.append(f"{card['steps']} steps" + (f" on {card['workers']} workers" if (card.get("workers") or 1) > 1
                                                  else ""))
    return " (" + ", ".join(parts) + ")"


@contextmanager
def open_executor(config: Config) -> Iterator[Any]:
    """The configured executor: serial, or Ray actors on the cluster (joined or started locally).
    Either computes each block with ``execution.threads`` torch threads (same threads, same bytes)."""
    execution = config.execution
    if execution.executor == "serial":
        with torch_threads(execution.threads):
            executor = SerialExecutor(execution.prefetch, execution.max_attempts)
            executor.device_kind = resolve_device(config.inference.device).type
            yield executor
        return
    from volseg.engine.cluster import check_fits, check_shared_storage, connected
    from volseg.engine.ray import RayExecutor, plan_actors

    with connected(config.cluster.address) as cluster:
        check_shared_storage([(field, url) for field, url in config.written_paths()
                              if field.startswith(("output.", "instances."))])
        actors, cpus, gpus = plan_actors(execution.actors, execution.cpus_per_actor, execution.gpus_per_actor,
                                         cluster.cpus, cluster.gpus, execution.threads)
        check_fits(cluster, actors, cpus, gpus)
        grow = execution.actors is None and not cluster.local  # an autoscaler may add nodes
        with RayExecutor(actors, cpus, gpus, execution.in_flight, execution.max_attempts,
                         threads=execution.threads, grow=grow) as executor:
            executor.description = (f"Ray, {actors} actor{'s' * (actors > 1)} × {executor.resources}"
                                    + (", more as nodes join" if grow else ""))
            yield executor


def checked(on_done: Callable[[Block, float, str], None], leases: Leases) -> Callable[[Block, float, str], None]:
    """``on_done`` that first stops the run if it lost one of its outputs to another run."""

    def call(block: Block, seconds: float, worker: str) -> None:
        leases.check()
        on_done(block, seconds, worker)

    return call


def run_pass(executor: Any, stage: BlockStage, grid: BlockGrid, ledger: BlockLedger, progress: bool,
             desc: str, leases: Leases) -> StageResult:
    """Run ``stage`` on the blocks of ``grid`` not yet marked done, with a progress bar; outcomes
    include the done ones."""
    bar = BlockProgress(0, progress, desc)
    try:
        result = run_stage(executor, stage, grid, ledger, on_done=checked(bar, leases), on_start=bar.start)
    finally:
        bar.close()
    leases.check()
    return result


def output_urls(plan: SegmentationPlan) -> list[str]:
    """Every output the run writes (semantic, then instances)."""
    urls = [spec.url for spec in plan.outputs]
    return urls + ([plan.instances.url] if plan.instances is not None else [])


def run(config: Config, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Plan (validating everything; nothing is written before this succeeds), take the outputs'
    leases, create the outputs, and run every pass; see the module docstring."""
    begin = time.perf_counter()
    plan = plan_segmentation(config, overwrite)
    with holding(output_urls(plan), config.execution.lease_seconds) as leases:
        check_existing_outputs(plan, overwrite)  # another run may have written them since the plan
        ledger = BlockLedger.beside(plan.outputs[0].url, plan.signature, tuple(leases.tokens().values()))
        with open_executor(config) as executor:
            check_device(plan, executor.device_kind, overwrite)
            targets = open_outputs(plan, executor.device_kind)
            if overwrite:
                ledger.clear()
            result = RunResult(plan, executor=getattr(executor, "description", "this process (serial)"))
            result.prompts = plan.points
            if plan.points is not None and len(plan.points) >= INDEXED_POINTS:
                result.prompts = indexed_prompts(plan, ledger)
                result.prompts.write(plan.points)
            _run_passes(plan, targets, executor, ledger, leases, result, progress)
    result.seconds = time.perf_counter() - begin
    return result


#: Prompt sets of at least this many points stay in storage (a point index beside the run's marks), and
#: each block reads those in its read box; smaller ones travel with the stage to every actor.
INDEXED_POINTS = 100_000


def indexed_prompts(plan: SegmentationPlan, ledger: BlockLedger) -> PointIndex:
    """The run's point index (its cells are the block cores), created empty beside the run's marks."""
    source = plan.source
    return PointIndex.create(ledger.run_folder("prompts"), plan.grid.roi, plan.grid.core_shape, source.voxel_size_nm,
                             source.voxel_offset)


def _run_passes(plan: SegmentationPlan, targets: list[OutputTarget], executor: Any, ledger: BlockLedger,
                leases: Leases, result: RunResult, progress: bool) -> None:
    prompts = plan.config.prompts
    if prompts is not None and prompts.auto:
        density = _named(plan, targets, "density")
        first = make_job(plan, [density])
        first.name = "density"
        result.passes.append(run_pass(executor, first, plan.grid, ledger, progress, "density (1/3)", leases))
        if not result.failed:
            radius = peak_radius(prompts.min_distance_nm, plan.source.voxel_size_nm, plan.windows.window)
            result.prompts = indexed_prompts(plan, ledger)  # each block writes its peaks into its own cell
            peaks = PeakStage(density.volume, prompts.peak_threshold, radius, result.prompts)
            result.passes.append(run_pass(executor, peaks, plan.grid, ledger, progress, "peaks (2/3)", leases))
        if not result.failed:
            job = make_job(plan, [_named(plan, targets, "probabilities")], result.prompts)
            job.name = "segment-prompted"
            result.passes.append(run_pass(executor, job, plan.grid, ledger, progress, "segment (3/3)", leases))
    else:
        result.passes.append(run_pass(executor, make_job(plan, targets), plan.grid, ledger, progress,
                                      "segmenting", leases))
    min_area = make_min_area(plan, _named(plan, targets, "probabilities"))
    if min_area is not None and not result.failed:
        result.passes.append(run_pass(executor, min_area, plan.grid, ledger, progress, "min area", leases))
    confirm = make_confirm(plan, _named(plan, targets, "probabilities"), result.prompts)
    if confirm is not None and not result.failed:
        result.passes.append(run_pass(executor, confirm, plan.grid, ledger, progress, "confirm", leases))
    if plan.instances is not None and not result.failed:
        blocks = plan.instances.grid.num_blocks
        bar = BlockProgress(3 * blocks, progress, "instances")
        try:
            result.instances = run_instances(plan.instances, executor, ledger, on_done=checked(bar, leases))
        finally:
            bar.close()
        leases.check()
        result.passes.append(StageResult("instances", result.instances.stats, 0))
    levels = plan.config.output.levels if plan.config.output is not None else 1
    if levels > 1 and not result.failed:
        pyramids = [(spec.name, target.volume, "mean") for spec, target in zip(plan.outputs, targets, strict=True)]
        if plan.instances is not None:
            pyramids.append(("instances", open_volume(plan.instances.url, "r+"), "mode"))
        for name, volume, method in pyramids:
            bar = BlockProgress(0, progress, f"{name} levels 1-{levels - 1}")
            try:
                result.passes += build_pyramid(executor, volume, levels, method, name, ledger, plan.grid.roi,
                                               on_done=checked(bar, leases), on_start=bar.start)
            finally:
                bar.close()
            if result.failed:
                break


def _named(plan: SegmentationPlan, targets: list[OutputTarget], name: str) -> OutputTarget:
    return next(t for spec, t in zip(plan.outputs, targets, strict=True) if spec.name == name)
