"""Instance segmentation of the semantic outputs, blockwise, stitched across block faces.

Three block stages (any executor of :mod:`volseg.engine` runs them) and one merge
in the driver::

    pass 1  LabelStage        foreground = probability > threshold; connected components of the core,
                              or a watershed of the context box (core + halo) from density peaks;
                              writes the core as piece ids (block id in the high bits), outcome: sizes
    pass 2  FaceContactStage  connected components: reads the written labels in slabs across its faces,
                              outcome: the pairs of pieces of different blocks that touch
            HaloOverlapStage  watershed: recomputes its labels over the context box and compares them
                              with what the neighbours wrote there, outcome: pieces that agree
    driver  merge_pieces      union-find over the pairs; sizes summed; small objects dropped
    pass 3  RelabelStage      remaps each core's piece ids to consecutive final ids (fastremap), in place

Connected components are **exact**: a block's components are the whole volume's components cut by
its core, and two pieces of one component always touch across a face, edge or corner, which pass 2
sees in a slab two voxels thick (the last layer of the core and the first of the next core)::

    core of b          | core of b+1 (along x)
    . . . . . . . [p] [q] . . . .      slab of b along x: x in [stop-1, stop+1); on y and z the core
                  ^^^^^^^              widened by one voxel past its stop, so pieces of diagonal
                                       neighbours that touch only at an edge or corner are paired too

A watershed floods from seeds that may lie far away, so no finite halo makes it exact. What keeps a
block close to the whole-volume pass: its core's seeds are exact (a seed only looks ``seed_radius_vx``
away, and the halo is several radii wide); an object entering the context box from a seed outside
it gets a stand-in seed where its density rises out of the box (:func:`watershed_seeds`); and pass 2
joins two pieces only where both blocks, each in the inner half of its halo, find that they agree on
a majority of their overlap (:func:`volseg.inference.stitching.overlap_pairs`). Pass 2 recomputes
the block's labels rather than storing the halo's, so the done-marks stay small.

The instance output is uint64 (zarr, OME-Zarr, N5 or Neuroglancer precomputed ``compressed_segmentation``),
with the geometry of the probabilities output, so the block cores stay chunk-aligned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

import volseg
from volseg.config import InstancesConfig
from volseg.engine.ledger import SIGNATURE_KEY, BlockLedger, check_signature
from volseg.engine.stage import BlockDone, BlockStage, Executor, Pending, RunStats, run_stage
from volseg.errors import ConfigError, GeometryMismatchError
from volseg.geometry import Block, BlockGrid, Box, Coord
from volseg.inference.stitching import (
    RelabelTable,
    contact_pairs,
    gather_outcomes,
    merge_pieces,
    overlap_pairs,
    owner_blocks,
    piece_ids,
)
from volseg.io import Volume, VolumeGeometry, create_volume, open_volume, parse_url
from volseg.io.formats import creation_format

Method = Literal["watershed", "connected_components"]
#: The default watershed halo, in seed radii: one radius makes the core's seeds exact, the rest is
#: context for the flooding near the core's faces and for the overlap that pass 2 compares.
HALO_SEED_RADII = 4
#: The part of the halo (from the core outwards) where a block's watershed is compared with its
#: neighbours': farther out, its labels see too little context to be trusted.
STITCH_BAND = 0.5
#: cc3d connectivity → skimage watershed connectivity (how many axes a step may change at once).
WATERSHED_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


# --- one block -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceParams:
    """How every block turns the semantic maps into instances (all voxel units, axes z, y, x).

    ``threshold``/``seed_threshold`` are probabilities in [0, 1] whatever the storage dtype.
    ``halo_vx`` is how far past its core a block reads (0 for connected components, which need none).
    ``connectivity`` (6, 18 or 26) says which voxels touch. ``channel`` picks the probabilities'
    channel when that output has several."""

    method: Method
    threshold: float
    seed_threshold: float = 0.3
    seed_radius_vx: Coord = (1, 1, 1)
    halo_vx: Coord = (0, 0, 0)
    connectivity: int = 6
    channel: int = 0

    def __post_init__(self) -> None:
        if self.connectivity not in WATERSHED_CONNECTIVITY:
            raise ValueError(f"connectivity {self.connectivity} is not one of {sorted(WATERSHED_CONNECTIVITY)}")

    @property
    def needs_density(self) -> bool:
        return self.method == "watershed"


def seed_radius(min_distance_nm: float, voxel_size_nm: Sequence[float]) -> Coord:
    """Half-width in voxels, per axis, of the box a seed must be the density maximum of (at least 1)."""
    return tuple(max(1, round(min_distance_nm / v)) for v in voxel_size_nm)


def instance_params(settings: InstancesConfig, voxel_size_nm: Sequence[float], default_threshold: float = 0.5,
                    halo_vx: Sequence[int] | None = None, connectivity: int = 6, channel: int = 0) -> InstanceParams:
    """The block parameters of ``settings`` on a volume of ``voxel_size_nm``; the foreground threshold
    defaults to ``default_threshold`` (``inference.threshold``), the watershed halo to
    :data:`HALO_SEED_RADII` seed radii."""
    radius = seed_radius(settings.min_distance_nm, voxel_size_nm)
    if halo_vx is None:
        halo_vx = (0, 0, 0) if settings.method == "connected_components" else tuple(HALO_SEED_RADII * r for r in radius)
    threshold = default_threshold if settings.threshold is None else settings.threshold
    return InstanceParams(settings.method, threshold, settings.seed_threshold, radius, tuple(halo_vx),
                          connectivity, channel)


def unit_range(values: np.ndarray) -> np.ndarray:
    """Stored probabilities or densities as float32 in their [0, 1] meaning: floats as they are, integers
    divided by their dtype's maximum (the inverse of :func:`volseg.inference.job.to_storage`)."""
    if values.dtype.kind == "f":
        return values.astype(np.float32, copy=False)
    return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)


