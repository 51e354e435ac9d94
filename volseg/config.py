"""The run configuration: one typed, validated, immutable schema for run / train / eval / demo.

A config is YAML. ``load_config(path)`` returns a frozen :class:`Config` or raises
:class:`~volseg.errors.ConfigError` naming the file, the field (as a dotted path) and what is allowed.
Relative paths inside a config are resolved against the current working directory, like every other
command-line path. Below ``cli.py`` nothing sees a dict or an argparse namespace, only these objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from volseg.errors import ConfigError
from volseg.models import ModelSpec

PositiveTriple = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoiConfig(Section):
    """The region to segment, in voxels (z, y, x), half-open; defaults to the whole volume."""

    start: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
    stop: PositiveTriple

    @model_validator(mode="after")
    def _ordered(self) -> RoiConfig:
        if any(b >= e for b, e in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"roi.start {self.start} must be below roi.stop {self.stop} on every axis")
        return self


class VolumeRef(Section):
    """A volume: its URL (local path, file://, memory://, gs://, s3://, http(s)://, with an optional
    Neuroglancer-style format prefix zarr:// zarr2:// zarr3:// n5:// precomputed://), for OME-Zarr
    the scale level to read, and for precomputed the library that reads it. ``roi`` (training and
    eval): the region of the volume that is used (crops, intensity statistics, points, scores), e.g.
    the slices a model may learn from, keeping the rest for testing."""

    url: str = Field(min_length=1)
    scale: int | None = Field(default=None, ge=0)
    backend: Literal["auto", "tensorstore", "cloudvolume"] = "auto"
    roi: RoiConfig | None = None

    def open(self, field: str = "volume") -> Any:
        """The volume, opened read-only (a :class:`volseg.io.Volume`); only its ``roi`` when one is set.
        ``field`` names it in the error of a roi outside the volume."""
        from volseg.geometry import Box
        from volseg.io import open_volume

        volume = open_volume(self.url, "r", scale=self.scale, backend=self.backend)
        if self.roi is None:
            return volume
        box = Box(self.roi.start, self.roi.stop)
        if not volume.bounds.contains(box):
            raise ConfigError(f"{field}.roi {box} reaches outside {self.url!r}, whose shape is {volume.shape}.",
                              f"keep {field}.roi.stop within {volume.shape}.")
        return volume.region(box)


class ModelConfig(Section):
    """Which model, and where its weights are (a ``.safetensors`` checkpoint with its JSON card)."""

    name: str = "unet"
    num_classes: int = Field(default=1, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, self.num_classes, dict(self.options))


class InferenceConfig(Section):
    """Sliding windows over the global window grid and how their predictions are blended."""

    window: PositiveTriple = (1, 128, 128)
    stride: PositiveTriple = (1, 96, 96)
    blend: Literal["cosine", "gaussian", "constant"] = "cosine"
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    #: Re-estimate the model's BatchNorm statistics on the input volume before the run (AdaBN; see
    #: :meth:`volseg.inference.predictor.TorchPredictor.calibrate_norms`). No effect without BatchNorm.
    calibrate_norms: bool = False
    #: Test-time augmentation: every window's prediction is the mean over this many in-plane views
    #: (1: none; 4: the four quarter turns; 8: those and their mirror images), prompts turned with the
    #: image. Costs as many forward passes; windows must be square in y and x.
    tta: Literal[1, 4, 8] = 1
    #: The planes a 2D model reads: ``xy`` (its slices), or ``ortho``: also the xz and yz planes, the
    #: three predictions averaged (:mod:`volseg.inference.planes`). Only for volumes of near-cubic
    #: voxels (e.g. FIB-SEM); costs three times the windows, and blocks read a window's depth in z.
    #: ``auto``: ortho where the input's voxels and the model allow it, else xy.
    planes: Literal["xy", "ortho", "auto"] = "xy"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @model_validator(mode="after")
    def _windows_fit(self) -> InferenceConfig:
        for ax, w, s in zip("zyx", self.window, self.stride, strict=True):
            if s > w:
                raise ValueError(
                    f"stride {s} on axis {ax} exceeds the window {w}; voxels between windows would "
                    f"never be predicted (use a stride of at most {w})"
                )
        if self.tta > 1 and self.window[1] != self.window[2]:
            raise ValueError(f"tta {self.tta} turns windows a quarter turn, so the window must be square in y and x; "
                             f"{list(self.window)} is not (use y = x, or tta: 1)")
        return self


class OutputConfig(Section):
    """Where results go. Created with the input's voxel size and offset; an existing output must have
    the same geometry, or the run is refused.

    ``min_area_nm2``: once the probabilities are written, every connected component of foreground
    (probability > ``inference.threshold``; per z slice, 8-connected in y and x) whose area is under
    this many square nanometres (in pixels: divided by voxel y × voxel x, rounded up) has its
    probabilities set to 0, exactly as one whole-volume pass would; the density output is untouched.
    0 (the default) removes nothing.

    ``levels``: scale levels of every output (and of the instances), level 0 included; each level is the
    one below downsampled blockwise (mean; instance labels: mode) by 2 on the axes whose voxels are the
    finest (see :mod:`volseg.io.pyramid`), so Neuroglancer can zoom out of a large volume. Zarr (OME-Zarr
    multiscales) and precomputed outputs only. Not part of the run signature: a rerun with more levels
    adds the missing ones."""

    probabilities: str = Field(min_length=1)
    density: str | None = None
    dtype: Literal["float32", "uint8"] = "float32"
    chunk: PositiveTriple | None = None
    shard: PositiveTriple | None = None
    min_area_nm2: float = Field(default=0.0, ge=0.0)
    levels: int = Field(default=1, ge=1, le=20)


class ExecutionConfig(Section):
    """How blocks are cut and run. ``block`` is the core each block writes; it must be a whole
    number of output chunks (or shards); default: the output chunk grown to about 16 M voxels.

    ``executor: ray`` (the default) runs blocks on predictor actors of the Ray cluster named by
    ``cluster.address`` (or ``RAY_ADDRESS``), starting a local Ray instance when there is none;
    ``serial`` runs them in this process. ``actors`` defaults to one per GPU, or on a CPU-only
    cluster to its CPUs divided by ``cpus_per_actor``, and then grows as nodes join a joined cluster.
    Each actor holds ``in_flight`` tasks at a time (one computing while the others read or write; a
    task is one block, or several quick ones); a block is tried ``max_attempts`` times.

    ``threads``: torch threads computing each block, on every executor. Float results depend on the
    thread count, so it is part of the run signature: one config gives one set of bytes, serial or Ray.
    ``lease_seconds``: a run holds its outputs with a lease it renews; one not renewed for this long
    belongs to a dead run and is taken over by the next run."""

    block: PositiveTriple | None = None
    executor: Literal["ray", "serial"] = "ray"
    prefetch: int = Field(default=2, ge=0, le=16)
    actors: int | None = Field(default=None, ge=1)
    cpus_per_actor: float | None = Field(default=None, gt=0)
    gpus_per_actor: float | None = Field(default=None, ge=0)
    in_flight: int = Field(default=2, ge=1, le=16)
    max_attempts: int = Field(default=3, ge=1, le=100)
    threads: int = Field(default=2, ge=1, le=256)
    lease_seconds: float = Field(default=120.0, ge=1.0)


class PromptsConfig(Section):
    """One global set of point prompts for `run`: a CSV (z,y,x voxel indices) or a Neuroglancer
    annotation JSON (``layer`` picks one annotation layer of a viewer state); or ``auto: true``: a
    first pass writes the density map, its peaks (above ``peak_threshold``, at least
    ``min_distance_nm`` apart, found across block borders) become the prompts of a second pass.

    ``confirm_nm`` (0: off): once the probabilities are written, every 2D component of foreground (per z
    slice, 8-connected) that holds no prompt point of a slice within this distance in z (the points
    projected onto it) has its probabilities set to 0: sparse points that mark a share of the objects of
    every slice confirm the organelles, which span many slices, and drop the blobs no point marks.
    Components wider than 2 µm in y or x are kept unjudged. Blockwise, with the bytes of one
    whole-volume pass."""

    points: str | None = Field(default=None, min_length=1)
    layer: str | None = None
    auto: bool = False
    peak_threshold: float = Field(default=0.3, gt=0.0, lt=1.0)
    min_distance_nm: float = Field(default=100.0, gt=0.0)
    confirm_nm: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if (self.points is None) == (not self.auto):
            raise ValueError("give either points (a file of point prompts) or auto: true, not both and not neither")
        return self


class InstancesConfig(Section):
    """Instance segmentation of the semantic output, written to ``url`` as uint64 labels (zarr,
    OME-Zarr, N5, or ``precomputed://`` segmentation). Foreground is probability > ``threshold``
    (default ``inference.threshold``); ``watershed`` splits it from density peaks above
    ``seed_threshold`` at least ``min_distance_nm`` apart (needs ``output.density``);
    ``connected_components`` labels touching foreground (``connectivity`` 6, 18 or 26). Objects under
    ``min_size_vx`` voxels or ``min_size_nm3`` cubic nanometres (with the volume's voxel size; the
    larger bound applies) are dropped, whole, wherever their pieces lie. ``halo_nm``: context each
    watershed block sees around its core (default 4 × ``min_distance_nm``); it should exceed the largest
    object's radius. ``meshes``: also write Neuroglancer meshes of the objects (zmesh, blockwise; see
    :mod:`volseg.instances.meshes`); not part of the run signature (the labels are the same)."""

    url: str = Field(min_length=1)
    method: Literal["watershed", "connected_components"] = "watershed"
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    seed_threshold: float = Field(default=0.3, gt=0.0, lt=1.0)
    min_distance_nm: float = Field(default=100.0, gt=0.0)
    min_size_vx: int = Field(default=0, ge=0)
    min_size_nm3: float = Field(default=0.0, ge=0.0)
    connectivity: Literal[6, 18, 26] = 6
    halo_nm: float | None = Field(default=None, gt=0.0)
    meshes: bool = False


class ClusterConfig(Section):
    """The Ray cluster. ``address`` (default: ``RAY_ADDRESS``, else a local instance started for the
    command). ``workers`` > 1 runs `train`/`adapt` under Ray Train (DDP, one worker per GPU, or CPU
    workers with gloo); 0 or 1 runs the plain single-process loop. The global batch (``batch_size``) is
    split evenly among the workers. ``use_gpu`` defaults to whether the cluster has GPUs. Every
    ``checkpoint_every`` steps a checkpoint goes to ``storage`` (default: ``<checkpoint stem>.ray/``
    beside the output checkpoint; on a multi-node cluster, storage every node reaches: NFS, ``s3://``,
    ``gs://``); a dead worker restarts the workers from it, at most ``max_failures`` times."""

    address: str | None = None
    workers: int = Field(default=0, ge=0)
    use_gpu: bool | None = None
    cpus_per_worker: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=100, ge=1)
    max_failures: int = Field(default=2, ge=0)
    storage: str | None = Field(default=None, min_length=1)


class TrainConfig(Section):
    """Supervised training on labelled volumes (source domain). ``unprompted_share`` (Prompt-DAS): the
    share of crops trained without point prompts (the others get a random subset of their objects'
    centres), so that runs without prompts meet a model trained for them. ``zoom`` (Prompt-DAS): each crop
    is magnified by a random factor, log-uniform in ``[1/zoom, zoom]`` (1: off), so the model meets
    organelles of other sizes than the source's."""

    raw: VolumeRef
    labels: VolumeRef
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=8, ge=1)
    crop: PositiveTriple = (1, 128, 128)
    learning_rate: float = Field(default=2e-3, gt=0)
    density_sigma_nm: float = Field(default=40.0, gt=0)
    unprompted_share: float = Field(default=0.5, ge=0.0, le=1.0)
    zoom: float = Field(default=1.0, ge=1.0, le=4.0)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    checkpoint: str = Field(min_length=1)


