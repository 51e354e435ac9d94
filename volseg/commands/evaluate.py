"""`volseg eval`: score a probability volume against labels, streamed through dask.

Foreground is ``prediction > threshold`` (probabilities stored as integers are scaled back to [0, 1]:
uint8 foreground is ``value > threshold × 255``) against ``labels > 0``. Reported per z-slice:

* Dice and IoU — confusion counts of every storage chunk, summed over the y/x chunks of each slice;
  the volume-level Dice/IoU sum them over all slices;
* AJI and PQ — instances are the 8-connected components of each slice (prediction components with
  fewer than ``eval.min_size_vx`` voxels removed; the truth is used as is). These need whole slices,
  so they run on slabs of whole slices;
* the means over slices that have foreground in the prediction or the truth (a slice empty in both
  scores 1.0 on everything and is left out of the means, so empty slices cannot inflate them);
* AP-75 of the 26-connected 3D instances (MitoEM style, :func:`volseg.metrics.average_precision`),
  only when the whole volume has at most :data:`AP_MAX_VOLUME_VX` voxels, as it needs the whole volume.

Both volumes become dask arrays whose tasks read one box each through ``Volume.read``: the storage
chunks for the counts, and slabs of whole slices for AJI/PQ::

          storage chunks (counts)                slabs (AJI, PQ)
      z ┌──────┬──────┬───┐                 ┌──────────────────┐
        │      │      │   │  ── rechunk ──▶ │ depth × Y × X     │   when lcm(z chunks) slices fit
        ├──────┼──────┼───┤                 ├──────────────────┤   SLAB_TARGET_VX: each chunk is
        │      │      │   │                 │                  │   read once and feeds both
        └──────┴──────┴───┘                 └──────────────────┘   (else slabs read their own box)

Memory: a slab of ``depth`` slices holds about :data:`BYTES_PER_SLAB_VX` bytes per voxel while its
components are labelled and matched; one slice may have at most :data:`MAX_SLICE_VX` voxels (about
6 GiB at that size), else `eval` refuses before reading anything. Slabs are computed in groups whose
estimated memory stays under :data:`MEMORY_BUDGET_BYTES`, one progress step per group.

The scheduler is Ray's dask scheduler when a Ray cluster is connected (``ray.is_initialized()``) or
``RAY_ADDRESS`` names one, else dask's threaded scheduler; the report says which ran.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

import volseg
from volseg.errors import ConfigError, OutputExistsError, VolsegError, VolumeFormatError
from volseg.geometry import BlockGrid, Box, read_box
from volseg.io import Volume, VolumeSpec
from volseg.io.guard import PathRef, check_outputs
from volseg.io.urls import parse_url
from volseg.metrics import (
    AveragePrecision,
    Confusion,
    PanopticQuality,
    aggregated_jaccard,
    average_precision,
    connected_instances,
    panoptic_quality,
)

MAX_SLICE_VX = 2**28
"""Largest z-slice (Y × X voxels) `eval` accepts: AJI and PQ label and match whole slices in memory."""

SLAB_TARGET_VX = 2**24
"""Voxels a slab task aims at (whole slices; at least one slice)."""

BYTES_PER_SLAB_VX = 24
"""Estimated peak bytes per slab voxel: both inputs, masks, uint32 components, overlap codes."""

MEMORY_BUDGET_BYTES = 4 * 2**30
"""Estimated memory the slabs computed at once may take together."""

if TYPE_CHECKING:  # volseg.config imports torch (via the model registry); Ray workers need neither
    from volseg.config import Config, VolumeRef

AP_MAX_VOLUME_VX = 2**27
"""Largest volume (voxels) for which the 3D AP-75 is computed (it labels the whole volume at once)."""

MAX_TABLE_ROWS = 20
#: What a report says wrote it (an existing report is replaced only if it says so too).
REPORT_WRITER = f"volseg eval {volseg.__version__}"
"""Volumes with more slices get a min / median / max summary instead of one row per slice."""

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
    return handle.spec.open()


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


def _instance_scores_by_slice(predicted: np.ndarray, truth: np.ndarray, min_size_vx: int) -> np.ndarray:
    """(z, 5) float64 per slice of two boolean slabs: AJI, PQ's TP, FP, FN and matched-IoU sum."""
    out = np.empty((predicted.shape[0], _INSTANCE_COLUMNS))
    for i in range(predicted.shape[0]):
        predicted_instances = connected_instances(predicted[i], min_size_vx)
        true_instances = connected_instances(truth[i])
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
    def of(cls, shape_zyx: Sequence[int], z_chunks: Sequence[int], workers: int) -> SlabPlan:
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
        shared = fitting >= z_lcm
        depth = min(depth_z, fitting // z_lcm * z_lcm if shared else fitting)
        by_memory = MEMORY_BUDGET_BYTES // max(1, depth * slice_vx * BYTES_PER_SLAB_VX)
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


# --- the report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceScores:
    """The scores of z-slice ``z``: voxel counts (Dice, IoU), AJI and panoptic quality."""

    z: int
    confusion: Confusion
    aji: float
    panoptic: PanopticQuality

    @property
    def empty(self) -> bool:
        """Neither prediction nor truth has foreground here (every score is 1.0)."""
        return self.confusion.empty

    @property
    def values(self) -> dict[str, float]:
        c, p = self.confusion, self.panoptic
        return {"dice": c.dice, "iou": c.iou, "aji": self.aji, "pq": p.pq, "sq": p.sq, "rq": p.rq}

    def as_json(self) -> dict[str, Any]:
        c, p = self.confusion, self.panoptic
        return {"z": self.z, **self.values, "empty": self.empty,
                "voxels": {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn},
                "instances": {"tp": p.tp, "fp": p.fp, "fn": p.fn}}


METRIC_NAMES = ("dice", "iou", "aji", "pq")
"""The metrics of the table (the JSON report also has PQ's factors sq and rq)."""

METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "aji": "AJI", "pq": "PQ"}


