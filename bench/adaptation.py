"""Prompt-DAS on real EM, VNC (serial-section TEM, labelled source) → Lucchi (FIB-SEM target), against a
plain MONAI U-Net given the same crops, augmentation and CPU seconds, scored on held-out slices only.

    uv run --group bench python bench/adaptation.py --seed 0        # one seed → bench/results/adaptation/seed0.json
    uv run --group bench python bench/adaptation.py --seed 1 --rows source,oracle,peer_source,peer_oracle
    uv run --group bench python bench/adaptation.py --merge          # the table: mean ± std over the seeds run

``--merge`` prints each row's mean ± std over the seeds that ran it, volseg ÷ peer over the seeds both rows ran,
and issue 13's targets for each model family (CNN to stride 8, to stride 32, U-Net) over the seeds their rows share.

Data: ``../shared/data`` (or ``$VOLSEG_DATA``). Lucchi is split at z = 100: adaptation, the WDA points and
the oracle's labels come from slices z < 100 only; every row is scored on all slices z ≥ 100, blockwise
over the global window grid, and test-time points are the points file's points with z ≥ 100. Rows:

  source            volseg, trained on VNC with its labels (source-only)
  uda               + mean-teacher adaptation to Lucchi z < 100, no target labels
  uda_persistent    UDA whose pseudo-foreground components must persist ±25 nm in z (60% of their pixels
                    foreground for the teacher in the slices 25 nm below and above; ``adapt.persistence_nm``)
  uda_paste         uda_persistent with every source crop's labelled organelles pasted onto a pseudo-labelled
                    target crop (``adapt.source_paste`` 1)
  wda               + the 15% points of Lucchi z < 100
  wda_points        the WDA model with the z ≥ 100 points as prompts at test time
  wda_confirmed     WDA whose pseudo-foreground components must hold a sparse point of a slice within ±100 nm
                    (``adapt.confirm_points_nm``); the others become background
  wda_confirmed_points  that model run with the z ≥ 100 points as prompts and ``prompts.confirm_nm`` 100: its
                    2D components that hold no point of a slice within ±100 nm are removed
  oracle            volseg trained on the labels of Lucchi z < 100
  peer_source       MONAI BasicUNet on VNC, per-volume standardisation, the CPU seconds of ``source``
  peer_oracle       the same on Lucchi z < 100, the CPU seconds of ``oracle``
  oracle_paper      ``oracle`` with the paper's head (stride 2, interpolated) instead of the fine head
  source_stride32   ``source`` with the CNN encoder run on to stride 32, its later stages added to the stride-8
                    features (``model.options.encoder_stride`` 32)
  oracle_stride32   ``oracle`` with that encoder
  uda_persistent_stride32, wda_confirmed_stride32, wda_confirmed_points_stride32
                    those rows adapted from ``source_stride32``
  source_unet       ``source`` with the U-Net encoder and head (``model.options.encoder: unet``: MONAI BasicUNet's
                    encoder levels, InstanceNorm, decoded as a U-Net decodes, around Prompt-DAS's prompt decoder)
  oracle_unet       ``oracle`` with that model
  uda_persistent_unet, wda_confirmed_unet, wda_confirmed_points_unet
                    those rows adapted from ``source_unet``
  wda_confirmed_persistent_unet, wda_confirmed_persistent_points_unet
                    ``wda_confirmed_unet`` with the pseudo-labels' z-persistence of ``uda_persistent`` too (the
                    UDA recipe plus the points), and that model with the test points
  uda_persistent_short_unet, wda_confirmed_short_unet, wda_confirmed_points_short_unet
                    ``uda_persistent_unet`` and ``wda_confirmed_unet`` adapted on the short schedule (a third of
                    the steps at twice the learning rate, the teacher's EMA decay 0.98: 100 steps, the recipe's
                    8 minutes on 2 cores); ``uda_persistent_cut_unet``: a third of the steps, nothing else changed
  peer_source_unet  ``peer_source`` on the CPU seconds of ``source_unet`` (measured in the same run)
  peer_oracle_unet  ``peer_oracle`` on the CPU seconds of ``oracle_unet``
  source_raw        ``source`` without robust intensity normalisation (grey values / 255)
  source_zoom       ``source`` with the zoom augmentation ``train.zoom`` 1.5 (magnified 1/1.5 … 1.5×)
  source_uncalibrated  ``source`` scored without BatchNorm statistics calibrated on the test volume
  uda_pushed        UDA with settings that collapse it (``PUSHED``), the adaptation guard off
  uda_pushed_guarded  the same with the guard on: where it stopped, and the Dice of the teacher it kept

Every volseg row is run as the recipe's ``volseg run`` does (configs/vnc-lucchi/run.yaml): the model's
BatchNorm statistics re-estimated on the test volume (``inference.calibrate_norms``; the peer, likewise,
standardises by the test volume's statistics). Each row reports Dice, IoU, the 2D objects it predicts on the
scored slices (8-connected components) against the true number, and its training wall and CPU seconds. Every
row's prediction is post-processed as the recipe's ``volseg run`` does (``output.min_area_nm2``: 2D specks
under ``min_area_nm2`` removed: 20,000 nm², about the 10th percentile of the 2D cross-sections of VNC's labelled
mitochondria); the JSON also keeps the object count before that (``raw_objects``). ``--min-area`` scores with
another area (results in ``seedN_ma<area>.json``; the tables up to 2026-12-01 used 5000). A row of
a seed is computed once and kept in that seed's JSON; ``--force`` recomputes. The source model of a seed is
kept beside it for uda / wda.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch

from volseg.allocator import keep_freed_memory
from volseg.evaluation.metrics import Confusion
from volseg.geometry import Box, PointSet, slices_apart, slices_within
from volseg.inference.blockwise import predict_box
from volseg.inference.planes import PLANE_SETS
from volseg.inference.postprocess import (
    confirm_extent_pixels,
    min_area_pixels,
    points_within_reach,
    small_components,
    unconfirmed_components,
)
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.intensity import measure_intensity
from volseg.io import open_volume
from volseg.io.points import read_points
from volseg.models import ModelSpec, build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, save_checkpoint
from volseg.training.augment import WIDE, AugmentSettings, GeometricTransform, strong_intensity
from volseg.training.crops import CropSampler
from volseg.training.losses import segmentation_loss
from volseg.training.promptdas.guard import GuardSettings
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, train_promptdas
from volseg.training.replicas import SampleRandom

#: Lucchi slices below this are the target's training data; from it on, the held-out test slices.
HOLD_OUT_Z = 100

SCALES = {
    # The CNN encoder learns in minutes on a CPU where a ViT from scratch does not.
    # The table's rows were measured with the published encoder_stride 8; the cnn encoder's default since
    # 2026-12-02 is 32 (the *_stride32 rows, and configs/vnc-lucchi/).
    "cpu": {"model": {"encoder": "cnn", "decoder_dim": 128, "decoder_heads": 4, "decoder_mlp": 512,
                      "projection_dim": 64, "encoder_stride": 8},
            "crop": 256, "window": 256, "stride": 192, "source_steps": 300, "oracle_steps": 600,
            "adapt_steps": 300, "batch": 4, "source_lr": 1e-3, "adapt_lr": 5e-4, "foreground_share": 0.3,
            "min_area_nm2": 20000.0, "calibrate_norms": True},
    "paper": {"model": {"encoder": "vit_s8"}, "crop": 384, "window": 384, "stride": 128,
              "source_steps": 4000, "oracle_steps": 4000, "adapt_steps": 4000, "batch": 8,
              "source_lr": 2e-4, "adapt_lr": 1e-4, "foreground_share": 0.5, "min_area_nm2": 20000.0,
              "calibrate_norms": False},
    # only to check that every row runs (with --slices 2): no number of it means anything
    "smoke": {"model": {"encoder": "cnn", "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 32,
                        "projection_dim": 8},
              "crop": 64, "window": 128, "stride": 96, "source_steps": 3, "oracle_steps": 3, "adapt_steps": 2,
              "batch": 2, "source_lr": 1e-3, "adapt_lr": 5e-4, "foreground_share": 0.3, "min_area_nm2": 5000.0,
              "calibrate_norms": True},
}
ROWS = ("source", "uda", "uda_persistent", "uda_paste", "wda", "wda_points", "wda_confirmed", "wda_confirmed_points",
        "oracle", "peer_source", "peer_oracle", "oracle_paper", "source_stride32", "uda_persistent_stride32",
        "wda_confirmed_stride32", "wda_confirmed_points_stride32", "oracle_stride32", "source_unet", "oracle_unet",
        "uda_persistent_unet", "wda_confirmed_unet", "wda_confirmed_points_unet", "wda_confirmed_persistent_unet",
        "wda_confirmed_persistent_points_unet", "uda_persistent_cut_unet", "uda_persistent_short_unet",
        "wda_confirmed_short_unet", "wda_confirmed_points_short_unet", "peer_source_unet",
        "peer_oracle_unet", "source_raw",
        "source_uncalibrated", "source_zoom", "uda_pushed", "uda_pushed_guarded")
TITLES = {
    "source": "source-only", "uda": "UDA", "uda_persistent": "UDA + z-persistent pseudo-labels",
    "uda_paste": "UDA + z-persistent + pasted source organelles",
    "wda": "WDA (15% points, z < 100)",
    "wda_points": "WDA + test-time points (z ≥ 100)",
    "wda_confirmed": "WDA + point-confirmed pseudo-labels",
    "wda_confirmed_points": "WDA-confirmed + test points, confirm",
    "oracle": "supervised-target (oracle)",
    "peer_source": "peer: MONAI BasicUNet, source-only", "peer_oracle": "peer: MONAI BasicUNet, oracle",
    "oracle_paper": "oracle, paper's head",
    "source_stride32": "source-only, CNN encoder to stride 32", "oracle_stride32": "oracle, CNN encoder to stride 32",
    "uda_persistent_stride32": "UDA + z-persistent, stride 32",
    "wda_confirmed_stride32": "WDA + point-confirmed, stride 32",
    "wda_confirmed_points_stride32": "WDA-confirmed + test points, stride 32",
    "source_unet": "source-only, U-Net encoder and head", "oracle_unet": "oracle, U-Net encoder and head",
    "uda_persistent_unet": "UDA + z-persistent, U-Net encoder and head",
    "wda_confirmed_unet": "WDA + point-confirmed, U-Net encoder and head",
    "wda_confirmed_points_unet": "WDA-confirmed + test points, U-Net encoder and head",
    "wda_confirmed_persistent_unet": "WDA + point-confirmed + z-persistent, U-Net",
    "wda_confirmed_persistent_points_unet": "WDA-confirmed-persistent + test points, U-Net",
    "uda_persistent_cut_unet": "UDA + z-persistent, U-Net, 100 steps",
    "uda_persistent_short_unet": "UDA + z-persistent, U-Net, short schedule",
    "wda_confirmed_short_unet": "WDA + point-confirmed, U-Net, short schedule",
    "wda_confirmed_points_short_unet": "WDA-confirmed + test points, U-Net, short schedule",
    "peer_source_unet": "peer: source-only, at source_unet's CPU s",
    "peer_oracle_unet": "peer: oracle, at oracle_unet's CPU s",
    "source_raw": "source-only, grey values / 255",
    "source_uncalibrated": "source-only, norms not calibrated",
    "source_zoom": "source-only, zoom 1.5 augmentation",
    "uda_pushed": "UDA pushed to collapse, guard off", "uda_pushed_guarded": "UDA pushed to collapse, guard on",
}
#: The ``wda_confirmed`` row's ``adapt.confirm_points_nm`` and the ``wda_confirmed_points`` row's
#: ``prompts.confirm_nm``: points of slices within ±100 nm confirm a component.
CONFIRM_NM = 100.0
#: The ``uda_persistent`` row's ``adapt.persistence_nm`` and ``adapt.persistence_share``.
PERSISTENCE_NM, PERSISTENCE_SHARE = 25.0, 0.6
#: The ``uda_paste`` row's ``adapt.source_paste``: every pseudo-labelled crop gets a source crop's organelles.
SOURCE_PASTE = 1.0
#: The short adaptation schedule (the ``*_short`` rows, :func:`_short`): a third of the scale's steps, twice its
#: learning rate, and a teacher that averages over about 50 steps instead of 100 (it would otherwise lag the
#: short run by half of it).
SHORT_STEPS, SHORT_LR, SHORT_EMA = 1 / 3, 2.0, 0.98
#: Settings added after the cached models of the tables were keyed (:meth:`Bench.recipe_key`).
KEYLESS_AT_DEFAULT = ("persistence_slices", "persistence_share", "source_paste")
#: The ``source_zoom`` row's ``train.zoom``.
ZOOM = 1.5
#: UDA settings that drive self-training to background: pseudo-foreground needs p ≥ 0.999 and weighs 1%.
PUSHED = {"delta_f": 0.999, "pseudo_foreground_share": 0.01}


@dataclass
class Row:
    """A row of the older benches' tables (bench/sam_methods.py): name, foreground confusion, seconds."""

    name: str
    score: Confusion
    train_seconds: float