class EvalConfig(Section):
    """Scoring a semantic output against ground truth (`volseg eval`, and the demo's summary).

    ``prediction`` defaults to ``output.probabilities``; foreground is ``prediction > threshold``
    (probabilities stored as uint8 are scaled back to [0, 1] first). ``instances``: an instance output
    (e.g. ``instances.url``) scored against ``labels`` holding instance ids, with the MitoEM AP-75,
    streamed at any size (alone, its ``id > 0`` is the foreground). ``report`` is where the JSON report
    goes (default: beside the prediction)."""

    labels: VolumeRef
    prediction: VolumeRef | None = None
    instances: VolumeRef | None = None
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_size_vx: int = Field(default=0, ge=0)
    report: str | None = None


class LabelledVolume(Section):
    """A raw volume and its labels (labels > 0 = organelle), e.g. the source domain."""

    raw: VolumeRef
    labels: VolumeRef


class TargetConfig(Section):
    """The target domain: its raw volume, sparse point annotations (WDA) and, for the oracle mode
    ``supervised-target`` only, its labels."""

    raw: VolumeRef
    points: str | None = None
    labels: VolumeRef | None = None


class GuardConfig(Section):
    """The adaptation guard (:mod:`volseg.training.promptdas.guard`): every ``every`` steps the teacher is
    checked on ``probes`` target crops; after ``patience`` unhealthy checks in a row (predicted foreground
    under ``min_ratio`` × the source model's or above ``max_ratio`` × the larger of the source model's and
    ``floor_foreground``, teacher–student Dice under ``min_agreement``, or centred objects under
    ``min_centred_ratio`` × the source model's share where that share is at least ``floor_centred``)
    adaptation stops and keeps the last healthy teacher. ``enabled: false`` only records the signals."""

    enabled: bool = True
    every: int = Field(default=25, ge=1)
    probes: int = Field(default=8, ge=1)
    min_ratio: float = Field(default=0.3, gt=0.0)
    max_ratio: float = Field(default=3.0, gt=1.0)
    min_agreement: float = Field(default=0.5, ge=0.0, le=1.0)
    min_centred_ratio: float = Field(default=0.5, ge=0.0)
    patience: int = Field(default=2, ge=1)
    floor_foreground: float = Field(default=0.1, ge=0.0, le=1.0)
    floor_centred: float = Field(default=0.1, ge=0.0, le=1.0)


