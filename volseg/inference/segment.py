"""`volseg run`: plan a segmentation (validating everything, writing nothing), then execute it.

:func:`plan_segmentation` opens the input read-only, loads the model, builds the block and window
grids, computes the run signature and checks every output that already exists. Only when all of that
holds does :func:`open_outputs` create or open the outputs, so bad input leaves storage untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

import volseg
from volseg.config import Config
from volseg.engine.ledger import SIGNATURE_KEY, check_signature
from volseg.errors import AlignmentError, ConfigError, OutputExistsError, VolumeFormatError
from volseg.geometry import BlockGrid, Box, Coord, PointSet, slices_within
from volseg.inference.job import FINITE_FIX, OutputTarget, SegmentationJob, count_not_finite
from volseg.inference.planes import resolve_planes
from volseg.inference.postprocess import ConfirmStage, MinAreaStage, confirm_extent_pixels, min_area_pixels
from volseg.inference.predictor import CALIBRATION_LATTICE, INPUT_DTYPES, TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.instances.run import InstancePlan, plan_instances
from volseg.intensity import IntensityRange, measure_intensity
from volseg.io import choose_output_chunks, create_volume, parse_url
from volseg.io.array import VolumeGeometry
from volseg.io.formats import creation_format
from volseg.io.guard import PathRef, check_outputs, points_ref
from volseg.io.point_index import PointIndex
from volseg.io.points import read_points
from volseg.io.pyramid import check_multiscale
from volseg.models import input_contract
from volseg.models.checkpoint import card_path, file_sha256, load_checkpoint, read_card

#: Default block core size, in voxels, when the config gives none.
DEFAULT_BLOCK_VOXELS = 1 << 24

log = logging.getLogger("volseg")


@dataclass(frozen=True)
class OutputSpec:
    """One output to create: URL, dtype and which prediction channels it stores."""

    name: str
    url: str
    dtype: np.dtype
    channels: tuple[int, ...]


@dataclass(frozen=True)
class SegmentationPlan:
    config: Config
    source: Any
    predictor: TorchPredictor
    windows: WindowGrid
    grid: BlockGrid
    chunk: Coord
    shard: Coord | None
    outputs: tuple[OutputSpec, ...]
    signature: str
    checkpoint_card: dict[str, Any]
    points: PointSet | None = None
    instances: InstancePlan | None = None
    intensity: IntensityRange | None = None
    norms: str | None = None
    planes: tuple[str, ...] = ("xy",)


def check_input_dtype(dtype: np.dtype, url: str, field: str) -> None:
    """Refuse grey-value volumes of a dtype models cannot read (e.g. a label volume given as input)."""
    if np.dtype(dtype) not in INPUT_DTYPES:
        allowed = ", ".join(str(d) for d in INPUT_DTYPES)
        raise VolumeFormatError(
            f"{field} {url!r} has dtype {np.dtype(dtype)}; volseg reads grey-value EM as {allowed}. "
            "(uint32/uint64 volumes are usually labels, not images.)",
            f"point {field} at the raw EM array, or convert it to uint8 (e.g. with tensorstore or zarr).",
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"inference.device is {device!r} but this machine has no CUDA GPU.",
                          "set inference.device to 'auto' or 'cpu'.")
    return torch.device(device)


AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_predictor(config: Config) -> tuple[TorchPredictor, dict[str, Any]]:
    """The configured model with its checkpoint loaded, wrapped as a predictor; and the checkpoint card."""
    spec = config.model.spec
    if config.model.checkpoint is None:
        raise ConfigError(
            f"{config.source_path or 'config'}: model.checkpoint is not set; `volseg run` needs trained "
            "weights.",
            "set model.checkpoint to a .safetensors file (train one with `volseg train CONFIG`).",
        )
    model = load_checkpoint(config.model.checkpoint, spec)
    predictor = TorchPredictor(
        model, input_contract(spec), config.inference.window, spec.num_classes,
        device=resolve_device(config.inference.device), batch_size=config.inference.batch_size,
        amp_dtype=AMP_DTYPES[config.inference.precision], tta=config.inference.tta,
    )
    return predictor, read_card(config.model.checkpoint)


def default_block(write_chunk: Coord, window: Coord, shape: Coord, depth: int = 1) -> Coord:
    """A block core of whole write chunks: at least 4 windows wide in y and x (so the windows shared
    with neighbours stay a small fraction), at least ``depth`` deep in z (ortho planes: a window's
    depth), about ``DEFAULT_BLOCK_VOXELS`` in all, no larger than the volume rounded up to whole chunks."""
    cap = [-(-s // c) * c for s, c in zip(shape, write_chunk, strict=True)]
    block = list(write_chunk)
    for ax in (1, 2):
        while block[ax] < 4 * window[ax] and block[ax] < cap[ax]:
            block[ax] += write_chunk[ax]
    while block[0] < depth and block[0] < cap[0]:
        block[0] += write_chunk[0]
    while int(np.prod(block)) < DEFAULT_BLOCK_VOXELS and block[0] < cap[0]:
        block[0] += write_chunk[0]
    return tuple(min(b, c) for b, c in zip(block, cap, strict=True))


def _roi(config: Config, bounds: Box) -> Box:
    if config.roi is None:
        return bounds
    roi = Box(config.roi.start, config.roi.stop)
    if not bounds.contains(roi):
        raise ConfigError(f"roi {roi} reaches outside the input volume {bounds}.",
                          f"keep roi.stop within the volume shape {bounds.stop}.")
    return roi


def _check_shard(shard: Coord | None, chunk: Coord) -> None:
    for axis, s, c in zip("zyx", shard or (), chunk, strict=False):
        if s % c:
            raise AlignmentError(f"output.shard {tuple(shard or ())} is not a whole number of output chunks "
                                 f"{tuple(chunk)} on axis {axis} ({s} % {c} = {s % c}).",
                                 f"make output.shard on axis {axis} a multiple of {c}, e.g. {max(c, s // c * c)}.")


def _output_specs(config: Config, num_classes: int) -> tuple[OutputSpec, ...]:
    out = config.output
    assert out is not None  # checked by require()
    specs = [OutputSpec("probabilities", out.probabilities, np.dtype(out.dtype), tuple(range(num_classes)))]
    if out.density is not None:
        specs.append(OutputSpec("density", out.density, np.dtype("float32"), (num_classes,)))
    return tuple(specs)


def run_paths(config: Config) -> tuple[list[PathRef], list[PathRef]]:
    """What `volseg run` reads (input volume, checkpoint and its card, points) and writes (outputs)."""
    inputs = []
    if config.input is not None:
        inputs.append(PathRef("input.url", config.input.url))
    if config.model.checkpoint is not None:
        inputs += [PathRef("model.checkpoint", config.model.checkpoint, "file"),
                   PathRef("model.checkpoint (card)", str(card_path(config.model.checkpoint)), "file")]
    if config.prompts is not None and config.prompts.points is not None:
        inputs.append(points_ref("prompts.points", config.prompts.points))
    outputs = []
    if config.output is not None:
        outputs.append(PathRef("output.probabilities", config.output.probabilities))
        if config.output.density is not None:
            outputs.append(PathRef("output.density", config.output.density))
    if config.instances is not None:
        outputs.append(PathRef("instances.url", config.instances.url))
    return inputs, outputs


def run_signature(weights: str, config: Config, grid: BlockGrid, windows: WindowGrid,
                  points: PointSet | None = None, intensity: IntensityRange | None = None,
                  norms: str | None = None) -> str:
    """Hash of everything that determines the bytes a run writes (prompts by their coordinates, the
    input's grey-value range by its bounds). BatchNorm statistics calibrated on the input (``norms``, their
    digest, None when not calibrated) count by how they were sampled, not by their floats (which vary
    in the last bits with the CPU's thread count); runs without them keep the signature they had before
    the option existed."""
    payload = {
        "intensity": None if intensity is None else list(intensity.bounds),
        "weights_sha256": weights,
        "points_sha256": None if points is None else hashlib.sha256(points.zyx.tobytes()).hexdigest(),
        "config": config.output_fingerprint(),
        "grid": {"roi": grid.roi.to_json(), "core": list(grid.core_shape)},
        "windows": {"window": list(windows.window), "stride": list(windows.stride)},
        "threads": config.execution.threads,
        "volseg": volseg.__version__,
    }
    if norms is not None:
        payload["calibrate_norms"] = list(CALIBRATION_LATTICE)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_segmentation(config: Config, overwrite: bool = False) -> SegmentationPlan:
    """Validate everything a run needs and decide its geometry; writes nothing."""
    config.require("input", "output", command="run")
    assert config.input is not None and config.output is not None
    check_executor_outputs(config)
    check_outputs(*run_paths(config))
    outputs = _output_specs(config, config.model.num_classes)
    if config.output.levels > 1:
        for field, url in [(f"output.{spec.name}", spec.url) for spec in outputs] + (
                [("instances.url", config.instances.url)] if config.instances is not None else []):
            check_multiscale(url, field, creation_format(parse_url(url), None))
    source = config.input.open()
    if source.num_channels is not None:
        raise VolumeFormatError(
            f"Input {config.input.url!r} has {source.num_channels} channels; volseg segments "
            "single-channel grey EM volumes (z, y, x).", "point input.url at the grey-value array.")
    check_input_dtype(source.dtype, config.input.url, "input.url")
    check_not_empty(source, config.input.url, "input.url")
    predictor, card = build_predictor(config)
    intensity = None
    if predictor.contract.percentiles is not None:  # once per volume: every block uses the same range
        intensity = measure_intensity(source, predictor.contract.percentiles)
        predictor.intensity = intensity.bounds
    # once per volume too, after the intensity range (the calibration windows are normalised with it)
    norms = predictor.calibrate_norms(source) if config.inference.calibrate_norms else None
    windows = WindowGrid(source.shape, config.inference.window, config.inference.stride)
    planes = resolve_planes(config.inference.planes, windows.window, source.voxel_size_nm,
                            predictor.contract.dims, config.input.url)
    chunk = config.output.chunk or choose_output_chunks(source.shape, np.dtype(config.output.dtype),
                                                        source.chunk_shape)
    _check_shard(config.output.shard, chunk)
    write_chunk = config.output.shard or chunk
    depth = windows.window[1] if len(planes) > 1 else 1  # xz and yz windows reach a window deep in z
    core = config.execution.block or default_block(write_chunk, windows.window, source.shape, depth)
    grid = BlockGrid.aligned(_roi(config, source.bounds), core, 0, source.bounds, write_chunk)
    if grid.grid_shape[0] > 1 and grid.core_shape[0] < depth:  # one block deep over the ROI: nothing recomputed
        log.warning("inference.planes ortho with blocks %d slices deep: each xz and yz window (%d deep) is "
                    "computed by every block it reaches; set execution.block on z to at least %d.",
                    grid.core_shape[0], depth, depth)
    points = None
    if config.prompts is not None and config.prompts.auto:
        _check_auto_prompts(config, predictor)
    elif config.prompts is not None and config.prompts.points is not None:
        points = read_points(config.prompts.points, source.voxel_size_nm, source.voxel_offset, source.bounds,
                             config.prompts.layer)
        if len(points) and not getattr(predictor.model, "promptable", False) and not config.prompts.confirm_nm:
            raise ConfigError(f"prompts.points gives {len(points)} points, but model {config.model.name!r} "
                              "takes no prompts.", "use model.name: promptdas, set prompts.confirm_nm to use the "
                              "points only to confirm components, or remove the prompts section.")
    signature = run_signature(file_sha256(config.model.checkpoint), config, grid, windows, points, intensity,
                              norms)
    plan = SegmentationPlan(config, source, predictor, windows, grid, tuple(chunk),
                            None if config.output.shard is None else tuple(config.output.shard),
                            outputs, signature, card, points, intensity=intensity, norms=norms, planes=planes)
    check_existing_outputs(plan, overwrite)
    if config.instances is not None:
        plan = replace(plan, instances=_plan_instances(plan, overwrite))
    check_finite(source, config.input.url, "input.url", plan.grid.roi)
    return plan


def check_existing_outputs(plan: SegmentationPlan, overwrite: bool) -> None:
    """Check every output that exists (geometry and run signature) without writing; run again once
    the run holds its outputs, in case another run wrote them since the plan."""
    for spec in plan.outputs:
        existing = create_volume(**_creation_arguments(plan, spec), dry_run=True)
        if existing is not None:
            check_signature(existing, spec.url, f"output.{spec.name}", plan.signature, overwrite)
    if plan.instances is not None:
        _plan_instances(plan, overwrite)


def _plan_instances(plan: SegmentationPlan, overwrite: bool) -> InstancePlan:
    config, source = plan.config, plan.source
    settings = config.instances
    assert settings is not None and config.output is not None
    geometry = VolumeGeometry(shape=source.shape, dtype=np.dtype(config.output.dtype),
                              voxel_size_nm=source.voxel_size_nm, voxel_offset=source.voxel_offset,
                              chunk_shape=plan.chunk, shard_shape=plan.shard)
    halo = None
    if settings.halo_nm is not None:
        halo = tuple(int(np.ceil(settings.halo_nm / v)) for v in source.voxel_size_nm)
    return plan_instances(settings, plan.grid, geometry, config.output.probabilities, config.output.density,
                          default_threshold=config.inference.threshold, signature=plan.signature,
                          overwrite=overwrite, halo_vx=halo, connectivity=settings.connectivity)


def _check_auto_prompts(config: Config, predictor: TorchPredictor) -> None:
    if not getattr(predictor.model, "promptable", False):
        raise ConfigError(f"prompts.auto needs a promptable model; model {config.model.name!r} takes no prompts.",
                          "use model.name: promptdas, or remove the prompts section.")
    if not getattr(predictor.model, "predicts_density", True):
        raise ConfigError(f"prompts.auto finds its prompts in the density map, and model {config.model.name!r} "
                          "predicts none.", "run Prompt-DAS first, write its peaks with `volseg peaks CONFIG "
                          "--out peaks.csv`, and give them as prompts.points.")
    if config.output is None or config.output.density is None:
        raise ConfigError("prompts.auto finds its prompts in the density map, but output.density is not set.",
                          "set output.density to a path for the density map.")


def check_executor_outputs(config: Config) -> None:
    """Outputs in ``memory://`` live in one process; actors in other processes cannot write them."""
    out = config.output
    urls = [u for u in (out.probabilities, out.density) if u] if out else []
    if config.instances is not None:
        urls.append(config.instances.url)
    for url in urls:
        if config.execution.executor == "ray" and url.startswith("memory://"):
            raise ConfigError(f"output {url!r} is an in-process memory store, which Ray actors cannot write.",
                              "use a path or bucket URL, or set execution.executor: serial.")


def _creation_arguments(plan: SegmentationPlan, spec: OutputSpec) -> dict[str, Any]:
    """Outputs copy the input's voxel size and offset, over the input's whole shape."""
    source = plan.source
    return {
        "url": spec.url, "shape": source.shape, "dtype": spec.dtype, "voxel_size_nm": source.voxel_size_nm,
        "voxel_offset": source.voxel_offset, "chunk_shape": plan.chunk, "shard_shape": plan.shard,
        "num_channels": len(spec.channels) if len(spec.channels) > 1 else None, "exist_ok": True,
    }


def check_not_empty(volume: Any, url: str, field: str) -> None:
    """Refuse a volume with no voxels (an axis of size 0)."""
    if 0 in tuple(volume.shape):
        raise VolumeFormatError(f"{field} {url!r} is empty: its shape is {tuple(volume.shape)}.",
                                f"point {field} at a volume with data.")


#: Float inputs up to this many voxels are checked for NaN/Inf in full before a run; larger ones
#: in a sample of chunks spread over the volume (each block checks its own voxels as it runs).
FINITE_CHECK_VOXELS = 1 << 27
FINITE_SAMPLE_CHUNKS = 32


def check_finite(volume: Any, url: str, field: str, roi: Box) -> None:
    """Refuse a float input holding NaN or ±Inf: the model would turn them into NaN outputs."""
    if np.dtype(volume.dtype).kind != "f":
        return
    boxes = [roi] if roi.size <= FINITE_CHECK_VOXELS else _sample_boxes(roi, volume.chunk_shape)
    bad = sum(count_not_finite(volume.read(box)) for box in boxes)
    if bad:
        where = "" if roi.size <= FINITE_CHECK_VOXELS else f" in a sample of {len(boxes)} chunks"
        raise VolumeFormatError(f"{field} {url!r} holds {bad:,} NaN or infinite voxels{where}.", FINITE_FIX)


def _sample_boxes(roi: Box, chunk: Coord) -> list[Box]:
    """Up to :data:`FINITE_SAMPLE_CHUNKS` chunk-sized boxes spread evenly along the diagonal of ``roi``."""
    boxes = []
    for i in range(FINITE_SAMPLE_CHUNKS):
        start = tuple(b + (e - b - min(c, e - b)) * i // max(1, FINITE_SAMPLE_CHUNKS - 1)
                      for b, e, c in zip(roi.start, roi.stop, chunk, strict=True))
        boxes.append(Box(start, tuple(min(s + c, e) for s, c, e in zip(start, chunk, roi.stop, strict=True))))
    return list(dict.fromkeys(boxes))


def check_device(plan: SegmentationPlan, device: str, overwrite: bool) -> None:
    """Refuse to resume on another kind of device (``cpu``, ``cuda``) than the one that wrote the
    blocks already done: the floats would differ from block to block within one output."""
    if overwrite:
        return
    for spec in plan.outputs:
        existing = create_volume(**_creation_arguments(plan, spec), dry_run=True)
        stamp = existing.attributes.get(SIGNATURE_KEY) if existing is not None else None
        found = stamp.get("device") if isinstance(stamp, dict) and stamp.get("signature") == plan.signature else None
        if found not in (None, device):
            raise OutputExistsError(
                f"output.{spec.name} {spec.url!r} was started on {found}, and this run would continue it on {device}; "
                "the two compute slightly different floats, which one output must not mix.",
                f"resume it on {found} (inference.device, execution.gpus_per_actor), or pass --overwrite to start "
                "it again.")


def open_outputs(plan: SegmentationPlan, device: str | None = None) -> list[OutputTarget]:
    """Create (or reopen, when the geometry matches) every output and stamp the run signature (and the
    kind of ``device`` computing its blocks)."""
    num_classes = plan.predictor.num_classes
    targets = []
    for spec in plan.outputs:
        stamp = {SIGNATURE_KEY: {
            "signature": plan.signature,
            "device": device,
            "version": volseg.__version__,
            "output": spec.name,
            "channels": ["probability"] * num_classes + ["density"],
            "input": plan.config.input.url if plan.config.input else None,
            "checkpoint": plan.config.model.checkpoint,
            "intensity": None if plan.intensity is None else plan.intensity.to_json(),
            "norms_sha256": plan.norms,
        }}
        # stamped when created, so no output ever exists without saying that volseg wrote it
        volume = create_volume(**_creation_arguments(plan, spec), attributes=stamp)
        volume.update_attributes(stamp)
        targets.append(OutputTarget(volume, spec.channels))
    return targets


def make_job(plan: SegmentationPlan, targets: Sequence[OutputTarget], points: PointSet | None = None
             ) -> SegmentationJob:
    """The segmentation stage writing ``targets``, prompted by ``points`` (default: the plan's, if the
    model takes prompts; a model that does not gets them only to confirm components, ``prompts.confirm_nm``)."""
    inference = plan.config.inference
    if points is None and getattr(plan.predictor.model, "promptable", False):
        points = plan.points
    return SegmentationJob(plan.source, targets, plan.predictor, plan.windows, inference.blend,
                           batch_windows=inference.batch_size, points=points, planes=plan.planes)


def make_min_area(plan: SegmentationPlan, probabilities: OutputTarget) -> MinAreaStage | None:
    """The stage removing components under ``output.min_area_nm2`` from the written ``probabilities``
    (foreground above ``inference.threshold``); ``None`` when that area is under two pixels, which
    removes nothing."""
    assert plan.config.output is not None  # checked by plan_segmentation
    min_px = min_area_pixels(plan.config.output.min_area_nm2, plan.source.voxel_size_nm)
    if min_px < 2:
        return None
    return MinAreaStage(probabilities.volume, plan.config.inference.threshold, min_px)


def make_confirm(plan: SegmentationPlan, probabilities: OutputTarget, points: PointSet | PointIndex | None
                 ) -> ConfirmStage | None:
    """The stage removing the components of the written ``probabilities`` that no prompt of ``points``
    (the run's: from the file, or the density peaks of ``prompts.auto``) within ``prompts.confirm_nm``
    confirms; ``None`` without ``confirm_nm`` or points."""
    prompts = plan.config.prompts
    if prompts is None or not prompts.confirm_nm or points is None:
        return None
    voxel = plan.source.voxel_size_nm
    return ConfirmStage(probabilities.volume, plan.config.inference.threshold, points,
                        slices_within(prompts.confirm_nm, voxel[0]), confirm_extent_pixels(voxel))
