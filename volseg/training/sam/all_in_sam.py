"""All-in-SAM: weak labels → SAM pseudo-masks → adapter fine-tuning → prompt-free inference.

1. Weak labels (:mod:`volseg.training.sam.weak_labels`): one box or point per annotated object of a slice.
2. SAM, prompted with them, draws each object; masks are cleaned to one component per object
   (:mod:`volseg.training.sam.masks`) and united into a pixel pseudo-mask. The model is used as it is before
   tuning: its adapters start as the identity, so this is SAM zero-shot.
3. The model's adapters (and SAM's mask decoder) train with a Dice loss on those pseudo-masks, with no
   prompts (:mod:`volseg.training.sam.tuning`); SAM's encoder stays frozen.
4. The tuned model segments without prompts (`volseg run` with no prompts section).

Sparse annotations leave most objects of a slice undrawn, so by default (``supervise="annotated"``) the
loss only counts pixels near annotated objects (within ``margin_vx`` of their boxes, or of their masks
when only points are known); ``"all"`` trusts the whole slice (every object annotated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy import ndimage

from volseg.errors import ConfigError
from volseg.models.sam.model import SamSegmenter
from volseg.training.loop import StepCallback, TrainHistory
from volseg.training.sam.masks import clean_object_mask, paint_objects, sam_object_masks
from volseg.training.sam.tuning import SamTuneSettings, SliceCrops, grey_input, tune_sam
from volseg.training.sam.weak_labels import WeakLabels


@dataclass(frozen=True)
class AllInSamSettings:
    """``prompt``: SAM is prompted with each object's box or point; ``supervise``: see the module
    docstring; ``margin_vx``: the band around annotated objects whose background is trusted;
    ``min_size_vx``: smaller cleaned masks are dropped; ``tune``: the fine-tuning (decoder included)."""

    prompt: Literal["boxes", "points"] = "boxes"
    supervise: Literal["annotated", "all"] = "annotated"
    margin_vx: int = 8
    min_size_vx: int = 16
    tune: SamTuneSettings = field(default_factory=lambda: SamTuneSettings(train_decoder=True))


@dataclass(frozen=True)
class SlicePseudoLabels:
    """Pseudo-labelled slices: ``raw`` ``K×Y×X`` as stored, ``labels`` ``K×Y×X`` int32 (one id per kept
    object), ``valid`` ``K×Y×X`` {0, 1} (where the loss counts); ``prompted``/``kept``: objects asked / kept."""

    raw: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    prompted: int
    kept: int


def all_in_sam_pseudo_labels(sam: SamSegmenter, raw: np.ndarray, weak: Sequence[WeakLabels],
                             settings: AllInSamSettings) -> SlicePseudoLabels:
    """SAM's cleaned masks for the weak labels of each slice of ``raw`` (``K×Y×X``, one :class:`WeakLabels`
    per slice)."""
    if len(weak) != len(raw):
        raise ValueError(f"{len(weak)} weak labels for {len(raw)} slices; give one per slice")
    if settings.prompt == "boxes" and any(w.boxes_yxyx is None for w in weak if len(w)):
        raise ConfigError("All-in-SAM was asked for box prompts, but the weak labels are points only.",
                          "give sparse instance labels (boxes are read off them), or set prompt: points.")
    labels = np.zeros(raw.shape, dtype=np.int32)
    valid = np.zeros(raw.shape, dtype=np.uint8)
    prompted = kept = 0
    for k, w in enumerate(weak):
        boxes = w.boxes_yxyx if settings.prompt == "boxes" else None
        masks = sam_object_masks(sam, grey_input(raw[k : k + 1]), None if boxes is not None else w.points_yx, boxes)
        cleaned = np.stack([clean_object_mask(m, p, settings.min_size_vx) for m, p in zip(masks, w.points_yx,
                                                                                          strict=True)]) \
            if len(masks) else np.zeros((0, *raw.shape[1:]), dtype=bool)
        labels[k] = paint_objects(cleaned, w.points_yx, settings.min_size_vx)
        valid[k] = _supervised_region(labels[k] > 0, w.boxes_yxyx if boxes is not None else None, settings)
        prompted += len(w)
        kept += len(np.unique(labels[k])) - 1
    return SlicePseudoLabels(raw, labels, valid, prompted, kept)


def _supervised_region(foreground: np.ndarray, boxes: np.ndarray | None, settings: AllInSamSettings) -> np.ndarray:
    """Where the loss counts: everywhere (``all``), or within ``margin_vx`` of the pseudo-foreground and
    of the prompt boxes."""
    if settings.supervise == "all":
        return np.ones(foreground.shape, dtype=np.uint8)
    near = foreground.copy()
    for y0, x0, y1, x1 in np.rint(boxes).astype(int) if boxes is not None else []:
        near[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    if settings.margin_vx > 0 and near.any():
        near = ndimage.binary_dilation(near, iterations=settings.margin_vx)
    return near.astype(np.uint8)


def all_in_sam(model: SamSegmenter, raw: np.ndarray, weak: Sequence[WeakLabels], settings: AllInSamSettings,
               on_step: StepCallback | None = None) -> tuple[TrainHistory, SlicePseudoLabels]:
    """Pseudo-label ``raw`` (``K×Y×X`` slices) from ``weak`` with ``model`` as SAM, then tune ``model``'s
    adapters and decoder on them, in place (see the module docstring)."""
    if model.adapters is None:
        raise ConfigError("All-in-SAM fine-tunes SAM through adapters, and the model has none.",
                          "set model.options.adapter_dim (e.g. 16).")
    pseudo = all_in_sam_pseudo_labels(model, raw, weak, settings)
    if pseudo.kept == 0:
        raise ConfigError(f"SAM kept no object of the {pseudo.prompted} weak labels, so there is nothing to "
                          "train on.", "check the weak labels (and the SAM checkpoint), or lower min_size_vx.")
    tune = settings.tune
    crops = SliceCrops(pseudo.raw, (pseudo.labels > 0).astype(np.uint8), pseudo.valid, tune.crop[1:],
                       tune.batch_size, tune.seed)
    history = tune_sam(model, crops, replace(tune, crop=(1, *crops.crop_yx)), on_step)
    return history, pseudo