def watershed_seeds(density: np.ndarray, mask: np.ndarray, params: InstanceParams) -> np.ndarray:
    """Markers (int32, 0 = none) for the watershed of a box: foreground voxels whose density exceeds
    ``seed_threshold`` and is the maximum of the box of ``seed_radius_vx`` around them (as far as the
    box reaches). Touching seeds (a plateau) form one marker.

    Farther than the radius from the box's sides these are exactly the whole roi's seeds. Nearer,
    they also include voxels whose density rises out of the box: stand-ins for seeds outside it, so
    an object reaching in from a seed outside floods as its own piece (which the stitch joins to
    the rest of it) instead of being flooded from a touching object's seed inside the box."""
    footprint = np.ones(tuple(2 * r + 1 for r in params.seed_radius_vx), bool)
    peaks = peak_local_max(density, footprint=footprint, threshold_abs=params.seed_threshold, exclude_border=False)
    seeds = np.zeros(density.shape, bool)
    seeds[tuple(peaks.T)] = True
    markers, _ = ndimage.label(seeds & mask, structure=np.ones((3, 3, 3), bool))
    return markers


def label_box(params: InstanceParams, probabilities: np.ndarray, density: np.ndarray | None) -> np.ndarray:
    """Instance labels (uint32, 0 = background) of the voxels of a box from its semantic maps.

    Connected components of the foreground; or a watershed of the inverted density from
    :func:`watershed_seeds` inside the foreground, where foreground not reached from any seed (no
    peak in its component) becomes one instance per connected component."""
    mask = unit_range(probabilities) > params.threshold
    if params.method == "connected_components":
        return cc3d.connected_components(mask, connectivity=params.connectivity).astype(np.uint32, copy=False)
    if density is None:
        raise ValueError("the watershed needs the density map")
    height = unit_range(density)
    markers = watershed_seeds(height, mask, params)
    labels = watershed(-height, markers, mask=mask, connectivity=WATERSHED_CONNECTIVITY[params.connectivity])
    labels = labels.astype(np.uint32, copy=False)
    unseeded = mask & (labels == 0)
    if unseeded.any():
        rest = cc3d.connected_components(unseeded, connectivity=params.connectivity).astype(np.uint32)
        labels = np.where(unseeded, rest + labels.max(), labels)
    return labels


def core_pieces(labels: np.ndarray, box: Box, core: Box) -> tuple[np.ndarray, dict[int, int]]:
    """The core's labels renumbered 1..N (uint32), and the map box label → local id (labels seen only
    outside the core are absent)."""
    local, mapping = fastremap.renumber(labels[core.relative_to(box)], preserve_zero=True, in_place=False)
    return local.astype(np.uint32, copy=False), {int(k): int(v) for k, v in mapping.items() if k != 0}


def piece_sizes(local: np.ndarray) -> list[int]:
    """Voxel counts of local labels 1..N (all present, as :func:`core_pieces` makes them)."""
    labels, counts = fastremap.unique(local, return_counts=True)
    return [int(c) for label, c in zip(labels.tolist(), counts.tolist(), strict=True) if label != 0]


# --- block stages --------------------------------------------------------------------------------------