def data_dir() -> Path:
    return Path(os.environ.get("VOLSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class SubVolume:
    """The slices ``z0 ≤ z < z1`` of a volume, indexed from 0 (a training domain that never sees the rest)."""

    def __init__(self, volume: Any, z0: int, z1: int) -> None:
        self.volume, self.z0 = volume, z0
        self.shape = (z1 - z0, *tuple(volume.shape)[1:])

    def read(self, box: Box) -> np.ndarray:
        return self.volume.read(Box((box.start[0] + self.z0, *box.start[1:]), (box.stop[0] + self.z0, *box.stop[1:])))


# --- scoring --------------------------------------------------------------------------------------------


@dataclass
class Score:
    """Foreground confusion and 2D object counts over the scored slices, after the run's post-processing
    (2D components under ``min_px`` pixels removed, as ``output.min_area_nm2`` does); ``raw_objects``:
    the count before it."""

    min_px: int = 0
    confusion: Confusion = field(default_factory=Confusion)
    objects: int = 0
    raw_objects: int = 0
    true_objects: int = 0

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        self.raw_objects += _components(predicted)
        if self.min_px > 1:  # one whole slice: every component is seen whole (no open side)
            predicted = predicted & ~small_components(predicted, (slice(None),) * 3, [], self.min_px)[0]
        self.confusion = self.confusion + Confusion.of(predicted, truth)
        self.objects += _components(predicted)
        self.true_objects += _components(truth)


def _components(mask: np.ndarray) -> int:
    return int(cc3d.connected_components(np.ascontiguousarray(mask[0]).astype(np.uint8), connectivity=8).max())


def score_predictor(predictor: Any, raw: Any, labels: Any, slices: Sequence[int], points: PointSet | None = None,
                    roi: int = 0, min_area_nm2: float = 0.0, planes: str = "xy", confirm_nm: float = 0.0) -> Score:
    """Blended predictions of each slice (or its top-left ``roi``², 0: whole) over the global window grid,
    with 2D components under ``min_area_nm2`` removed as a run's ``output.min_area_nm2`` does, and with
    ``confirm_nm`` those that no point of ``points`` confirms, as ``prompts.confirm_nm`` does. ``planes``
    ``ortho``: the run's ``inference.planes: ortho``, predicted over the slab of the scored slices at once
    (its xz and yz windows span every slice of it)."""
    windows = WindowGrid(raw.shape, predictor.window, _stride(predictor))
    stop_yx = tuple(min(roi, s) if roi else s for s in raw.shape[1:])
    result = Score(min_area_pixels(min_area_nm2, raw.voxel_size_nm))
    slab = None
    if planes != "xy":
        box = Box((min(slices), 0, 0), (max(slices) + 1, *stop_yx))
        slab = predict_box(raw, predictor, windows, box, points=points, planes=PLANE_SETS[planes])[0]
    for z in slices:
        plane = Box((z, 0, 0), (z + 1, *stop_yx))
        if slab is None:
            probability = predict_box(raw, predictor, windows, plane, points=points)[0]
        else:
            probability = slab[z - min(slices)][None]
        foreground = probability > 0.5
        if confirm_nm and points is not None:
            reach = slices_within(confirm_nm, raw.voxel_size_nm[0])
            near = points_within_reach(points, plane, reach, raw.bounds)
            foreground &= ~unconfirmed_components(foreground, (slice(None),) * 3, [], near, reach,
                                                  confirm_extent_pixels(raw.voxel_size_nm))[0]
        result.add(foreground, labels.read(plane) > 0)
    return result


def _stride(predictor: Any) -> tuple[int, int, int]:
    return getattr(predictor, "stride", (1, predictor.window[1] * 3 // 4, predictor.window[2] * 3 // 4))


def volseg_predictor(model: torch.nn.Module, raw: Any, window: int, stride: int, model_name: str = "promptdas",
                     spec: ModelSpec | None = None, batch_size: int = 8, calibrate_norms: bool = False
                     ) -> TorchPredictor:
    """A predictor of ``model`` normalising ``raw`` as a run would (its own grey-value range, if the
    model's contract says so; with ``calibrate_norms``, BatchNorm statistics of ``raw``, on a copy of
    the model)."""
    contract = input_contract(spec or ModelSpec(model_name))
    intensity = None if contract.percentiles is None else measure_intensity(raw, contract.percentiles).bounds
    predictor = TorchPredictor(model.eval(), contract, (1, window, window), 1, device=next(model.parameters()).device,
                               batch_size=batch_size, intensity=intensity)
    predictor.stride = (1, stride, stride)
    if calibrate_norms:
        predictor.model = copy.deepcopy(predictor.model)
        predictor.calibrate_norms(raw)
    return predictor


def score(model: torch.nn.Module, raw, labels, slices: list[int], window: int, stride: int,
          points: PointSet | None = None, roi: int = 0, model_name: str = "promptdas",
          batch_size: int = 8) -> Confusion:
    """Foreground confusion over the chosen slices (bench/sam_methods.py's scoring)."""
    predictor = volseg_predictor(model, raw, window, stride, model_name, batch_size=batch_size)
    return score_predictor(predictor, raw, labels, slices, points, roi).confusion


def print_table(rows: list[Row], first_column: str) -> None:
    """The rows as a Markdown table: name, Dice, IoU, training seconds (bench/sam_methods.py)."""
    print(f"| {first_column:<44} | {'Dice':>6} | {'IoU':>6} | {'train s':>8} |")
    print(f"|{'-' * 46}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
    for row in rows:
        print(f"| {row.name:<44} | {row.score.dice:6.3f} | {row.score.iou:6.3f} | {row.train_seconds:8.0f} |")


# --- the peer: MONAI BasicUNet ----------------------------------------------------------------------------


class PeerPredictor:
    """A :class:`volseg.inference.predictor.Predictor` around a 2D U-Net on per-volume standardised input."""

    def __init__(self, net: torch.nn.Module, mean: float, std: float, window: int, stride: int) -> None:
        self.net, self.mean, self.std = net.eval(), mean, std
        self.window, self.stride, self.num_classes = (1, window, window), (1, stride, stride), 1

    def predict(self, windows: np.ndarray, prompts: Sequence[np.ndarray] | None = None) -> np.ndarray:
        x = (torch.from_numpy(windows.astype(np.float32)) / 255 - self.mean) / self.std
        with torch.no_grad():
            logits = torch.cat([self.net(part) for part in x.reshape(-1, 1, *x.shape[-2:]).split(8)])
        out = np.zeros((len(windows), 2, *windows.shape[1:]), np.float32)
        out[:, 0] = torch.sigmoid(logits).reshape(len(windows), *windows.shape[1:]).numpy()
        return out


def standardisation(volume: Any) -> tuple[float, float]:
    """Mean and standard deviation of a volume's grey values / 255 (over the same lattice sample as volseg)."""
    from volseg.intensity import sample_boxes

    values = np.concatenate([volume.read(b).ravel() for b in sample_boxes(volume.shape)]) / 255.0
    return float(values.mean()), float(values.std())


def train_peer(domain: DomainData, crop: int, batch: int, cpu_seconds: float, seed: int, augment: AugmentSettings,
               learning_rate: float = 1e-3) -> tuple[torch.nn.Module, tuple[float, float], float]:
    """A MONAI BasicUNet trained on ``domain``'s labelled crops (the crops and augmentation volseg's
    source training draws) for ``cpu_seconds`` of process CPU time, poly LR decay over that budget."""
    net = _peer_net(seed)
    mean, std = standardisation(domain.raw)
    sampler = CropSampler(domain.raw, domain.labels, (1, crop, crop), seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    begin, wall, step = time.process_time(), time.perf_counter(), 0
    net.train()
    while (used := time.process_time() - begin) < cpu_seconds:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (1 - used / cpu_seconds) ** 0.9
        raw, labels = sampler.batch(batch)
        image = torch.from_numpy(raw.reshape(-1, 1, crop, crop).astype(np.float32) / 255)
        mask = torch.from_numpy((labels.reshape(-1, 1, crop, crop) > 0).astype(np.float32))
        image, mask = _augmented(image, mask, seed, step, augment)
        loss = segmentation_loss(net((image - mean) / std), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    return net.eval(), (mean, std), time.perf_counter() - wall


def _peer_net(seed: int) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)


def _weights_key(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _augmented(image: torch.Tensor, mask: torch.Tensor, seed: int, step: int, augment: AugmentSettings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """volseg's strong view of labelled crops: elastic warp, rot90, flip, then intensity changes."""
    images, masks = [], []
    for i in range(len(image)):
        random = SampleRandom.from_seed(np.random.SeedSequence(seed, spawn_key=(7, step, i)))
        transform = GeometricTransform.random(random.generator, tuple(image.shape[-2:]), augment.elastic_alpha_vx,
                                              augment.elastic_grid, augment.zoom)
        padding = augment.labelled_padding
        images.append(strong_intensity(random.generator, transform.apply(image[i], "bilinear", padding)[None],
                                       augment)[0])
        masks.append(transform.apply(mask[i], "nearest", padding))
    return torch.stack(images), torch.stack(masks)


# --- one seed ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every row of one seed shares: data, recipe, device, and where results go."""

    seed: int
    scale: dict[str, Any]
    out: Path
    device: torch.device
    slices: int = 0  # score only this many held-out slices (0: all; smoke tests only)
    planes: str = "xy"  # the runs' inference.planes; ortho rows go to seedN_ortho.json
    min_area_nm2: float | None = None  # output.min_area_nm2 (None: the scale's); another goes to seedN_ma<it>.json
    source: DomainData = field(init=False)
    target_raw: Any = field(init=False)
    target_labels: Any = field(init=False)

    def __post_init__(self) -> None:
        root = data_dir()
        self.source = DomainData(open_volume(str(root / "vnc.zarr/raw")), open_volume(str(root / "vnc.zarr/mito")))
        self.target_raw = open_volume(str(root / "lucchi_train.zarr/raw"))
        self.target_labels = open_volume(str(root / "lucchi_train.zarr/mito"))
        points = read_points(root / "lucchi_train_points_15pct.csv", self.target_raw.voxel_size_nm,
                             self.target_raw.voxel_offset, self.target_raw.bounds)
        z = points.zyx[:, 0]
        self.train_points = PointSet(points.zyx[z < HOLD_OUT_Z - 0.5])
        self.test_points = PointSet(points.zyx[z >= HOLD_OUT_Z - 0.5])
        self.target_train = SubVolume(self.target_raw, 0, HOLD_OUT_Z)
        self.target_train_labels = SubVolume(self.target_labels, 0, HOLD_OUT_Z)
        self.test_slices = list(range(HOLD_OUT_Z, self.target_raw.shape[0]))[: self.slices or None]
        suffix = results_suffix(self.planes, self.min_area_nm2, self.scale["min_area_nm2"])
        if self.min_area_nm2 is not None:
            self.scale = {**self.scale, "min_area_nm2": self.min_area_nm2}
        self.path = self.out / f"seed{self.seed}{suffix}.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    # -- recipe
    def spec(self, **options: Any) -> ModelSpec:
        return ModelSpec("promptdas", options={**self.scale["model"], **options})

    def settings(self, mode: str, **extra: Any) -> AdaptSettings:
        s = self.scale
        sigma_target = 40.0 / self.target_raw.voxel_size_nm[2]
        common = {"batch_size": s["batch"], "crop": (1, s["crop"], s["crop"]), "seed": self.seed,
                  "density_sigma": sigma_target, "source_density_sigma": 40.0 / self.source.raw.voxel_size_nm[2]}
        if mode in ("source", "supervised-target"):
            steps = s["source_steps"] if mode == "source" else s["oracle_steps"]
            return AdaptSettings(mode=mode, **{"steps": steps, "learning_rate": s["source_lr"], **common, **extra})
        return AdaptSettings(mode=mode, **{"steps": s["adapt_steps"], "learning_rate": s["adapt_lr"],
                                           "pseudo_foreground_share": s["foreground_share"], **common, **extra})

    def recipe_key(self, spec: ModelSpec, settings: AdaptSettings) -> str:
        """The spec and every setting; a setting added after the tables' models were trained is left out
        while it has its default (:data:`KEYLESS_AT_DEFAULT`), so those models keep their keys."""
        text = repr(settings)
        for name in KEYLESS_AT_DEFAULT:
            text = text.replace(f"{name}={AdaptSettings.__dataclass_fields__[name].default!r}, ", "")
        text = json.dumps([spec.to_json(), text], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    # -- training
    def fresh(self, spec: ModelSpec) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return build_model(spec).to(self.device)

    def trained(self, spec: ModelSpec, settings: AdaptSettings, source: DomainData | None,
                target: DomainData | None, init: torch.nn.Module | None = None) -> tuple[torch.nn.Module, float, float]:
        """A model of this recipe: trained once, then read back from its checkpoint beside the results
        (keyed by the spec, the settings and, for adaptation, the source model it starts from), so rows
        scored another way (``--planes``) reuse it. Its training wall and CPU seconds come with it."""
        key = self.recipe_key(spec, settings)
        if init is not None:
            key = hashlib.sha256((key + _weights_key(init)).encode()).hexdigest()[:10]
        path = self.out / f"seed{self.seed}_{settings.mode}_{key}.safetensors"
        if path.exists():
            card = json.loads(path.with_suffix(".json").read_text())
            return load_checkpoint(path, spec).to(self.device).eval(), card["train_s"], card["cpu_s"]
        model = self.fresh(spec)
        if init is not None:
            model.load_state_dict(init.state_dict())
        wall, cpu = time.perf_counter(), time.process_time()
        result = train_promptdas(model, settings, source, target)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, result.model, spec, {"train_s": wall, "cpu_s": cpu})
        return result.model, wall, cpu

    def source_model(self, **options: Any) -> tuple[torch.nn.Module, float, float]:
        """The seed's source model (trained once, then read back from its checkpoint); ``options``: model
        options other than the scale's."""
        return self.trained(self.spec(**options), self.settings("source"), self.source, None)

    # -- rows
    def record(self, name: str, result: Score, wall: float, cpu: float, **extra: Any) -> None:
        """Add row ``name`` to the seed's JSON. Another run of the same seed (other rows) may have written
        it since this one read it: the file is read again and written back whole under a lock, so each
        run's rows stay in it."""
        c = result.confusion
        entry = {"dice": c.dice, "iou": c.iou, "objects": result.objects, "raw_objects": result.raw_objects,
                 "true_objects": result.true_objects, "train_s": wall, "cpu_s": cpu, **extra}
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            written = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.results = {**written, name: entry}
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(self.results, indent=1) + "\n")
            partial.replace(self.path)
        print(f"seed {self.seed} {name}: Dice {c.dice:.3f} IoU {c.iou:.3f}, objects {result.objects} "
              f"(true {result.true_objects}), train {wall:.0f} s / {cpu:.0f} CPU s", flush=True)

    def score_model(self, model: torch.nn.Module, spec: ModelSpec, points: PointSet | None = None,
                    calibrate: bool | None = None, confirm_nm: float = 0.0) -> Score:
        s = self.scale
        calibrate = s["calibrate_norms"] if calibrate is None else calibrate
        predictor = volseg_predictor(model, self.target_raw, s["window"], s["stride"], spec=spec,
                                     calibrate_norms=calibrate)
        return score_predictor(predictor, self.target_raw, self.target_labels, self.test_slices, points,
                               min_area_nm2=s["min_area_nm2"], planes=self.planes, confirm_nm=confirm_nm)

    def row(self, name: str) -> None:
        ROW_RUNNERS[name](self)

    def needs(self, name: str) -> dict[str, Any]:
        if name not in self.results:
            self.row(name)
        return self.results[name]


def _adapted(bench: Bench, mode: str, options: dict[str, Any] | None = None, **extra: Any
             ) -> tuple[torch.nn.Module, float, float]:
    """A model adapted from the seed's source model (both with the model ``options`` other than the scale's)."""
    options = options or {}
    source, source_wall, source_cpu = bench.source_model(**options)
    target = DomainData(bench.target_train, points=bench.train_points if mode == "wda" else None)
    model, wall, cpu = bench.trained(bench.spec(**options), bench.settings(mode, **extra), bench.source, target,
                                     init=source)
    return model, source_wall + wall, source_cpu + cpu


def _short(bench: Bench) -> dict[str, Any]:
    """The short schedule's adaptation settings (:data:`SHORT_STEPS`)."""
    return {"steps": max(1, round(bench.scale["adapt_steps"] * SHORT_STEPS)),
            "learning_rate": bench.scale["adapt_lr"] * SHORT_LR, "ema_alpha": SHORT_EMA}


def _uda(bench: Bench) -> None:
    model, wall, cpu = _adapted(bench, "uda")
    bench.record("uda", bench.score_model(model, bench.spec()), wall, cpu)


def _persistence(bench: Bench) -> dict[str, Any]:
    """The adaptation settings of the pseudo-labels' z-persistence (``uda_persistent`` and the rows after it)."""
    return {"persistence_slices": slices_apart(PERSISTENCE_NM, bench.target_raw.voxel_size_nm[0]),
            "persistence_share": PERSISTENCE_SHARE}


def _uda_persistent(bench: Bench, name: str = "uda_persistent", options: dict[str, Any] | None = None,
                    **extra: Any) -> None:
    persistence = _persistence(bench)
    model, wall, cpu = _adapted(bench, "uda", options, **persistence, **extra)
    bench.record(name, bench.score_model(model, bench.spec(**(options or {}))), wall, cpu,
                 persistence_slices=persistence["persistence_slices"], **extra)


def _wda(bench: Bench) -> None:
    model, wall, cpu = _adapted(bench, "wda")
    bench.record("wda", bench.score_model(model, bench.spec()), wall, cpu)
    bench.record("wda_points", bench.score_model(model, bench.spec(), bench.test_points), wall, cpu,
                 test_points=len(bench.test_points))


def _wda_confirmed(bench: Bench, suffix: str = "", options: dict[str, Any] | None = None,
                   persistent: bool = False, schedule: dict[str, Any] | None = None) -> None:
    """WDA with point-confirmed pseudo-labels; ``wda_confirmed_points``: the same model run with the test
    slices' points as prompts and ``prompts.confirm_nm`` (components no point nearby confirms removed).
    ``options``: model options other than the scale's, ``suffix`` of both rows' names; ``persistent``:
    the pseudo-labels' z-persistence of ``uda_persistent`` too (rows ``wda_confirmed_persistent…``);
    ``schedule``: adaptation settings other than the scale's (steps, learning rate, EMA decay)."""
    reach = slices_within(CONFIRM_NM, bench.target_raw.voxel_size_nm[0])
    extra: dict[str, Any] = {"confirm_slices": reach, **(schedule or {})}
    if persistent:
        extra.update(_persistence(bench))
    model, wall, cpu = _adapted(bench, "wda", options, **extra)
    spec = bench.spec(**(options or {}))
    name = "wda_confirmed_persistent" if persistent else "wda_confirmed"
    bench.record(name + suffix, bench.score_model(model, spec), wall, cpu, **extra)
    bench.record(f"{name}_points{suffix}", bench.score_model(model, spec, bench.test_points, confirm_nm=CONFIRM_NM),
                 wall, cpu, **extra, test_points=len(bench.test_points), confirm_nm=CONFIRM_NM)


def _pushed(bench: Bench, guarded: bool) -> None:
    source, source_wall, source_cpu = bench.source_model()
    settings = dataclasses.replace(bench.settings("uda"), **PUSHED, guard=GuardSettings(enabled=guarded))
    model = bench.fresh(bench.spec())
    model.load_state_dict(source.state_dict())
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_promptdas(model, settings, bench.source, DomainData(bench.target_train))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    guard = result.history.guard or {}
    least = min((c["ratio"] for c in guard.get("checks", [])), default=None)
    bench.record("uda_pushed_guarded" if guarded else "uda_pushed", bench.score_model(result.model, bench.spec()),
                 source_wall + wall, source_cpu + cpu, steps=len(result.history.losses),
                 stopped_at=guard.get("stopped_at"), kept_step=guard.get("kept_step"), reason=guard.get("reason"),
                 least_foreground_ratio=least)


def _source(bench: Bench, name: str = "source", **options: Any) -> None:
    spec = bench.spec(**options)
    model, wall, cpu = bench.trained(spec, bench.settings("source"), bench.source, None)
    bench.record(name, bench.score_model(model, spec), wall, cpu)


def _oracle(bench: Bench, name: str = "oracle", **options: Any) -> None:
    spec = bench.spec(**options)
    target = DomainData(bench.target_train, bench.target_train_labels)
    model, wall, cpu = bench.trained(spec, bench.settings("supervised-target"), None, target)
    bench.record(name, bench.score_model(model, spec), wall, cpu)


def _source_zoom(bench: Bench) -> None:
    settings = bench.settings("source", source_augment=dataclasses.replace(WIDE, zoom=ZOOM))
    model, wall, cpu = bench.trained(bench.spec(), settings, bench.source, None)
    bench.record("source_zoom", bench.score_model(model, bench.spec()), wall, cpu, zoom=ZOOM)


def _source_uncalibrated(bench: Bench) -> None:
    model, wall, cpu = bench.source_model()
    bench.record("source_uncalibrated", bench.score_model(model, bench.spec(), calibrate=False), wall, cpu)


def _peer(bench: Bench, name: str, faces: str, domain: DomainData) -> None:
    budget = bench.needs(faces)["cpu_s"]  # the CPU seconds of the volseg row it faces
    path = bench.out / f"seed{bench.seed}_{name}_{round(budget)}.pt"
    if path.exists():
        saved = torch.load(path)
        net = _peer_net(bench.seed)
        net.load_state_dict(saved["state"])
        (mean, std), wall = saved["standardisation"], saved["train_s"]
    else:
        net, (mean, std), wall = train_peer(domain, bench.scale["crop"], bench.scale["batch"], budget, bench.seed,
                                            WIDE)
        torch.save({"state": net.state_dict(), "standardisation": (mean, std), "train_s": wall}, path)
    test_mean, test_std = standardisation(bench.target_raw)  # per-volume standardisation of the test volume
    predictor = PeerPredictor(net, test_mean, test_std, bench.scale["window"], bench.scale["stride"])
    result = score_predictor(predictor, bench.target_raw, bench.target_labels, bench.test_slices,
                             min_area_nm2=bench.scale["min_area_nm2"], planes=bench.planes)
    bench.record(name, result, wall, budget, train_standardisation=[mean, std])


#: Rows one runner records together (one trained model, scored two ways).
PAIRED_ROWS = (("wda", "wda_points"), ("wda_confirmed", "wda_confirmed_points"),
               ("wda_confirmed_stride32", "wda_confirmed_points_stride32"),
               ("wda_confirmed_unet", "wda_confirmed_points_unet"),
               ("wda_confirmed_persistent_unet", "wda_confirmed_persistent_points_unet"),
               ("wda_confirmed_short_unet", "wda_confirmed_points_short_unet"))
#: The model options of the ``*_stride32`` rows.
STRIDE32 = {"encoder_stride": 32}
#: The model options of the ``*_unet`` rows (the head follows the encoder).
UNET = {"encoder": "unet"}
ROW_RUNNERS: dict[str, Callable[[Bench], None]] = {
    "source": _source, "uda": _uda, "uda_persistent": _uda_persistent,
    "uda_paste": lambda b: _uda_persistent(b, "uda_paste", source_paste=SOURCE_PASTE),
    "wda": _wda, "wda_points": _wda,
    "wda_confirmed": _wda_confirmed,
    "wda_confirmed_points": _wda_confirmed, "oracle": _oracle,
    "peer_source": lambda b: _peer(b, "peer_source", "source", b.source),
    "peer_oracle": lambda b: _peer(b, "peer_oracle", "oracle", DomainData(b.target_train, b.target_train_labels)),
    "oracle_paper": lambda b: _oracle(b, "oracle_paper", head="paper"),
    "source_stride32": lambda b: _source(b, "source_stride32", **STRIDE32),
    "oracle_stride32": lambda b: _oracle(b, "oracle_stride32", **STRIDE32),
    "uda_persistent_stride32": lambda b: _uda_persistent(b, "uda_persistent_stride32", STRIDE32),
    "wda_confirmed_stride32": lambda b: _wda_confirmed(b, "_stride32", STRIDE32),
    "wda_confirmed_points_stride32": lambda b: _wda_confirmed(b, "_stride32", STRIDE32),
    "source_unet": lambda b: _source(b, "source_unet", **UNET),
    "oracle_unet": lambda b: _oracle(b, "oracle_unet", **UNET),
    "uda_persistent_unet": lambda b: _uda_persistent(b, "uda_persistent_unet", UNET),
    "wda_confirmed_unet": lambda b: _wda_confirmed(b, "_unet", UNET),
    "wda_confirmed_points_unet": lambda b: _wda_confirmed(b, "_unet", UNET),
    "wda_confirmed_persistent_unet": lambda b: _wda_confirmed(b, "_unet", UNET, persistent=True),
    "wda_confirmed_persistent_points_unet": lambda b: _wda_confirmed(b, "_unet", UNET, persistent=True),
    "uda_persistent_cut_unet": lambda b: _uda_persistent(b, "uda_persistent_cut_unet", UNET, steps=_short(b)["steps"]),
    "uda_persistent_short_unet": lambda b: _uda_persistent(b, "uda_persistent_short_unet", UNET, **_short(b)),
    "wda_confirmed_short_unet": lambda b: _wda_confirmed(b, "_short_unet", UNET, schedule=_short(b)),
    "wda_confirmed_points_short_unet": lambda b: _wda_confirmed(b, "_short_unet", UNET, schedule=_short(b)),
    "peer_source_unet": lambda b: _peer(b, "peer_source_unet", "source_unet", b.source),
    "peer_oracle_unet": lambda b: _peer(b, "peer_oracle_unet", "oracle_unet",
                                        DomainData(b.target_train, b.target_train_labels)),
    "source_raw": lambda b: _source(b, "source_raw", intensity=None),
    "source_zoom": _source_zoom,
    "source_uncalibrated": _source_uncalibrated,
    "uda_pushed": lambda b: _pushed(b, guarded=False),
    "uda_pushed_guarded": lambda b: _pushed(b, guarded=True),
}


# --- the table ----------------------------------------------------------------------------------------------


def results_suffix(planes: str, min_area_nm2: float | None, scale_min_area_nm2: float) -> str:
    """What a seed's JSON name carries after ``seedN``: rows scored with other planes or another min area
    than the scale's (``None``: the scale's) go to files of their own."""
    own_area = min_area_nm2 is not None and min_area_nm2 != scale_min_area_nm2
    return ("" if planes == "xy" else f"_{planes}") + (f"_ma{min_area_nm2:g}" if own_area else "")


def merge(out: Path, planes: str = "xy", min_area_nm2: float | None = None,
          scale_min_area_nm2: float = SCALES["cpu"]["min_area_nm2"]) -> None:
    """Mean ± std over every seed's JSON in ``out`` (of the runs scored with ``planes`` and ``min_area_nm2``,
    None: the scale's), per row, and volseg ÷ peer."""
    suffix = results_suffix(planes, min_area_nm2, scale_min_area_nm2)
    names = {p.stem.removeprefix("seed").removesuffix(suffix): p for p in sorted(out.glob(f"seed*{suffix}.json"))}
    seeds = {int(n): json.loads(p.read_text()) for n, p in names.items() if n.isdigit()}
    if not seeds:
        print(f"no results in {out}: run with --seed N first")
        return
    own_area = suffix != results_suffix(planes, None, scale_min_area_nm2)
    area = f", output.min_area_nm2 {min_area_nm2:g}" if own_area else ""
    print(f"VNC → Lucchi, held-out Lucchi slices z ≥ {HOLD_OUT_Z}, inference.planes {planes}{area}; "
          f"seeds {sorted(seeds)} (mean ± std over the seeds that ran each row)\n")
    present = [name for name in ROWS if any(name in r for r in seeds.values())]
    width = max(len(TITLES[name]) for name in present)
    print(f"| {'row':<{width}} | seeds | {'Dice':>13} | {'IoU':>13} | {'2D objects / true':>17} | {'train s':>7} |")
    print(f"|{'-' * (width + 2)}|-------|{'-' * 15}|{'-' * 15}|{'-' * 19}|{'-' * 9}|")
    for name in present:
        runs = [r[name] for r in seeds.values() if name in r]
        dice, iou = [r["dice"] for r in runs], [r["iou"] for r in runs]
        objects = statistics.fmean(r["objects"] for r in runs)
        true = statistics.fmean(r["true_objects"] for r in runs)
        print(f"| {TITLES[name]:<{width}} | {len(runs):>5} | {_mean_std(dice)} | {_mean_std(iou)} | "
              f"{objects:>8.0f} / {true:<6.0f} | {statistics.fmean(r['train_s'] for r in runs):7.0f} |")
    for ours, peer, faced in PEER_PAIRS:
        both = [r for r in seeds.values() if ours in r and peer in r]
        if both:
            ratio = statistics.fmean(r[ours]["dice"] for r in both) / statistics.fmean(r[peer]["dice"] for r in both)
            budget = "" if faced == ours else f", the peer trained on the CPU seconds of the {TITLES[faced]} row"
            print(f"\nvolseg ÷ peer, {TITLES[ours]}: {ratio:.3f} Dice (over the {_seeds(len(both))} both ran{budget})")
    for family in FAMILIES:
        print_targets(seeds, family)
    for name in ("uda_pushed", "uda_pushed_guarded"):
        runs = [r[name] for r in seeds.values() if name in r]
        stops = [r["stopped_at"] for r in runs if r.get("stopped_at") is not None]
        if runs:
            print(f"\n{TITLES[name]}: stopped in {len(stops)} of {len(runs)} seeds (at steps {stops}); least "
                  f"foreground ratio to the source model {[round(r['least_foreground_ratio'], 2) for r in runs]}")


#: (volseg row, peer row, the volseg row whose CPU seconds the peer was given) printed as volseg ÷ peer
PEER_PAIRS = (("source", "peer_source", "source"), ("oracle", "peer_oracle", "oracle"),
              ("source_stride32", "peer_source", "source"), ("oracle_stride32", "peer_oracle", "oracle"),
              ("source_unet", "peer_source_unet", "source_unet"), ("oracle_unet", "peer_oracle_unet", "oracle_unet"))


#: The WDA rows issue 13's WDA targets are checked on (name, without the family's suffix; as printed).
WDA_VARIANTS = (("wda_confirmed", "WDA"), ("wda_confirmed_persistent", "WDA + z-persistent"))

#: The adaptation schedules whose targets are checked (the infix of the rows' names before the family's suffix,
#: and what the targets' titles add).
SCHEDULES = {"": "", "_short": ", short schedule"}

#: the rows' model families by the suffix of their names
FAMILIES = {"": "the CNN encoder to stride 8", "_stride32": "the CNN encoder to stride 32",
            "_unet": "the U-Net encoder and head"}


def print_targets(seeds: dict[int, dict[str, Any]], family: str) -> None:
    """Issue 13's targets for one model family (the rows named ``…{family}``), each on the mean Dice of
    the seeds that ran every row it compares; a target whose rows have not run is left out."""
    rows = {"source": "source", "oracle": "oracle"}
    rows = {key: name + family for key, name in rows.items()}
    peers = {key: next(peer for ours, peer, _ in PEER_PAIRS if ours == rows[key]) for key in ("source", "oracle")}

    checks = [
        ("oracle ≥ peer's oracle − 0.01", (rows["oracle"], peers["oracle"]), lambda m: (m[0], m[1] - 0.01)),
        ("source-only ≥ peer's source-only", (rows["source"], peers["source"]), lambda m: (m[0], m[1])),
    ]
    for schedule, label in SCHEDULES.items():  # the adaptation of each schedule, its UDA and WDA recipes
        uda = f"uda_persistent{schedule}{family}"
        checks.append((f"UDA{label} ≥ source + ½ (oracle − source)", (uda, rows["source"], rows["oracle"]),
                       lambda m: (m[0], m[1] + (m[2] - m[1]) / 2)))
        for wda, variant in WDA_VARIANTS:  # each WDA recipe the family has run
            wda, points, variant = f"{wda}{schedule}{family}", f"{wda}_points{schedule}{family}", variant + label
            checks += [(f"{variant} ≥ UDA + 0.02", (wda, uda), lambda m: (m[0], m[1] + 0.02)),
                       (f"{variant} ≥ 0.95 × oracle", (wda, rows["oracle"]), lambda m: (m[0], 0.95 * m[1])),
                       (f"test-time points ≥ {variant} + 0.01", (points, wda), lambda m: (m[0], m[1] + 0.01))]
    lines = []
    for title, needed, bound in checks:
        shared = [r for r in seeds.values() if all(n in r for n in needed)]
        if not shared:
            continue
        value, target = bound([statistics.fmean(r[n]["dice"] for r in shared) for n in needed])
        lines.append(f"  {title}: {value:.3f} against {target:.3f}, {'met' if value >= target else 'missed'} "
                     f"({_seeds(len(shared))})")
    if lines:
        print(f"\nIssue 13's targets, {FAMILIES[family]}:")
        print("\n".join(lines))


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count > 1 else ''}"


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "adaptation")
    parser.add_argument("--merge", action="store_true", help="print the table of every seed run so far")
    parser.add_argument("--force", action="store_true", help="recompute rows the seed's JSON already has")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int, default=0, help="score only the first N held-out slices (smoke tests)")
    parser.add_argument("--planes", choices=sorted(PLANE_SETS), default="xy",
                        help="score as runs with this inference.planes (ortho: Lucchi's voxels are cubes)")
    parser.add_argument("--min-area", type=float, default=None, metavar="NM2",
                        help="score as runs with this output.min_area_nm2 (default: the scale's)")
    args = parser.parse_args()
    if args.merge:
        merge(args.out, args.planes, args.min_area, SCALES[args.scale]["min_area_nm2"])
        return
    keep_freed_memory()
    if not (data_dir() / "vnc.zarr").exists():
        print(f"no data at {data_dir()}: set VOLSEG_DATA to the folder with vnc.zarr and lucchi_train.zarr")
        return
    bench = Bench(args.seed, SCALES[args.scale], args.out, torch.device(args.device), args.slices, args.planes,
                  args.min_area)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; use {', '.join(ROWS)}")
    begin = time.perf_counter()
    done: set[str] = set()
    for name in rows:
        if (args.force or name not in bench.results) and name not in done:
            bench.row(name)
            done |= {name, *next((pair for pair in PAIRED_ROWS if name in pair), ())}
    print(f"seed {args.seed}: {len(rows)} rows in {(time.perf_counter() - begin) / 60:.1f} min "
          f"({torch.get_num_threads()} torch threads, device {args.device})")


if __name__ == "__main__":
    main()
