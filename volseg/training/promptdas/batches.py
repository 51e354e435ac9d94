"""Training batches of Prompt-DAS: labelled crops with random prompt subsets, and pseudo-labelled target
crops (teacher on the weak view → pseudo-labels and prompts → student's strong view, all aligned).

Every crop slice is one 2D sample, with its own random streams (a :class:`SampleRandom` each, see
:mod:`volseg.training.replicas`), so a sample's views and prompts do not depend on which other samples share
its batch. All maps are ``B×1×Y×X`` float tensors on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from volseg.models import InputContract
from volseg.models.promptdas.model import PromptDASOutput
from volseg.training.augment import AugmentSettings, GeometricTransform, strong_intensity, weak_view
from volseg.training.crops import Crop
from volseg.training.promptdas.contrastive import UNUSED, sample_contrastive_points
from volseg.training.promptdas.prompts import merge_points, pad_points, random_subset
from volseg.training.promptdas.pseudo_labels import (
    confirm_by_points,
    density_peaks,
    keep_components_with_centres,
    keep_persistent,
    nms_radius,
    segmentation_pseudo_labels,
)
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.replicas import SampleRandom
from volseg.training.targets import gaussian_density, instance_centres_2d, point_disks


@dataclass(frozen=True)
class PromptBatch:
    """What the student sees and is scored against.

    ``image`` ``B×1×Y×X`` (model input); ``target``, ``valid`` {0, 1} and ``density`` ``B×1×Y×X``;
    ``points`` ``B×N×2`` (y, x) with ``point_mask`` ``B×N``; ``contrastive_points`` ``B×K×2`` with
    ``contrastive_labels`` ``B×K`` (see :mod:`volseg.training.promptdas.contrastive`), or None; ``stats``: numbers
    worth logging (e.g. prompts per crop, the valid fraction of pseudo-labels).
    """

    image: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor
    density: torch.Tensor
    points: torch.Tensor
    point_mask: torch.Tensor
    contrastive_points: torch.Tensor | None = None
    contrastive_labels: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> PromptBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, image=self.image.to(device), target=self.target.to(device),
                       valid=self.valid.to(device), density=self.density.to(device), points=self.points.to(device),
                       point_mask=self.point_mask.to(device), contrastive_points=move(self.contrastive_points),
                       contrastive_labels=move(self.contrastive_labels))


def _pad_tokens(tokens: torch.Tensor, n: int, fill: float | bool) -> torch.Tensor:
    """``B×M×…`` → ``B×n×…`` (``n ≥ M``), the new rows set to ``fill``."""
    extra = tokens.new_full((tokens.shape[0], n - tokens.shape[1], *tokens.shape[2:]), fill)
    return torch.cat([tokens, extra], dim=1)


def concat_batches(batches: Sequence[PromptBatch]) -> PromptBatch:
    """One batch of all samples, in order, so that the student runs one forward pass per step (as
    ``DistributedDataParallel`` expects). Prompts are padded (invalid) to the largest count, contrastive
    points to the largest K (UNUSED; a batch without any gets only UNUSED rows); stats are dropped."""
    n = max(b.points.shape[1] for b in batches)
    k = max(0 if b.contrastive_points is None else b.contrastive_points.shape[1] for b in batches)
    contrastive_points = contrastive_labels = None
    if k:
        empty = [(b.image.new_zeros(b.image.shape[0], 0, 2), torch.zeros(b.image.shape[0], 0, dtype=torch.long,
                                                                         device=b.image.device)) for b in batches]
        contrastive_points = torch.cat([_pad_tokens(b.contrastive_points if b.contrastive_points is not None
                                                    else e[0], k, 0.0) for b, e in zip(batches, empty, strict=True)])
        contrastive_labels = torch.cat([_pad_tokens(b.contrastive_labels if b.contrastive_labels is not None
                                                    else e[1], k, UNUSED) for b, e in zip(batches, empty, strict=True)])
    return PromptBatch(
        torch.cat([b.image for b in batches]), torch.cat([b.target for b in batches]),
        torch.cat([b.valid for b in batches]), torch.cat([b.density for b in batches]),
        torch.cat([_pad_tokens(b.points, n, 0.0) for b in batches]),
        torch.cat([_pad_tokens(b.point_mask, n, False) for b in batches]), contrastive_points, contrastive_labels)


@dataclass(frozen=True)
class Slices:
    """The 2D samples of a list of crops: ``images`` ``B×1×Y×X`` model input, ``labels`` ``B×Y×X`` (or
    None), ``points`` one ``M×2`` (y, x) array per sample (the crop's sparse points in that slice);
    ``nearby`` (crops with a ``reach``; else None) likewise, the points of the slices within reach;
    ``neighbours`` (crops with neighbour slices; else None) ``B×2×1×Y×X`` model input, the slices ``k``
    below and above each sample, with ``neighbour_present`` ``B×2`` (False: outside the volume)."""

    images: torch.Tensor
    labels: np.ndarray | None
    points: list[np.ndarray]
    nearby: list[np.ndarray] | None = None
    neighbours: torch.Tensor | None = None
    neighbour_present: torch.Tensor | None = None


def crop_slices(crops: Sequence[Crop], contract: InputContract, intensity: tuple[float, float] | None = None
                ) -> Slices:
    """Cut crops (``Z×Y×X`` each) into their ``z`` slices, in order, normalised with the volume's
    ``intensity`` range (see :meth:`InputContract.normalize`)."""
    raw = np.concatenate([c.raw for c in crops])
    images = contract.normalize(torch.from_numpy(np.ascontiguousarray(raw)), intensity).unsqueeze(1)
    labels = None if any(c.labels is None for c in crops) else np.concatenate([c.labels for c in crops])
    points = [c.points_in_slice(z) for c in crops for z in range(c.raw.shape[0])]
    nearby = None
    if crops and all(c.reach >= 0 for c in crops):
        nearby = [c.points_near_slice(z) for c in crops for z in range(c.raw.shape[0])]
    neighbours = present = None
    if crops and all(c.neighbours is not None for c in crops):
        stacked = np.concatenate([c.neighbours.swapaxes(0, 1) for c in crops])  # B×2×Y×X
        neighbours = contract.normalize(torch.from_numpy(np.ascontiguousarray(stacked)), intensity).unsqueeze(2)
        present = torch.from_numpy(np.concatenate([c.neighbour_present.T for c in crops]))
    return Slices(images, labels, points, nearby, neighbours, present)


def _student_views(images: torch.Tensor, maps: dict[str, tuple[torch.Tensor, str, str]],
                   point_lists: Sequence[Sequence[np.ndarray]], randoms: Sequence[SampleRandom],
                   augment: AugmentSettings, padding: str = "border"
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[list[np.ndarray]]]:
    """Per sample, a random geometric transform applied to the image (``padding`` outside the crop), to
    each ``name → (maps, mode, padding)`` and to each list of points, then the strong intensity changes
    on the image."""
    shape = tuple(images.shape[-2:])
    out_images, out_maps = [], {name: [] for name in maps}
    out_points: list[list[np.ndarray]] = [[] for _ in point_lists]
    for i, random in enumerate(randoms):
        transform = GeometricTransform.random(random.generator, shape, augment.elastic_alpha_vx,
                                              augment.elastic_grid, augment.zoom)
        image = transform.apply(images[i], "bilinear", padding)
        out_images.append(strong_intensity(random.generator, image[None], augment)[0])
        for name, (tensor, mode, outside) in maps.items():
            out_maps[name].append(transform.apply(tensor[i], mode, outside))
        for j, points in enumerate(point_lists):
            out_points[j].append(transform.points(points[i], shape))
    return torch.stack(out_images), {name: torch.stack(t) for name, t in out_maps.items()}, out_points


def _check_randoms(slices: Slices, randoms: Sequence[SampleRandom]) -> None:
    if len(randoms) != slices.images.shape[0]:
        raise ValueError(f"{len(randoms)} random streams for {slices.images.shape[0]} samples; give one each")


def labelled_batch(slices: Slices, sigma_vx: float, randoms: Sequence[SampleRandom],
                   augment: AugmentSettings, unprompted: float = 0.0) -> PromptBatch:
    """A supervised batch: mask = labels > 0, density = Gaussians at the 2D instance centres, and as
    prompts a uniformly random subset (size 0 … all) of each sample's centres, or with probability
    ``unprompted`` none; strongly augmented (mirrored at the crop's edges when it zooms). ``randoms``:
    one per sample."""
    _check_randoms(slices, randoms)
    if slices.labels is None:
        raise ValueError("a labelled batch needs crops with labels")
    centres = [instance_centres_2d(labels).astype(np.float64) for labels in slices.labels]
    mask = torch.from_numpy((slices.labels > 0).astype(np.float32)).unsqueeze(1)
    density = torch.from_numpy(np.stack([gaussian_density(slices.labels.shape[1:], c, sigma_vx)
                                         for c in centres])).unsqueeze(1)
    prompts = [random_subset(c, random.rng, unprompted) for c, random in zip(centres, randoms, strict=True)]
    padding = augment.labelled_padding
    image, maps, (prompts,) = _student_views(
        slices.images, {"target": (mask, "nearest", padding), "density": (density, "bilinear", padding)},
        [prompts], randoms, augment, padding)
    points, point_mask = pad_points(prompts)
    stats = {"prompts": float(point_mask.sum()) / len(prompts)}
    return PromptBatch(image, maps["target"], torch.ones_like(maps["target"]), maps["density"], points, point_mask,
                       stats=stats)


@dataclass(frozen=True)
class PseudoLabels:
    """The teacher's verdict on a weak view: ``target``/``valid``/``density`` ``B×1×Y×X``, and per sample
    the ``sparse`` points and the ``detected`` peaks not already within the NMS radius of a sparse point
    (``M×2`` arrays); the teacher's prompts were both together."""

    target: torch.Tensor
    valid: torch.Tensor
    density: torch.Tensor
    sparse: list[np.ndarray]
    detected: list[np.ndarray]

    @property
    def prompts(self) -> list[np.ndarray]:
        return [np.concatenate([s, d]) for s, d in zip(self.sparse, self.detected, strict=True)]


def _as_points(points_yx: np.ndarray) -> np.ndarray:
    return np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)


@torch.no_grad()
def detect_centres(teacher: nn.Module, weak: torch.Tensor, sparse: Sequence[np.ndarray], settings: AdaptSettings
                   ) -> tuple[list[np.ndarray], PromptDASOutput]:
    """The teacher's first pass on a weak view ``B×1×Y×X``, prompted with the sparse points only (none in
    UDA): its density peaks (``peak_threshold``, NMS radius :func:`nms_radius` of ``density_sigma``)
    that are farther than that radius from every sparse point, one ``M×2`` (y, x) array per sample; and
    the pass's output."""
    device = next(teacher.parameters()).device
    radius = nms_radius(settings.density_sigma)
    points, mask = pad_points(sparse, device)
    first = teacher(weak.to(device), points, mask)
    peaks = density_peaks(first.density.cpu(), settings.peak_threshold, radius)
    return [merge_points(s, p, radius)[len(s) :] for s, p in zip(sparse, peaks, strict=True)], first


def mark_sparse_points(target: torch.Tensor, valid: torch.Tensor, sparse: Sequence[np.ndarray], radius_vx: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse points are ground-truth centres: a disk of ``radius_vx`` around each becomes foreground and
    valid in the ``B×1×Y×X`` maps (changed in place and returned)."""
    shape = tuple(target.shape[-2:])
    for b, points_yx in enumerate(sparse):
        if len(points_yx):
            disks = torch.from_numpy(point_disks(shape, points_yx, radius_vx))
            target[b, 0][disks] = 1
            valid[b, 0][disks] = 1
    return target, valid


@torch.no_grad()
def neighbour_foreground(teacher: nn.Module, neighbours: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The teacher's unprompted foreground (p > 0.5) on the neighbour slices ``B×2×1×Y×X`` that are
    ``present`` (``B×2``), as ``B×2×Y×X`` bool (False where absent); one pass over the present ones."""
    foreground = torch.zeros(neighbours.shape[:2] + neighbours.shape[-2:], dtype=torch.bool)
    if bool(present.any()):
        device = next(teacher.parameters()).device
        logits = teacher(neighbours[present].to(device)).logits[:, 0].float().cpu()
        foreground[present] = logits > 0  # sigmoid(logit) > 0.5
    return foreground


@torch.no_grad()
def teacher_pseudo_labels(teacher: nn.Module, weak: torch.Tensor, sparse_points: Sequence[np.ndarray],
                          settings: AdaptSettings, nearby: Sequence[np.ndarray] | None = None,
                          neighbours: tuple[torch.Tensor, torch.Tensor] | None = None) -> PseudoLabels:
    """Pseudo-labels of a weak view ``B×1×Y×X`` in two teacher passes (one, when the first detects no
    centre in the whole batch: the second would repeat it).

    1. :func:`detect_centres` (prompted with the sparse points).
    2. Prompted with the sparse points and the detected centres: probability → foreground ≥ ``delta_f``,
       background ≤ ``delta_b``, else ignored; with ``require_centre``, foreground components without a
       prompt are ignored too; with ``nearby`` points (WDA, ``confirm_slices`` ≥ 0), the components of
       p > 0.5 that hold none become background (:func:`confirm_by_points`); with ``neighbours`` (the
       neighbour slices and which are present, see :class:`Slices`; ``persistence_slices`` ≥ 1), those
       that do not persist in them (:func:`persistent_components`) become background too; then
       :func:`mark_sparse_points` with ``disk_radius``.
    The density target (``density_pseudo_target``) is a Gaussian (``density_sigma``) at every prompt
    (detected or sparse), or the teacher's second-pass density.
    """
    sparse = [_as_points(s) for s in sparse_points]
    detected, first = detect_centres(teacher, weak, sparse, settings)
    prompts = [np.concatenate([s, d]) for s, d in zip(sparse, detected, strict=True)]
    device = next(teacher.parameters()).device
    # No peak detected anywhere in the batch: the second pass would see the first's input again.
    second = first if not any(map(len, detected)) else teacher(weak.to(device), *pad_points(prompts, device))
    probability = torch.sigmoid(second.logits[:, :1].float()).cpu()
    target, valid = segmentation_pseudo_labels(probability, settings.delta_f, settings.delta_b)
    if settings.require_centre:
        target, valid = keep_components_with_centres(target, valid, prompts)
    if nearby is not None:
        target, valid = confirm_by_points(target, valid, probability > 0.5, nearby)
    if neighbours is not None:
        images, present = neighbours
        target, valid = keep_persistent(target, valid, probability > 0.5,
                                        neighbour_foreground(teacher, images, present), present,
                                        settings.persistence_share)
    target, valid = mark_sparse_points(target, valid, sparse, settings.disk_radius)
    if settings.density_pseudo_target == "teacher":
        density = second.density.float().cpu()
    else:
        shape = tuple(weak.shape[-2:])
        density = torch.from_numpy(np.stack([gaussian_density(shape, p, settings.density_sigma)
                                             for p in prompts])).unsqueeze(1)
    return PseudoLabels(target, valid, density, sparse, detected)


def pseudo_labelled_batch(teacher: nn.Module, slices: Slices, settings: AdaptSettings,
                          randoms: Sequence[SampleRandom]) -> PromptBatch:
    """A target batch: the teacher labels the weak view (:func:`teacher_pseudo_labels`); the student gets
    a strong view with the pseudo-labels, prompts and contrastive points transformed alike. The
    student's prompts are the teacher's, or (``student_prompts="subset"``) the sparse points plus a
    random subset of the detected peaks.

    Contrastive points are sampled in the student's view, ``contrastive_points`` per sample, balanced
    between valid pseudo-foreground and valid pseudo-background (pixels the warp read from outside the
    crop are invalid). ``randoms``: one per sample.
    """
    _check_randoms(slices, randoms)
    weak = torch.cat([weak_view(random.generator, image[None], settings.augment.weak_intensity)
                      for image, random in zip(slices.images, randoms, strict=True)])
    neighbours = None
    if settings.persistence_slices > 0 and slices.neighbours is not None:
        neighbours = (slices.neighbours, slices.neighbour_present)
    pseudo = teacher_pseudo_labels(teacher, weak, slices.points, settings, slices.nearby, neighbours)
    prompts = pseudo.prompts
    if settings.student_prompts == "subset":
        prompts = [np.concatenate([s, random_subset(d, random.rng)])
                   for s, d, random in zip(pseudo.sparse, pseudo.detected, randoms, strict=True)]
    image, maps, (prompts,) = _student_views(
        slices.images,
        {"target": (pseudo.target, "nearest", "zeros"), "valid": (pseudo.valid, "nearest", "zeros"),
         "density": (pseudo.density, "bilinear", "zeros")},
        [prompts], randoms, settings.augment)
    target, valid = maps["target"], maps["valid"]
    sampled = [sample_contrastive_points((t[0] * v[0]).numpy() > 0, ((1 - t[0]) * v[0]).numpy() > 0,
                                         settings.contrastive_points, random.rng)
               for t, v, random in zip(target, valid, randoms, strict=True)]
    points, point_mask = pad_points(prompts)
    stats = {"prompts": float(sum(map(len, pseudo.prompts))) / len(prompts), "valid": float(valid.mean()),
             "foreground": float((target * valid).sum() / valid.sum().clamp_min(1))}
    return PromptBatch(image, target, valid, maps["density"], points, point_mask,
                       torch.from_numpy(np.stack([s[0] for s in sampled])).float(),
                       torch.from_numpy(np.stack([s[1] for s in sampled])), stats)


def paste_source_objects(pseudo: PromptBatch, source: PromptBatch, share: float,
                         randoms: Sequence[SampleRandom]) -> PromptBatch:
    """Cross-domain mixing (as ClassMix / DACS do for semantic classes): the labelled organelles of
    source sample ``i`` are pasted onto pseudo-labelled target sample ``i`` (both student views), with
    probability ``share`` per sample (1: every sample). Pasted pixels take the source's image, label
    (foreground, valid) and density; the rest keeps the target's. The student thus sees organelles it
    knows for certain on the target's own background, which holds its recall while the pseudo-labels
    drift. Contrastive points that the paste covers are dropped (UNUSED). ``randoms``: the pseudo
    batch's, one per sample."""
    if pseudo.image.shape != source.image.shape:
        raise ValueError(f"pasting needs source and target samples of one shape, not {tuple(source.image.shape)} "
                         f"and {tuple(pseudo.image.shape)}")
    chosen = [share >= 1 or (share > 0 and random.rng.random() < share) for random in randoms]
    paste = source.target * source.valid * torch.tensor(chosen, dtype=source.target.dtype).view(-1, 1, 1, 1)
    keep = 1 - paste
    labels = pseudo.contrastive_labels
    if labels is not None and pseudo.contrastive_points is not None:
        yx = pseudo.contrastive_points.round().long()
        covered = torch.stack([paste[i, 0, yx[i, :, 0], yx[i, :, 1]] > 0 for i in range(len(yx))])
        labels = labels.masked_fill(covered, UNUSED)
    stats = {**pseudo.stats, "pasted": float(paste.mean())}
    return replace(pseudo, image=paste * source.image + keep * pseudo.image,
                   target=torch.maximum(paste, keep * pseudo.target), valid=torch.maximum(paste, pseudo.valid),
                   density=paste * source.density + keep * pseudo.density, contrastive_labels=labels, stats=stats)