class _Reads:
    """Reads started together; ``result()`` waits for all of them (``None`` stays ``None``)."""

    def __init__(self, *pending: Pending | None) -> None:
        self.pending = pending

    def result(self) -> tuple[Any, ...]:
        return tuple(None if p is None else p.result() for p in self.pending)


@dataclass(frozen=True)
class BlockPieces:
    """A block's written core (uint64 piece ids) and its pieces' voxel counts (local id order)."""

    ids: np.ndarray
    sizes: list[int]


class _SemanticReader:
    """What the label and overlap stages share: the semantic inputs and the context box of a block."""

    def __init__(self, params: InstanceParams, grid: BlockGrid, probabilities: Volume, density: Volume | None,
                 instances: Volume) -> None:
        self.params = params
        self.grid = grid
        self.probabilities = probabilities
        self.density = density if params.needs_density else None
        self.instances = instances

    def context(self, block: Block) -> Box:
        """Core + halo, clipped to the region of interest (the roi is the whole volume of this labelling)."""
        return block.core.grow(self.params.halo_vx).intersect(self.grid.roi)

    def read_box(self, block: Block) -> Box:
        """The context box (the overlap stage's band lies inside it)."""
        return self.context(block)

    def _read_semantic(self, box: Box) -> tuple[Pending, Pending | None]:
        density = None if self.density is None else self.density.read_async(box)
        return self.probabilities.read_async(box), density

    def _labels(self, probabilities: np.ndarray, density: np.ndarray | None) -> np.ndarray:
        if self.probabilities.num_channels is not None:
            probabilities = probabilities[self.params.channel]
        return label_box(self.params, probabilities, density)

    def to(self, device: str) -> None:
        return None


class LabelStage(_SemanticReader):
    """Pass 1: label each block from its context box and write its core as piece ids.

    Outcome: ``{"sizes": [voxels of local piece 1, 2, ...]}``."""

    name = "instances-label"

    def read(self, block: Block) -> Pending:
        return _Reads(*self._read_semantic(self.context(block)))

    def compute(self, block: Block, data: tuple[np.ndarray, np.ndarray | None]) -> BlockPieces:
        box = self.context(block)
        local, _ = core_pieces(self._labels(*data), box, block.core)
        return BlockPieces(piece_ids(block.id, local), piece_sizes(local))

    def write(self, block: Block, computed: BlockPieces) -> list[Pending]:
        return [self.instances.write_async(block.core, computed.ids)]

    def outcome(self, block: Block, computed: BlockPieces) -> dict[str, list[int]]:
        return {"sizes": computed.sizes}


class FaceContactStage:
    """Pass 2 of connected components: pairs of pieces of different blocks that touch across the
    faces, edges or corners at the upper end of this block's core (see the module docstring).

    Outcome: ``{"pairs": [[piece id, piece id], ...]}``."""

    name = "instances-stitch"

    def __init__(self, params: InstanceParams, grid: BlockGrid, instances: Volume) -> None:
        self.params = params
        self.grid = grid
        self.instances = instances

    def read_box(self, block: Block) -> Box:
        """The core widened by one voxel past its stop on every axis, clipped to the roi: the slabs' union."""
        return block.core.grow(0, 1).intersect(self.grid.roi)

    def slabs(self, block: Block) -> list[Box]:
        """One slab per axis along which another block follows this one."""
        roi, core, widened = self.grid.roi, block.core, self.read_box(block)
        boxes = []
        for axis in range(3):
            if core.stop[axis] < roi.stop[axis]:
                start = list(widened.start)
                start[axis] = core.stop[axis] - 1
                boxes.append(Box(tuple(start), widened.stop))
        return boxes

    def read(self, block: Block) -> Pending:
        return _Reads(*(self.instances.read_async(box) for box in self.slabs(block)))

    def compute(self, block: Block, slabs: tuple[np.ndarray, ...]) -> np.ndarray:
        pairs = [contact_pairs(slab, self.params.connectivity) for slab in slabs]
        return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.uint64)

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return []

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, list[list[int]]]:
        return {"pairs": computed.tolist()}

    def to(self, device: str) -> None:
        return None


