"""Planning and running instance segmentation: :func:`plan_instances` checks a run and dry-runs the
creation of its output, writing nothing; :func:`run_instances` runs the passes of
:mod:`volseg.instances.stages`, with the merge of :mod:`volseg.instances.stitching` before the last.

The instance output is uint64 (zarr, OME-Zarr, N5 or Neuroglancer precomputed ``compressed_segmentation``),
with the geometry of the probabilities output, so the block cores stay chunk-aligned.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import volseg
from volseg.config import InstancesConfig
from volseg.engine.ledger import SIGNATURE_KEY, BlockLedger, check_signature
from volseg.engine.stage import BlockDone, BlockStage, Executor, RunStats, run_stage
from volseg.errors import ConfigError, GeometryMismatchError
from volseg.geometry import BlockGrid
from volseg.instances.labels import InstanceParams, instance_params
from volseg.instances.merge import MergeInputs, MergeTree, merge, run_level, side_pass
from volseg.instances.meshes import ManifestStage, MeshStage, PairStage, write_mesh_info
from volseg.instances.properties import PropertiesStage
from volseg.instances.stages import FaceContactStage, HaloOverlapStage, LabelStage, RelabelStage
from volseg.io import Volume, VolumeGeometry, create_volume, open_volume, parse_url
from volseg.io.formats import creation_format


@dataclass(frozen=True)
class InstancePlan:
    """Everything an instance run needs, checked before anything is written.

    ``grid`` has the block cores of the semantic pass, the instance halo, and the roi as its bounds.
    ``creation`` holds the :func:`~volseg.io.create_volume` arguments of the output."""

    url: str
    probabilities_url: str
    density_url: str | None
    params: InstanceParams
    min_size_vx: int
    grid: BlockGrid
    creation: dict[str, Any]
    signature: str | None = None
    meshes: bool = False


def plan_instances(
    settings: InstancesConfig,
    grid: BlockGrid,
    geometry: VolumeGeometry,
    probabilities_url: str,
    density_url: str | None = None,
    *,
    default_threshold: float = 0.5,
    signature: str | None = None,
    overwrite: bool = False,
    halo_vx: Sequence[int] | None = None,
    connectivity: int = 6,
    channel: int = 0,
) -> InstancePlan:
    """Validate an instance run and dry-run the creation of its output; writes nothing.

    ``geometry`` is the probabilities output's (existing or still to be created): the instance
    output copies its shape, voxel size, offset, chunks and (zarr v3 only) shards. ``grid`` is the
    semantic pass's block grid (its halo is ignored). ``halo_vx`` overrides the watershed halo
    (default :data:`~volseg.instances.labels.HALO_SEED_RADII` seed radii); ``connectivity`` (6, 18, 26)
    says which voxels touch; ``channel`` picks the foreground channel of a multi-channel probabilities output.

    Raises :class:`~volseg.errors.ConfigError` when the watershed has no density map or the output
    URL is an input's,
    :class:`~volseg.errors.AlignmentError` when block cores split the output's chunks,
    :class:`~volseg.errors.GeometryMismatchError` when an output exists with other geometry, and
    :class:`~volseg.errors.OutputExistsError` when it carries another run's ``signature`` (unless
    ``overwrite``).
    """
    if settings.method == "watershed" and density_url is None:
        raise ConfigError("instances.method is 'watershed', which seeds instances at density peaks, but the run "
                          "writes no density map.",
                          "set output.density, or use instances.method: connected_components.")
    if settings.url in (probabilities_url, density_url):
        raise ConfigError(f"instances.url {settings.url!r} is also a semantic output; the instance labels would "
                          "overwrite it.", "give instances.url its own path.")
    params = instance_params(settings, geometry.voxel_size_nm, default_threshold, halo_vx, connectivity, channel)
    shard = geometry.shard_shape if creation_format(parse_url(settings.url), None) == "zarr3" else None
    BlockGrid.aligned(grid.roi, grid.core_shape, params.halo_vx, grid.bounds, shard or geometry.chunk_shape)
    creation = {
        "url": settings.url, "shape": geometry.shape, "dtype": np.dtype("uint64"),
        "voxel_size_nm": geometry.voxel_size_nm, "voxel_offset": geometry.voxel_offset,
        "chunk_shape": geometry.chunk_shape, "shard_shape": shard, "kind": "segmentation", "exist_ok": True,
    }
    existing = create_volume(**creation, dry_run=True)
    if existing is not None and signature is not None:
        check_signature(existing, settings.url, "instances.url", signature, overwrite)
    instance_grid = BlockGrid(grid.roi, grid.core_shape, params.halo_vx, grid.roi)
    return InstancePlan(settings.url, probabilities_url, density_url, params,
                        min_size_voxels(settings, geometry.voxel_size_nm), instance_grid, creation, signature,
                        settings.meshes)


def min_size_voxels(settings: InstancesConfig, voxel_size_nm: Sequence[float]) -> int:
    """The least size of a kept object in voxels: ``min_size_vx``, or ``min_size_nm3`` over the voxel's
    volume (rounded up), whichever is larger."""
    from volseg.inference.postprocess import units_of  # inference (postprocess, segment) imports this package

    return max(settings.min_size_vx, units_of(settings.min_size_nm3, math.prod(float(v) for v in voxel_size_nm)))


def open_instances(plan: InstancePlan) -> Volume:
    """Create (or reopen, when its geometry matches) the instance output and stamp the run signature."""
    stamp = {SIGNATURE_KEY: {
        "signature": plan.signature, "version": volseg.__version__, "output": "instances",
        "method": plan.params.method, "probabilities": plan.probabilities_url, "density": plan.density_url,
    }}
    volume = create_volume(**plan.creation, attributes=stamp)  # stamped from the start (see segment.open_outputs)
    assert volume is not None  # not a dry run
    volume.update_attributes(stamp)
    return volume


@dataclass(frozen=True)
class InstanceResult:
    """What an instance run did. ``instances`` is the number of final ids (1..instances); ``pieces``
    the pieces the blocks labelled, ``objects`` what they formed after stitching, ``dropped`` the
    objects under ``min_size_vx``. ``stats`` merges the three passes (outcomes keyed by block of the
    last pass run). ``complete`` is False when a pass had failed blocks (``stats.failed``); the later
    passes then did not run and the output still holds piece ids."""

    url: str
    instances: int
    pieces: int
    objects: int
    dropped: int
    seconds: float
    stats: RunStats = field(default_factory=RunStats)

    @property
    def complete(self) -> bool:
        return not self.stats.failed

    def summary_lines(self) -> list[str]:
        return [f"instances: {self.instances:,} objects ({self.pieces:,} block pieces stitched, {self.dropped:,} "
                f"under the minimum size dropped) in {self.seconds:.1f} s: {self.url}"]


def _open_inputs(plan: InstancePlan) -> tuple[Volume, Volume | None]:
    """The semantic outputs, read-only, checked against the planned geometry."""
    probabilities = open_volume(plan.probabilities_url)
    density = open_volume(plan.density_url) if plan.params.needs_density and plan.density_url else None
    for volume in (probabilities, density):
        if volume is not None and volume.shape != tuple(plan.creation["shape"]):
            raise GeometryMismatchError(
                f"{volume.url} has shape {volume.shape}, but the instance output is planned with shape "
                f"{tuple(plan.creation['shape'])}.", "point the instance run at the outputs of the same run.")
    return probabilities, density


def run_instances(plan: InstancePlan, executor: Executor, ledger: BlockLedger | None = None,
                  on_done: BlockDone | None = None, merge_tree: MergeTree | None = None) -> InstanceResult:
    """Label, stitch, merge and relabel every block of ``plan.grid``; create the output first.

    The passes' outcomes and the merge's files live beside the output, in ``ledger``'s storage: each
    pass skips the blocks marked done, so a resumed run stitches exactly as an uninterrupted one.
    Without a ledger the run keeps its own while it runs, and deletes it at the end. ``merge_tree``:
    the merge's tree (default: leaves of one super-block of marks)."""
    begin = time.perf_counter()
    probabilities, density = _open_inputs(plan)
    instances = open_instances(plan)
    own_ledger = ledger is None
    if ledger is None:
        ledger = BlockLedger.beside(plan.url, f"unsigned-{uuid.uuid4().hex}")
    try:
        return _run_passes(plan, executor, ledger, on_done, merge_tree, probabilities, density, instances, begin)
    finally:
        if own_ledger:
            ledger.forget()


