"""Streaming evaluation: a prediction scored against labels through dask, in bounded memory.

Foreground is ``prediction > threshold`` (probabilities stored as integers are scaled back to [0, 1]:
uint8 foreground is ``value > threshold × 255``; an instance output's foreground is ``id > 0``) against
``labels > 0``. Reported per z-slice:

* Dice and IoU — confusion counts of every storage chunk, summed over the y/x chunks of each slice;
  the volume-level Dice/IoU sum them over all slices;
* AJI and PQ — instances are the 8-connected components of each slice (prediction components with
  fewer than ``min_size_vx`` voxels removed; the truth is used as is), or, when an instance output is
  scored, the ids of both volumes in the slice. These need whole slices, so they run on slabs of whole
  slices;
* the means over slices that have foreground in the prediction or the truth (a slice empty in both
  scores 1.0 on everything and is left out of the means, so empty slices cannot inflate them);
* AP-75 of the 3D instances (MitoEM style, :func:`volseg.evaluation.metrics.ranked_average_precision`):
  for an instance output, from the voxel counts of every (predicted id, true id) pair of each slab,
  summed (memory grows with the number of objects, never with the volume); for a probability map,
  of its 26-connected 3D components, only when the whole volume has at most :data:`AP_MAX_VOLUME_VX`
  voxels, as it labels the whole volume at once.

Both volumes become dask arrays whose tasks read one box each through ``Volume.read``: the storage
chunks for the counts, and slabs of whole slices for AJI/PQ (and the overlap counts)::

          storage chunks (counts)                slabs (AJI, PQ, overlaps)
      z ┌──────┬──────┬───┐                 ┌──────────────────┐
        │      │      │   │  ── rechunk ──▶ │ depth × Y × X     │   when lcm(z chunks) slices fit
        ├──────┼──────┼───┤                 ├──────────────────┤   SLAB_TARGET_VX: each chunk is
        │      │      │   │                 │                  │   read once and feeds both
        └──────┴──────┴───┘                 └──────────────────┘   (else slabs read their own box)

Memory: a slab of ``depth`` slices holds about :data:`BYTES_PER_SLAB_VX` bytes per voxel (masks) or
:data:`BYTES_PER_ID_SLAB_VX` (instance ids) while its components are labelled and matched; one slice may
have at most :data:`MAX_SLICE_VX` voxels, else the evaluation refuses before reading anything. Slabs are
computed in groups whose estimated memory stays under :data:`MEMORY_BUDGET_BYTES`, one progress step per
group.

The scheduler is Ray's dask scheduler when a Ray cluster is connected (``ray.is_initialized()``) or
``RAY_ADDRESS`` names one, else dask's threaded scheduler; the report says which ran.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from volseg.errors import VolsegError, VolumeFormatError
from volseg.evaluation.metrics import (
    AveragePrecision,
    Confusion,
    Overlaps,
    PanopticQuality,
    aggregated_jaccard,
    as_instances,
    average_precision,
    connected_instances,
    overlap_counts,
    panoptic_quality,
    ranked_average_precision,
    sum_overlap_counts,
)
from volseg.evaluation.report import EvalReport, SliceScores
from volseg.geometry import BlockGrid, Box, read_box
from volseg.io import Volume, VolumeSpec, open_spec

MAX_SLICE_VX = 2**28
"""Largest z-slice (Y × X voxels) `eval` accepts: AJI and PQ label and match whole slices in memory."""

SLAB_TARGET_VX = 2**24
"""Voxels a slab task aims at (whole slices; at least one slice)."""

BYTES_PER_SLAB_VX = 24
"""Estimated peak bytes per slab voxel: both inputs, masks, uint32 components, overlap codes."""

BYTES_PER_ID_SLAB_VX = 32
"""The same for slabs of instance ids (uint64 inputs and their rechunked copies; a slice's renumbered ids
and pair codes are counted slice by slice)."""

MEMORY_BUDGET_BYTES = 4 * 2**30
"""Estimated memory the slabs computed at once may take together."""

AP_MAX_VOLUME_VX = 2**27
"""Largest volume (voxels) for which the 3D AP-75 is computed (it labels the whole volume at once)."""

_INSTANCE_COLUMNS = 5  # aji, pq tp, pq fp, pq fn, pq matched-IoU sum


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


# --- volumes as dask arrays -------------------------------------------------------------------------


@dataclass(frozen=True)
class _VolumeHandle:
    """What a dask task needs to read a volume: its spec plus a token that is new for every `eval`,
    so worker processes reopen a volume rewritten since (small and picklable, for Ray)."""

    spec: VolumeSpec
    token: str


@functools.lru_cache(maxsize=16)
def _opened(handle: _VolumeHandle) -> Volume:
    return open_spec(handle.spec)


def _read_block(handle: _VolumeHandle, block_info: dict | None = None) -> np.ndarray:
    assert block_info is not None  # dask always passes it to a function that names it
    location = block_info[None]["array-location"]
    volume = _opened(handle)
    array = volume.read(Box(tuple(b for b, _ in location), tuple(e for _, e in location)))
    return array if volume.num_channels is None else array[0]


def _splits(extent: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, extent - start) for start in range(0, extent, step))


def volume_as_dask(volume: Volume, chunks_zyx: Sequence[int] | None = None, token: str = "") -> da.Array:
    """A lazy (z, y, x) dask array of ``volume``; each task reads its box through ``Volume.read``.

    ``chunks_zyx`` defaults to the storage chunk shape, so each task reads exactly one stored chunk
    (the last chunk on an axis is cut at the volume's edge). A volume with one channel is read as
    its spatial array. ``token`` tells apart evaluations of volumes rewritten in between.
    """
    if volume.num_channels not in (None, 1):
        raise VolumeFormatError(
            f"{volume.url} has {volume.num_channels} channels; `eval` scores a single-channel probability "
            "volume against a single-channel label volume.",
            "point eval.prediction / eval.labels at one channel's array.",
        )
    chunk = tuple(chunks_zyx or volume.chunk_shape)
    chunks = tuple(_splits(extent, step) for extent, step in zip(volume.shape, chunk, strict=True))
    handle = _VolumeHandle(volume.spec, token)
    return da.map_blocks(_read_block, handle, chunks=chunks, dtype=volume.dtype,
                         meta=np.empty((0, 0, 0), volume.dtype),
                         name=f"volseg-read-{tokenize(volume.spec, chunk, token)}")


# --- per-block computations ---------------------------------------------------------------------------


def _confusion_by_slice(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(z, 1, 1, 4) int64: TP, FP, FN, TN of each z-slice of two boolean blocks."""
    p = predicted.reshape(predicted.shape[0], -1)
    t = truth.reshape(truth.shape[0], -1)
    tp = np.count_nonzero(p & t, axis=1)
    n_predicted = np.count_nonzero(p, axis=1)
    n_true = np.count_nonzero(t, axis=1)
    counts = np.stack([tp, n_predicted - tp, n_true - tp, p.shape[1] - n_predicted - n_true + tp], axis=-1)
    return counts.astype(np.int64)[:, None, None, :]


def slice_instances(array: np.ndarray, min_size_vx: int = 0) -> np.ndarray:
    """Instances of one slice: 8-connected components of a mask, or the ids of a label slice (numbered
    1..n); instances under ``min_size_vx`` voxels removed."""
    if array.dtype == bool:
        return connected_instances(array, min_size_vx)
    labels = as_instances(array)
    if min_size_vx > 1:
        keep = np.bincount(labels.ravel()) >= min_size_vx
        keep[0] = False
        labels = (np.cumsum(keep) * keep).astype(labels.dtype)[labels]
    return labels


def _instance_scores_by_slice(predicted: np.ndarray, truth: np.ndarray, min_size_vx: int) -> np.ndarray:
    """(z, 5) float64 per slice of two slabs (masks or ids): AJI, PQ's TP, FP, FN and matched-IoU sum."""
    out = np.empty((predicted.shape[0], _INSTANCE_COLUMNS))
    for i in range(predicted.shape[0]):
        predicted_instances = slice_instances(predicted[i], min_size_vx)
        true_instances = slice_instances(truth[i])
        pq = panoptic_quality(predicted_instances, true_instances)
        out[i] = (aggregated_jaccard(predicted_instances, true_instances), pq.tp, pq.fp, pq.fn,
                  pq.matched_iou_sum)
    return out


# --- the plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlabPlan:
    """How slices are grouped: slabs of ``depth`` whole slices, ``group`` slabs computed at once.

    ``shared``: the slabs are the storage chunks rechunked (depth is a multiple of both volumes'
    z-chunks), so every chunk is read once for counts and slabs; otherwise slabs read their own boxes.
    """

    depth: int
    group: int
    shared: bool

    @classmethod
    def of(cls, shape_zyx: Sequence[int], z_chunks: Sequence[int], workers: int,
           bytes_per_vx: int = BYTES_PER_SLAB_VX) -> SlabPlan:
        """The plan for a volume of ``shape_zyx`` stored in z-chunks ``z_chunks``; raises
        :class:`VolumeFormatError` if one slice exceeds :data:`MAX_SLICE_VX`."""
        depth_z, height, width = shape_zyx
        slice_vx = height * width
        if slice_vx > MAX_SLICE_VX:
            raise VolumeFormatError(
                f"One z-slice has {height} × {width} = {slice_vx} voxels, more than the {MAX_SLICE_VX} "
                f"(2^{int(math.log2(MAX_SLICE_VX))}) that `eval` holds in memory at once: AJI and PQ label "
                f"and match the instances of whole slices (about {BYTES_PER_SLAB_VX} bytes per voxel).",
                "evaluate a downsampled scale (eval.prediction.scale and eval.labels.scale for OME-Zarr) "
                "or a cropped copy of both volumes.",
            )
        fitting = max(1, SLAB_TARGET_VX // slice_vx)
        z_lcm = math.lcm(*z_chunks)
        # share the chunk reads when whole chunk layers fit the slab target, or at least the memory budget
        # (large slices in deep chunks: one layer per slab rather than reading each chunk depth / z times)
        shared = fitting >= z_lcm or z_lcm * slice_vx * bytes_per_vx <= MEMORY_BUDGET_BYTES
        # slabs reading their own boxes hold no rechunked copy: about half as many bytes per voxel; they
        # still read whole chunk layers when one fits (a box cutting through a chunk decodes all of it)
        own_bytes = max(1, bytes_per_vx // 2)
        aligned = shared or z_lcm * slice_vx * own_bytes <= MEMORY_BUDGET_BYTES
        depth = min(depth_z, max(fitting // z_lcm, 1) * z_lcm if aligned else fitting)
        by_memory = MEMORY_BUDGET_BYTES // max(1, depth * slice_vx * (bytes_per_vx if shared else own_bytes))
        return cls(depth, int(max(1, min(2 * workers, by_memory))), shared)

    def groups(self, depth_z: int) -> list[tuple[int, int]]:
        """The half-open z ranges computed at once (whole slabs, the last one cut at the volume)."""
        step = self.depth * self.group
        return [(z, min(z + step, depth_z)) for z in range(0, depth_z, step)]


# --- scheduler ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheduler:
    """A dask scheduler (a name or a ``get`` function), its description and its worker count."""

    get: Any
    name: str
    workers: int


@contextmanager
def dask_scheduler() -> Iterator[Scheduler]:
    """Dask-on-Ray when a Ray cluster is connected or ``RAY_ADDRESS`` names one, else dask threads.

    With ``RAY_ADDRESS`` set and no connection yet, this connects (``ray.init(address=...)``) and
    disconnects on exit; an existing connection is used and left as it is. Ray is imported only then.
    """
    address = os.environ.get("RAY_ADDRESS")
    ray_module = sys.modules.get("ray")
    connected = ray_module is not None and ray_module.is_initialized()
    if not connected and not address:
        yield Scheduler("threads", "dask threads", os.cpu_count() or 1)
        return
    import ray
    from ray.util.dask import ray_dask_get

    if not connected:
        try:
            ray.init(address=address)
        except ConnectionError as error:
            raise VolsegError(f"RAY_ADDRESS is {address!r} but no Ray cluster answers there ({error}).",
                              "start the cluster (`ray start --head`) or unset RAY_ADDRESS to use "
                              "local threads.") from None
    try:
        workers = int(ray.cluster_resources().get("CPU", 1))
        where = f"RAY_ADDRESS={address}" if not connected else "connected cluster"
        yield Scheduler(ray_dask_get, f"dask on ray ({where}, {workers} CPUs)", workers)
    finally:
        if not connected:
            ray.shutdown()


def check_pair(prediction: Volume, labels: Volume) -> None:
    if tuple(prediction.shape) != tuple(labels.shape):
        raise VolumeFormatError(
            f"The prediction {prediction.url} has shape (z, y, x) {tuple(prediction.shape)} but the labels "
            f"{labels.url} have shape {tuple(labels.shape)}.",
            "score against the labels of the segmented volume at the same scale (eval.labels.scale / "
            "eval.prediction.scale pick OME-Zarr scale levels).",
        )



# --- scoring ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalInputs:
    """What to score: ``labels`` (a mask, or instance ids when ``instances`` is scored) against a
    probability map ``prediction`` (foreground above ``threshold``) and/or an ``instances`` output (its
    3D AP-75 streamed; its ``id > 0`` is the foreground when there is no ``prediction``)."""

    labels: Volume
    prediction: Volume | None = None
    instances: Volume | None = None
    threshold: float = 0.5
    min_size_vx: int = 0

    def __post_init__(self) -> None:
        if self.prediction is None and self.instances is None:
            raise ValueError("nothing to score: give a prediction, an instance output, or both")
        for volume in (self.prediction, self.instances):
            if volume is not None:
                check_pair(volume, self.labels)

    @property
    def semantic(self) -> Volume:
        """The volume whose foreground the voxel counts score."""
        return self.prediction if self.prediction is not None else self.instances  # type: ignore[return-value]

    @property
    def cut(self) -> float:
        """The stored value the semantic volume's foreground must exceed."""
        return foreground_threshold(self.prediction.dtype, self.threshold) if self.prediction is not None else 0


def score_volumes(inputs: EvalInputs, report_path: str, progress: Callable[[int], None] | None = None
                  ) -> EvalReport:
    """Score ``inputs`` (see the module docstring); ``progress`` is told the slices of each group done."""
    begin = time.perf_counter()
    semantic, labels, instances = inputs.semantic, inputs.labels, inputs.instances
    token = f"{os.getpid()}-{time.time_ns()}"
    with dask_scheduler() as scheduler:
        slab_source = instances if instances is not None else semantic
        plan = SlabPlan.of(semantic.shape, (slab_source.chunk_shape[0], labels.chunk_shape[0]), scheduler.workers,
                           BYTES_PER_ID_SLAB_VX if instances is not None else BYTES_PER_SLAB_VX)
        raw_semantic, raw_labels = volume_as_dask(semantic, token=token), volume_as_dask(labels, token=token)
        predicted, truth = raw_semantic > inputs.cut, raw_labels > 0
        counts = _counts_array(predicted, truth)
        slab = (plan.depth, *semantic.shape[1:])
        if instances is None:
            p_chunks, t_chunks = predicted, truth

            def own() -> tuple[da.Array, da.Array]:
                return volume_as_dask(semantic, slab, token) > inputs.cut, volume_as_dask(labels, slab, token) > 0
        else:
            p_chunks = raw_semantic if instances is semantic else volume_as_dask(instances, token=token)
            t_chunks = raw_labels

            def own() -> tuple[da.Array, da.Array]:
                return volume_as_dask(instances, slab, token), volume_as_dask(labels, slab, token)
        # shared: the chunk arrays rechunked, so each chunk is read once; else the slabs read their own boxes
        p_slab, t_slab = (p_chunks.rechunk(slab), t_chunks.rechunk(slab)) if plan.shared else own()
        per_slice = da.map_blocks(_instance_scores_by_slice, p_slab, t_slab, inputs.min_size_vx, drop_axis=2,
                                  chunks=(p_slab.chunks[0], (_INSTANCE_COLUMNS,)), dtype=np.float64)
        overlaps = [dask.delayed(_slab_overlaps)(p, t) for p, t in
                    zip(p_slab.to_delayed().ravel(), t_slab.to_delayed().ravel(), strict=True)] \
            if instances is not None else []
        slices: list[SliceScores] = []
        summed = np.zeros((0, 3), np.uint64)
        for z0, z1 in plan.groups(semantic.shape[0]):
            first, stop = z0 // plan.depth, -(-z1 // plan.depth)
            count_rows, instance_rows, *parts = dask.compute(counts[z0:z1], per_slice[z0:z1],
                                                             *overlaps[first:stop], scheduler=scheduler.get)
            slices += [SliceScores(z0 + i, Confusion(*(int(v) for v in c)), float(r[0]),
                                   PanopticQuality(int(r[1]), int(r[2]), int(r[3]), float(r[4])))
                       for i, (c, r) in enumerate(zip(count_rows, instance_rows, strict=True))]
            if parts:
                summed = sum_overlap_counts([summed, *parts])
            if progress is not None:
                progress(z1 - z0)
        if instances is not None:
            ap75, ap75_note = instance_average_precision(summed)
        else:
            ap75, ap75_note = _score_ap(predicted, truth, scheduler)
    return EvalReport(
        semantic.url, labels.url, tuple(semantic.shape), inputs.threshold, inputs.cut, inputs.min_size_vx,
        scheduler.name, tuple(slices), ap75, ap75_note, report_path, time.perf_counter() - begin,
        None if instances is None else instances.url,
    )


def _slab_overlaps(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """:func:`overlap_counts` of a slab, counted slice by slice (a slice's temporaries, not the slab's)."""
    return sum_overlap_counts(overlap_counts(p, t) for p, t in zip(predicted, truth, strict=True))


def instance_average_precision(counts: np.ndarray) -> tuple[AveragePrecision, str]:
    """AP-75 from the summed overlap counts of an instance output and instance labels, and its note."""
    overlaps = Overlaps.from_counts(counts)
    note = ("the instance output's 3D ids against the labels' ids, ranked by size, COCO 101-point AP at "
            "IoU >= 0.75 (MitoEM)")
    if overlaps.num_true == 1 and overlaps.num_predicted > 1:
        note += "; the labels hold one id only: a mask, not instance labels?"
    return ranked_average_precision(overlaps, 0.75), note


def _score_ap(predicted: da.Array, truth: da.Array, scheduler: Scheduler) -> tuple[AveragePrecision | None, str]:
    if predicted.size > AP_MAX_VOLUME_VX:
        return None, (f"the volume has {predicted.size} voxels, more than the {AP_MAX_VOLUME_VX} "
                      "3D instance labelling holds in memory; score an instance output (eval.instances) "
                      "for AP-75 at any size")
    p, t = dask.compute(predicted, truth, scheduler=scheduler.get)
    return average_precision(p, t, 0.75), ("26-connected 3D components, ranked by size, "
                                           "COCO 101-point AP at IoU >= 0.75 (MitoEM)")


def _counts_array(predicted: da.Array, truth: da.Array) -> da.Array:
    """(Z, 4) lazy TP, FP, FN, TN per slice: per-chunk counts summed over the y/x chunks."""
    _, (p, t) = da.core.unify_chunks(predicted, "zyx", truth, "zyx")
    per_chunk = da.map_blocks(_confusion_by_slice, p, t, new_axis=3, dtype=np.int64,
                              chunks=(p.chunks[0], (1,) * len(p.chunks[1]), (1,) * len(p.chunks[2]), (4,)))
    return per_chunk.sum(axis=(1, 2))