class AdaptConfig(Section):
    """Mean-teacher domain adaptation of a source-trained Prompt-DAS checkpoint (`volseg adapt`).

    Values the paper leaves open (METHOD.md, *choose*) are fields here with the defaults volseg uses;
    their meaning is that of :class:`volseg.training.promptdas.settings.AdaptSettings`. ``threads``:
    torch threads of the training process (None: torch's default, one per core). ``zoom``: the labelled
    crops' random magnification, as ``train.zoom``. ``confirm_points_nm`` (wda; 0: off): a pseudo-foreground
    2D component is kept only if a sparse point of a slice within this distance in z lies in it
    (:attr:`~volseg.training.promptdas.settings.AdaptSettings.confirm_slices`). ``persistence_nm`` (uda or
    wda; 0: off) and ``persistence_share``: a pseudo-foreground 2D component is kept only if at least that
    share of its pixels is foreground for the teacher in the slices this far above and below
    (:attr:`~volseg.training.promptdas.settings.AdaptSettings.persistence_slices`). ``source_paste`` (uda or
    wda with ``source``; 0: off): the share of pseudo-labelled target crops onto which a source crop's
    labelled organelles are pasted (:attr:`~volseg.training.promptdas.settings.AdaptSettings.source_paste`)."""

    mode: Literal["uda", "wda", "supervised-target"] = "uda"
    source: LabelledVolume | None = None
    target: TargetConfig
    init: str | None = Field(default=None, description="source-trained checkpoint to start from")
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=4, ge=1)
    crop: PositiveTriple = (1, 128, 128)
    learning_rate: float = Field(default=5e-4, gt=0)
    ema_alpha: float = Field(default=0.99, gt=0.0, lt=1.0)
    delta_f: float = Field(default=0.8, gt=0.0, lt=1.0)
    delta_b: float = Field(default=0.2, gt=0.0, lt=1.0)
    pcl_weight: float = Field(default=0.1, ge=0.0)
    pcl_temperature: float = Field(default=0.5, gt=0.0)
    peak_threshold: float = Field(default=0.3, gt=0.0, lt=1.0)
    density_sigma_nm: float = Field(default=40.0, gt=0)
    unprompted_share: float = Field(default=0.5, ge=0.0, le=1.0)
    calibrate_crops: int = Field(default=64, ge=0)
    calibrate_every: int = Field(default=25, ge=1)
    pseudo_foreground_share: float = Field(default=0.5, gt=0.0, lt=1.0)
    balance_pseudo_labels: bool = True
    density_weight: float = Field(default=30.0, ge=0.0)
    target_weight: float = Field(default=1.0, ge=0.0)
    source_paste: float = Field(default=0.0, ge=0.0, le=1.0)
    require_centre: bool = False
    student_prompts: Literal["all", "subset"] = "subset"
    density_pseudo_target: Literal["peaks", "teacher"] = "peaks"
    contrastive_points: int = Field(default=16, ge=0)
    point_crop_share: float = Field(default=0.0, ge=0.0, le=1.0)
    confirm_points_nm: float = Field(default=0.0, ge=0.0)
    persistence_nm: float = Field(default=0.0, ge=0.0)
    persistence_share: float = Field(default=0.6, gt=0.0, le=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    poly_power: float = Field(default=0.9, ge=0.0)
    zoom: float = Field(default=1.0, ge=1.0, le=4.0)
    guard: GuardConfig = GuardConfig()
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    checkpoint: str = Field(min_length=1)

    @model_validator(mode="after")
    def _thresholds(self) -> AdaptConfig:
        if self.delta_b >= self.delta_f:
            raise ValueError(f"delta_b {self.delta_b} must be below delta_f {self.delta_f}")
        if self.mode == "wda" and self.target.points is None:
            raise ValueError("mode wda needs target.points (the sparse point annotations)")
        if self.confirm_points_nm > 0 and self.mode != "wda":
            raise ValueError(f"confirm_points_nm {self.confirm_points_nm} needs mode wda (it confirms pseudo-labels "
                             "by the sparse points); set it to 0 for other modes")
        if self.persistence_nm > 0 and self.mode == "supervised-target":
            raise ValueError(f"persistence_nm {self.persistence_nm} filters the teacher's pseudo-labels of mode uda or "
                             "wda; set it to 0 for mode supervised-target")
        if self.source_paste > 0 and (self.mode == "supervised-target" or self.source is None):
            raise ValueError(f"source_paste {self.source_paste} pastes the organelles of adapt.source onto the "
                             "pseudo-labelled target crops of mode uda or wda: give adapt.source, or set it to 0")
        if self.mode == "supervised-target" and self.target.labels is None:
            raise ValueError("mode supervised-target needs target.labels")
        return self


class SamAdaptConfig(Section):
    """SAM-based methods (`volseg sam-adapt`), ``method``:

    - ``sam-prompt``: prompt learning on a frozen SAM (head prompt, prefix tokens, adapters as
      ``model.options`` say; ``model.name: sam``), Dice loss on ``labelled`` crops.
    - ``all-in-sam``: weak labels of ``target`` (boxes read off ``sparse_labels``, or ``target.points``)
      → SAM pseudo-masks → adapter (+ mask decoder) tuning on ``max_slices`` annotated slices, for
      prompt-free inference (``model.name: sam`` with ``adapter_dim``).
    - ``dfg``: source-free: the Prompt-DAS of ``init`` (``model:`` is its spec) is adapted to ``target.raw``
      by the mean teacher on SAM pseudo-labels from feature-guided box prompts (``dfg_*`` fields).

    ``sam_checkpoint``: SAM's released weights (``.pth``, of ``model.options.variant``, or for dfg of
    ``sam_variant``); None builds a randomly initialised SAM, for tests only. ``checkpoint``: the output."""

    method: Literal["sam-prompt", "all-in-sam", "dfg"]
    sam_checkpoint: str | None = None
    sam_variant: Literal["b", "l", "h", "tiny"] = "b"
    labelled: LabelledVolume | None = None
    target: TargetConfig | None = None
    sparse_labels: VolumeRef | None = None
    prompt: Literal["boxes", "points"] = "boxes"
    supervise: Literal["annotated", "all"] = "annotated"
    margin_vx: int = Field(default=8, ge=0)
    max_slices: int = Field(default=32, ge=1)
    init: str | None = None
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=2, ge=1)
    crop: PositiveTriple = (1, 128, 128)
    learning_rate: float = Field(default=1e-3, gt=0)
    seed: int = 0
    dfg_slices: int = Field(default=16, ge=1)
    dfg_seed_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    dfg_feature_threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    dfg_stable_iou: float = Field(default=0.9, gt=0.0, le=1.0)
    dfg_step_vx: int = Field(default=4, ge=1)
    dfg_max_steps: int = Field(default=16, ge=1)
    min_size_vx: int = Field(default=16, ge=0)
    threads: int | None = Field(default=None, ge=1)
    checkpoint: str = Field(min_length=1)

    @model_validator(mode="after")
    def _inputs(self) -> SamAdaptConfig:
        if self.method == "sam-prompt" and self.labelled is None:
            raise ValueError("method sam-prompt needs labelled: {raw, labels} (crops to learn the prompts on)")
        if self.method == "all-in-sam" and (self.target is None or (self.sparse_labels is None
                                                                    and self.target.points is None)):
            raise ValueError("method all-in-sam needs target.raw and weak labels: sparse_labels or target.points")
        if self.method == "all-in-sam" and self.prompt == "boxes" and self.sparse_labels is None:
            raise ValueError("prompt boxes needs sparse_labels (boxes are read off them); or set prompt: points")
        if self.method == "dfg" and (self.target is None or self.init is None):
            raise ValueError("method dfg needs target.raw and init (the source-trained Prompt-DAS checkpoint)")
        return self