def _run_passes(plan: InstancePlan, executor: Executor, ledger: BlockLedger, on_done: BlockDone | None,
                merge_tree: MergeTree | None, probabilities: Volume, density: Volume | None, instances: Volume,
                begin: float) -> InstanceResult:
    label = LabelStage(plan.params, plan.grid, probabilities, density, instances)
    stitch: BlockStage
    if plan.params.method == "connected_components":
        stitch = FaceContactStage(plan.params, plan.grid, instances)
    else:
        stitch = HaloOverlapStage(plan.params, plan.grid, probabilities, density, instances)
    stats = RunStats()
    for stage in (label, stitch):
        stats = stats.merge(run_stage(executor, stage, plan.grid, ledger, on_done).stats)
        if stats.failed:
            return InstanceResult(plan.url, 0, 0, 0, 0, time.perf_counter() - begin, stats)
    tree = merge_tree or MergeTree(plan.grid.num_blocks)
    inputs = MergeInputs(tree, ledger.run_folder("instances-merge"), ledger, label.name, stitch.name,
                         plan.min_size_vx)
    merged = merge(executor, inputs, ledger)
    stats = stats.merge(merged.stats)
    if stats.failed:
        return InstanceResult(plan.url, 0, 0, 0, 0, time.perf_counter() - begin, stats)
    relabel = RelabelStage(inputs.folder, tree.leaf_blocks, instances)
    stats = stats.merge(run_stage(executor, relabel, plan.grid, ledger, on_done).stats)
    if not stats.failed:  # the objects' sizes as Neuroglancer segment properties (one task)
        properties = PropertiesStage(inputs.folder, instances)  # one task: the top node's
        stats = stats.merge(side_pass(run_level(executor, properties, tree, tree.top, ledger)))
    if plan.meshes and not stats.failed:  # fragments per block, then the manifests, level by level
        stats = stats.merge(side_pass(run_stage(executor, MeshStage(instances, plan.grid), plan.grid, ledger).stats))
        stages = [(PairStage(inputs.folder, tree, merged.bases, ledger), 0)] + [
            (ManifestStage(inputs.folder, level, instances), level) for level in range(tree.top + 1)]
        for stage, level in stages:
            if stats.failed:
                break
            stats = stats.merge(side_pass(run_level(executor, stage, tree, level, ledger)))
        if not stats.failed:
            write_mesh_info(instances)
    if not stats.failed:
        instances.update_attributes({SIGNATURE_KEY: {**instances.attributes.get(SIGNATURE_KEY, {}),
                                                     "instances": merged.instances}})
    return InstanceResult(plan.url, merged.instances, merged.pieces, merged.objects, merged.dropped,
                          time.perf_counter() - begin, stats)