class HaloOverlapStage(_SemanticReader):
    """Pass 2 of the watershed: relabel the context box exactly as pass 1 did and pair this block's
    pieces with the pieces its neighbours wrote where the two agree (``overlap_pairs``).

    Outcome: ``{"pairs": [[piece id, piece id], ...]}``."""

    name = "instances-stitch"

    def band(self, block: Block) -> Box:
        """The core grown by the inner part of the halo: where this block's labels are compared."""
        width = tuple(min(h, max(1, round(STITCH_BAND * h))) for h in self.params.halo_vx)
        return block.core.grow(width).intersect(self.grid.roi)

    def read(self, block: Block) -> Pending:
        return _Reads(*self._read_semantic(self.context(block)), self.instances.read_async(self.band(block)))

    def compute(self, block: Block, data: tuple[np.ndarray, np.ndarray | None, np.ndarray]) -> np.ndarray:
        probabilities, density, written = data
        box, band = self.context(block), self.band(block)
        labels = self._labels(probabilities, density)
        _, mapping = core_pieces(labels, box, block.core)
        labels = labels[band.relative_to(box)]
        everything = {int(label): 0 for label in fastremap.unique(labels).tolist()}
        mine = piece_ids(block.id, fastremap.remap(labels, {**everything, **mapping}))
        owners = owner_blocks(self.grid, band)
        shell = owners != block.id
        return overlap_pairs(mine[shell], written[shell], owners[shell])

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return []

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, list[list[int]]]:
        return {"pairs": computed.tolist()}


class RelabelStage:
    """Pass 3: remap a core's piece ids to final ids, in place. Idempotent: final ids lie below 2**32,
    piece ids above, so a core remapped already (a crash before its done-mark) stays as it is.

    Outcome: ``{"instances": distinct final ids in the core}``."""

    name = "instances-relabel"

    def __init__(self, table: RelabelTable, instances: Volume) -> None:
        self.table = table
        self.instances = instances

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        return self.instances.read_async(block.core)

    def compute(self, block: Block, labels: np.ndarray) -> np.ndarray:
        relabelled = fastremap.remap(labels, self.table.mapping(block.id), preserve_missing_labels=True)
        return relabelled.astype(np.uint64, copy=False)

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return [self.instances.write_async(block.core, computed)]

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, int]:
        return {"instances": int(np.count_nonzero(fastremap.unique(computed)))}

    def to(self, device: str) -> None:
        return None


# --- planning and running ------------------------------------------------------------------------------


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
    (default :data:`HALO_SEED_RADII` seed radii); ``connectivity`` (6, 18, 26) says which voxels touch;
    ``channel`` picks the foreground channel of a multi-channel probabilities output.

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
                        min_size_voxels(settings, geometry.voxel_size_nm), instance_grid, creation, signature)


def min_size_voxels(settings: InstancesConfig, voxel_size_nm: Sequence[float]) -> int:
    """The least size of a kept object in voxels: ``min_size_vx``, or ``min_size_nm3`` over the voxel's
    volume (rounded up), whichever is larger."""
    from volseg.inference.postprocess import units_of  # postprocess imports this module

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
                  on_done: BlockDone | None = None) -> InstanceResult:
    """Label, stitch and relabel every block of ``plan.grid``; create the output first.

    With a ``ledger`` each pass skips the blocks marked done and takes their outcomes from the marks,
    so a resumed run stitches exactly as an uninterrupted one."""
    begin = time.perf_counter()
    probabilities, density = _open_inputs(plan)
    instances = open_instances(plan)
    label = LabelStage(plan.params, plan.grid, probabilities, density, instances)
    stitch: BlockStage
    if plan.params.method == "connected_components":
        stitch = FaceContactStage(plan.params, plan.grid, instances)
    else:
        stitch = HaloOverlapStage(plan.params, plan.grid, probabilities, density, instances)

    stats = run_stage(executor, label, plan.grid, ledger, on_done).stats
    label_outcomes = stats.outcomes
    if stats.failed:
        return InstanceResult(plan.url, 0, 0, 0, 0, time.perf_counter() - begin, stats)
    stitch_stats = run_stage(executor, stitch, plan.grid, ledger, on_done).stats
    stitch_outcomes = stitch_stats.outcomes
    stats = stats.merge(stitch_stats)
    if stats.failed:
        return InstanceResult(plan.url, 0, 0, 0, 0, time.perf_counter() - begin, stats)
    mutual = plan.params.method == "watershed"
    table, summary = merge_pieces(*gather_outcomes(label_outcomes, stitch_outcomes, plan.grid.num_blocks, mutual),
                                  plan.min_size_vx)
    relabel_stats = run_stage(executor, RelabelStage(table, instances), plan.grid, ledger, on_done).stats
    stats = stats.merge(relabel_stats)
    if not stats.failed:
        instances.update_attributes({SIGNATURE_KEY: {**instances.attributes.get(SIGNATURE_KEY, {}),
                                                     "instances": table.instances}})
    return InstanceResult(plan.url, table.instances, summary.pieces, summary.objects, summary.dropped,
                          time.perf_counter() - begin, stats)