class SyntheticConfig(Section):
    """A self-generated EM-like volume (see volseg.data.synthetic), written as a zarr group at ``url``
    with arrays ``raw`` (uint8) and ``mito`` (uint8, 1 = mitochondrion)."""

    url: str = Field(min_length=1)
    shape: PositiveTriple = (24, 384, 384)
    domain: str = "tem"
    seed: int = 0


class Config(Section):
    """A whole volseg configuration; each command checks the sections it needs."""

    input: VolumeRef | None = None
    roi: RoiConfig | None = None
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    output: OutputConfig | None = None
    prompts: PromptsConfig | None = None
    instances: InstancesConfig | None = None
    execution: ExecutionConfig = ExecutionConfig()
    cluster: ClusterConfig = ClusterConfig()
    train: TrainConfig | None = None
    adapt: AdaptConfig | None = None
    sam_adapt: SamAdaptConfig | None = None
    eval: EvalConfig | None = None
    synthetic: list[SyntheticConfig] | None = None
    source_path: str | None = Field(default=None, exclude=True)

    def require(self, *sections: str, command: str) -> None:
        """Raise :class:`ConfigError` unless every named section is present."""
        for name in sections:
            if getattr(self, name) is None:
                raise ConfigError(
                    f"{self.source_path or 'the config'}: `volseg {command}` needs a `{name}:` section, "
                    "and there is none.",
                    f"add a `{name}:` section (see the config reference in README.md).",
                )

    def written_paths(self) -> list[tuple[str, str]]:
        """``(field, path or URL)`` of everything a command of this config may write: outputs,
        checkpoints, the eval report, synthetic volumes."""
        found: list[tuple[str, str | None]] = []
        if self.output is not None:
            found += [("output.probabilities", self.output.probabilities), ("output.density", self.output.density)]
        if self.instances is not None:
            found.append(("instances.url", self.instances.url))
        for name in ("train", "adapt", "sam_adapt"):
            section = getattr(self, name)
            if section is not None:
                found.append((f"{name}.checkpoint", section.checkpoint))
        if self.eval is not None:
            found.append(("eval.report", self.eval.report))
        found += [(f"synthetic[{i}].url", s.url) for i, s in enumerate(self.synthetic or [])]
        return [(field, url) for field, url in found if url]

    def output_fingerprint(self) -> str:
        """A hash of every field that changes what a run writes (not where, nor how it is scheduled)."""
        relevant = {
            "input": self.input.model_dump() if self.input else None,
            "roi": self.roi.model_dump() if self.roi else None,
            "model": self.model.model_dump(exclude={"checkpoint"}),
            "inference": self._inference_fields(),
            "output": self._output_fields(),
            "prompts": self._prompt_fields(),
            "instances": self.instances.model_dump(exclude={"url", "meshes"}) if self.instances else None,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=list).encode()).hexdigest()

    def _inference_fields(self) -> dict[str, Any]:
        """The inference fields that change what a run writes; ``tta`` and ``planes`` only when set, so
        runs without them keep their signature. (``calibrate_norms``: the statistics' digest is in the
        run signature.)"""
        fields = self.inference.model_dump(exclude={"device", "batch_size", "calibrate_norms"})
        for name, default in (("tta", 1), ("planes", "xy")):
            if fields[name] == default:
                del fields[name]
        return fields

    def _prompt_fields(self) -> dict[str, Any] | None:
        """The prompt fields that change what a run writes (the points by their coordinates, in the run
        signature); ``confirm_nm`` only when set, so runs without it keep their signature."""
        if self.prompts is None:
            return None
        fields = self.prompts.model_dump(exclude={"points", "layer"})
        if not fields["confirm_nm"]:
            del fields["confirm_nm"]
        return fields

    def _output_fields(self) -> dict[str, Any] | None:
        """The output fields that change its bytes; ``min_area_nm2`` only when set, so runs without it
        keep the signature they had before it existed."""
        if self.output is None:
            return None
        fields: dict[str, Any] = {"dtype": self.output.dtype}
        if self.output.min_area_nm2:
            fields["min_area_nm2"] = self.output.min_area_nm2
        return fields


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "is not a known field (check its spelling against the config reference in README.md)"
        elif item["type"] == "missing":
            message = "is required but missing"
        elif item["type"] == "literal_error":
            message = f"must be {item['ctx']['expected']}, got {item.get('input')!r}"
        else:
            message = f"{message} (got {item.get('input')!r})"
        lines.append(f"{field} {message}")
    return f"{source}: " + "; ".join(lines) + "."


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a parsed YAML mapping into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (input:, model:, ...), "
            f"got {type(data).__name__}.",
            "start from configs/demo.yaml.",
        )
    try:
        return Config.model_validate({**data, "source_path": source})
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source),
                          "correct the field(s) named above.") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read and validate a YAML config file, with ``overrides`` (``section.field=value``, the value read
    as YAML) applied before validation, so an override is checked exactly as the file's own value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.",
                          "give the path of a YAML config, e.g. configs/demo.yaml.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}.",
                          "fix the YAML syntax there (indentation, colons, quotes).") from None
    for override in overrides:
        data = apply_override(data, override)
    return parse_config(data, str(path))


def apply_override(data: Any, override: str) -> dict:
    """``data`` (a config's YAML mapping) with one ``a.b.c=value`` override set; missing sections are
    created. The value is YAML (``3``, ``0.5``, ``[1, 256, 256]``, ``null``, ``{url: x.zarr}``)."""
    key, sep, text = override.partition("=")
    names = key.strip().split(".")
    if not sep or not all(names):
        raise ConfigError(f"--set {override!r} is not of the form section.field=value.",
                          "write e.g. --set adapt.steps=100 or --set inference.window=[1,256,256].")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {override!r}: the value {text!r} is not valid YAML.",
                          "quote it for the shell, e.g. --set 'input.url=\"a b.zarr\"'.") from None
    data = {} if data is None else copy.deepcopy(data)
    if not isinstance(data, dict):
        return data  # parse_config names what is wrong with the file itself
    node = data
    for depth, name in enumerate(names[:-1]):
        child = node.setdefault(name, {})
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(names[:depth + 1])} is not a section "
                              f"(it is {child!r}).", "set the whole value instead, e.g. "
                              f"--set {'.'.join(names[:depth + 1])}=<value>.")
        node = child
    node[names[-1]] = value
    return data