@dataclass(frozen=True)
class EvalReport:
    """What `volseg eval` found. ``foreground_above`` is the stored value foreground must exceed."""

    prediction_url: str
    labels_url: str
    shape_zyx: tuple[int, int, int]
    threshold: float
    foreground_above: float
    min_size_vx: int
    scheduler: str
    slices: tuple[SliceScores, ...]
    ap75: AveragePrecision | None
    ap75_note: str
    report_path: str
    seconds: float

    @property
    def volume(self) -> Confusion:
        """Voxel counts of the whole volume (volume-level Dice and IoU)."""
        total = Confusion()
        for s in self.slices:
            total = total + s.confusion
        return total

    @property
    def scored(self) -> tuple[SliceScores, ...]:
        """The slices the means are taken over: those with foreground in prediction or truth."""
        return tuple(s for s in self.slices if not s.empty)

    @property
    def mean(self) -> dict[str, float]:
        """Unweighted means over :attr:`scored` slices (1.0 everywhere if no slice has foreground)."""
        names = (*METRIC_NAMES, "sq", "rq")
        if not self.scored:
            return dict.fromkeys(names, 1.0)
        return {name: statistics.fmean(s.values[name] for s in self.scored) for name in names}

    def as_json(self) -> dict[str, Any]:
        v = self.volume
        return {
            "written_by": REPORT_WRITER,
            "prediction": self.prediction_url, "labels": self.labels_url, "shape_zyx": list(self.shape_zyx),
            "threshold": self.threshold, "foreground_above": self.foreground_above,
            "min_size_vx": self.min_size_vx, "scheduler": self.scheduler,
            "mean": {**self.mean, "slices": len(self.scored),
                     "note": "over slices with foreground in prediction or labels"},
            "volume": {"dice": v.dice, "iou": v.iou, "tp": v.tp, "fp": v.fp, "fn": v.fn, "tn": v.tn},
            "ap75": None if self.ap75 is None else {
                "ap": self.ap75.ap, "precision": self.ap75.precision, "recall": self.ap75.recall,
                "tp": self.ap75.tp, "fp": self.ap75.fp, "fn": self.ap75.fn},
            "ap75_note": self.ap75_note,
            "slices": [s.as_json() for s in self.slices],
            "seconds": self.seconds,
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`as_json` to ``path`` (parent folders created; replaced atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def table_lines(self) -> list[str]:
        """A readable table: one row per slice (or min/median/max when there are many), the means,
        the volume-level Dice/IoU, AP-75, the scheduler and where the JSON report went."""
        lines = [f"prediction {self.prediction_url} (foreground > {self.foreground_above:g}) vs labels "
                 f"{self.labels_url}, {self.shape_zyx[0]} slices",
                 f"{'z':>8}" + "".join(f"{METRIC_TITLES[name]:>9}" for name in METRIC_NAMES)]

        def row(label: str, values: dict[str, float]) -> str:
            return f"{label:>8}" + "".join(f"{values[name]:9.4f}" for name in METRIC_NAMES)

        if len(self.slices) <= MAX_TABLE_ROWS:
            lines += [row(str(s.z), s.values) + ("   (empty in both)" if s.empty else "")
                      for s in self.slices]
        elif self.scored:
            for label, reduce in (("min", min), ("median", statistics.median), ("max", max)):
                lines.append(row(label, {n: reduce(s.values[n] for s in self.scored) for n in METRIC_NAMES}))
            worst = sorted(self.scored, key=lambda s: s.values["dice"])[:3]
            lines.append("  lowest Dice at z = " + ", ".join(str(s.z) for s in worst))
        lines.append(row("mean", self.mean) + f"   over {len(self.scored)} of {len(self.slices)} slices "
                     "(slices empty in both left out)")
        v = self.volume
        lines.append(f"  volume: Dice {v.dice:.4f}  IoU {v.iou:.4f}  (voxels TP {v.tp}, FP {v.fp}, FN {v.fn})")
        if self.ap75 is None:
            lines.append(f"  AP-75 (3D instances): not computed: {self.ap75_note}")
        else:
            a = self.ap75
            lines.append(f"  AP-75 (3D instances): {a.ap:.4f}  (precision {a.precision:.4f}, recall "
                         f"{a.recall:.4f}; instances TP {a.tp}, FP {a.fp}, FN {a.fn})")
        lines.append(f"  scheduler: {self.scheduler}; {self.seconds:.1f} s; report: {self.report_path}")
        return lines


# --- evaluate -----------------------------------------------------------------------------------------


def default_report_path(prediction_url: str) -> Path:
    """Where the JSON report goes by default: beside the prediction's container.

    ``/data/out.zarr/prob`` → ``/data/out_prob_eval.json`` (never inside a zarr/N5 container);
    ``/data/prob`` → ``/data/prob_eval.json``; a remote prediction → ``<name>_eval.json`` in the
    current directory.
    """
    parsed = parse_url(prediction_url)
    path = PurePosixPath(parsed.path.rstrip("/"))
    if parsed.scheme != "file":
        return Path.cwd() / f"{path.name or 'prediction'}_eval.json"
    for i, part in enumerate(path.parts):
        if part.lower().endswith((".zarr", ".n5")):
            container = PurePosixPath(*path.parts[: i + 1])
            name = "_".join((container.stem, *path.parts[i + 1:]))
            return Path(container.parent) / f"{name}_eval.json"
    return Path(path.parent) / f"{path.name}_eval.json"


def eval_paths(config: Config) -> tuple[list[PathRef], PathRef]:
    """What `volseg eval` reads (prediction, labels) and the report it writes."""
    assert config.eval is not None
    prediction = prediction_ref(config)
    inputs = [PathRef("eval.labels.url", config.eval.labels.url),
              PathRef("eval.prediction.url" if config.eval.prediction else "output.probabilities", prediction.url)]
    report = config.eval.report or str(default_report_path(prediction.url))
    return inputs, PathRef("eval.report", report, "file")


def check_report_path(report: PathRef, inputs: list[PathRef]) -> None:
    """The report may not touch an input, must be writable, and replaces only an earlier volseg report."""
    check_outputs(inputs, [report])
    path = Path(report.url)
    if path.exists() and not _is_report(path):
        raise OutputExistsError(f"{report.field} {report.url!r} exists and is not a volseg eval report; volseg never "
                                "replaces it.", f"choose another path for {report.field}.")


def _is_report(path: Path) -> bool:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and str(value.get("written_by", "")).startswith("volseg eval")


def prediction_ref(config: Config) -> VolumeRef:
    from volseg.config import VolumeRef

    assert config.eval is not None
    if config.eval.prediction is not None:
        return config.eval.prediction
    if config.output is not None:
        return VolumeRef(url=config.output.probabilities)
    raise ConfigError(
        f"{config.source_path or 'the config'}: `volseg eval` needs the prediction to score, and there is "
        "neither eval.prediction nor output.probabilities.",
        "add `prediction: {url: ...}` under `eval:`.",
    )


def check_pair(prediction: Volume, labels: Volume) -> None:
    if tuple(prediction.shape) != tuple(labels.shape):
        raise VolumeFormatError(
            f"The prediction {prediction.url} has shape (z, y, x) {tuple(prediction.shape)} but the labels "
            f"{labels.url} have shape {tuple(labels.shape)}.",
            "score against the labels of the segmented volume at the same scale (eval.labels.scale / "
            "eval.prediction.scale pick OME-Zarr scale levels).",
        )


def _score_group(counts: da.Array, instances: da.Array, z0: int, z1: int,
                 scheduler: Scheduler) -> list[SliceScores]:
    count_rows, instance_rows = dask.compute(counts[z0:z1], instances[z0:z1], scheduler=scheduler.get)
    return [SliceScores(z0 + i, Confusion(*(int(v) for v in c)), float(s[0]),
                        PanopticQuality(int(s[1]), int(s[2]), int(s[3]), float(s[4])))
            for i, (c, s) in enumerate(zip(count_rows, instance_rows, strict=True))]


def _score_ap(predicted: da.Array, truth: da.Array, scheduler: Scheduler) -> tuple[AveragePrecision | None, str]:
    if predicted.size > AP_MAX_VOLUME_VX:
        return None, (f"the volume has {predicted.size} voxels, more than the {AP_MAX_VOLUME_VX} "
                      "3D instance labelling holds in memory")
    p, t = dask.compute(predicted, truth, scheduler=scheduler.get)
    return average_precision(p, t, 0.75), ("26-connected 3D components, ranked by size, "
                                           "COCO 101-point AP at IoU >= 0.75 (MitoEM)")


def evaluate(config: Config, progress: bool = True) -> EvalReport:
    """Score ``config.eval``'s prediction against its labels and write the JSON report.

    See the module docstring for what is computed and how. Raises :class:`ConfigError` without an
    ``eval`` section or a prediction, :class:`VolumeFormatError` if the shapes differ, a volume has
    several channels or a slice is larger than :data:`MAX_SLICE_VX`.
    """
    from tqdm.auto import tqdm

    begin = time.perf_counter()
    config.require("eval", command="eval")
    assert config.eval is not None
    spec = config.eval
    inputs, report_ref = eval_paths(config)
    check_report_path(report_ref, inputs)
    prediction, labels = prediction_ref(config).open(), spec.labels.open()
    check_pair(prediction, labels)
    report_path = Path(report_ref.url)
    cut = foreground_threshold(prediction.dtype, spec.threshold)
    token = f"{os.getpid()}-{time.time_ns()}"
    with dask_scheduler() as scheduler:
        plan = SlabPlan.of(prediction.shape, (prediction.chunk_shape[0], labels.chunk_shape[0]),
                           scheduler.workers)
        predicted = volume_as_dask(prediction, token=token) > cut
        truth = volume_as_dask(labels, token=token) > 0
        counts = _counts_array(predicted, truth)
        instances = _instances_array(predicted, truth, prediction, labels, cut, plan, spec.min_size_vx, token)
        slices: list[SliceScores] = []
        with tqdm(total=prediction.shape[0], unit="slice", desc="evaluating", disable=not progress,
                  dynamic_ncols=True) as bar:
            for z0, z1 in plan.groups(prediction.shape[0]):
                slices += _score_group(counts, instances, z0, z1, scheduler)
                bar.update(z1 - z0)
        ap75, ap75_note = _score_ap(predicted, truth, scheduler)
    report = EvalReport(
        prediction.url, labels.url, tuple(prediction.shape), spec.threshold, cut, spec.min_size_vx,
        scheduler.name, tuple(slices), ap75, ap75_note, str(report_path), time.perf_counter() - begin,
    )
    report.write(report_path)
    return report


def _counts_array(predicted: da.Array, truth: da.Array) -> da.Array:
    """(Z, 4) lazy TP, FP, FN, TN per slice: per-chunk counts summed over the y/x chunks."""
    _, (p, t) = da.core.unify_chunks(predicted, "zyx", truth, "zyx")
    per_chunk = da.map_blocks(_confusion_by_slice, p, t, new_axis=3, dtype=np.int64,
                              chunks=(p.chunks[0], (1,) * len(p.chunks[1]), (1,) * len(p.chunks[2]), (4,)))
    return per_chunk.sum(axis=(1, 2))


def _instances_array(predicted: da.Array, truth: da.Array, prediction: Volume, labels: Volume, cut: float,
                     plan: SlabPlan, min_size_vx: int, token: str) -> da.Array:
    """(Z, 5) lazy per-slice instance scores (see :func:`_instance_scores_by_slice`) over slabs."""
    slab = (plan.depth, *prediction.shape[1:])
    if plan.shared:
        p_slab, t_slab = predicted.rechunk(slab), truth.rechunk(slab)
    else:
        p_slab = volume_as_dask(prediction, slab, token) > cut
        t_slab = volume_as_dask(labels, slab, token) > 0
    return da.map_blocks(_instance_scores_by_slice, p_slab, t_slab, min_size_vx, drop_axis=2,
                         chunks=(p_slab.chunks[0], (_INSTANCE_COLUMNS,)), dtype=np.float64)
