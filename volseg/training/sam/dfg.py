"""Source-free adaptation with feature-guided box prompts (DFG): SAM pseudo-labels for the mean teacher.

There is no source data: only the source-trained target model (Prompt-DAS) and unlabelled target slices.

1. *(Phase 1 of the paper, feature aggregation, is not separate here: run `volseg adapt` in ``uda`` mode
   first and start from its checkpoint if the source model's features need adapting.)*
2. Per sampled target slice, the target model's foreground (probability ≥ ``seed_threshold``) gives the
   objects and their seeds (innermost pixels). Guidance features are the target model's (encoder + neck)
   and SAM's image embedding, each brought to the slice's pixels and L2-normalised, concatenated; an
   object's prototype is their mean over its seed region, and the similarity map is the cosine to it.
3. A box grows from each seed under that guidance until SAM's mask stabilises
   (:mod:`volseg.training.sam.dfg_boxes`); unstable objects are dropped; kept masks are cleaned to one
   component with holes filled (:mod:`volseg.training.sam.masks`) and painted into instance labels.
4. The pseudo-labelled slices become the labelled domain of volseg's own mean-teacher loop
   (:func:`volseg.training.promptdas.trainer.train_promptdas`, mode ``uda``), whose unlabelled domain is the target
   volume: the loop is reused through its parameters, not forked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from volseg.errors import ConfigError
from volseg.models.sam.input import masks_to_image
from volseg.models.sam.model import SamSegmenter
from volseg.training.crops import CropSampler
from volseg.training.loop import StepCallback
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import AdaptResult, DomainData, train_promptdas
from volseg.training.sam.dfg_boxes import BoxSearch, BoxSearchSettings, search_box
from volseg.training.sam.masks import clean_object_mask, paint_objects
from volseg.training.sam.tuning import grey_input
from volseg.training.targets import innermost_pixels


@dataclass(frozen=True)
class DfgSettings:
    """``slices`` target slices of ``crop_yx`` are pseudo-labelled (sampled with ``seed``); objects are
    target-model components of probability ≥ ``seed_threshold`` and at least ``min_seed_vx`` pixels; cleaned
    SAM masks under ``min_size_vx`` are dropped; ``search``: the box growth."""

    slices: int = 16
    crop_yx: tuple[int, int] = (256, 256)
    seed_threshold: float = 0.5
    min_seed_vx: int = 16
    min_size_vx: int = 16
    search: BoxSearchSettings = field(default_factory=BoxSearchSettings)
    seed: int = 0


@dataclass(frozen=True)
class DfgPseudoLabels:
    """``raw`` ``K×Y×X`` slices as stored, their instance ``labels`` (int32); per slice the searches run
    (kept or not)."""

    raw: np.ndarray
    labels: np.ndarray
    searches: list[list[BoxSearch]]

    @property
    def kept(self) -> int:
        return sum(s.stable for slice_searches in self.searches for s in slice_searches)

    @property
    def tried(self) -> int:
        return sum(len(s) for s in self.searches)


def target_features(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The target model's feature map ``B×C×h×w`` (Prompt-DAS: encoder + neck)."""
    if not (hasattr(model, "encoder") and hasattr(model, "neck")):
        raise ConfigError(f"DFG reads the target model's features, and {type(model).__name__} has no "
                          "Prompt-DAS encoder/neck.", "adapt a Prompt-DAS checkpoint (model.name: promptdas).")
    return model.neck(model.encoder(image))


@torch.no_grad()
def guidance(target_model: nn.Module, sam: SamSegmenter, image: torch.Tensor
             ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """For ``B×1×H×W`` images in [0, 1]: the target model's foreground probability ``B×H×W``, the unit
    guidance features ``B×C×H×W`` (target model ⊕ SAM, each normalised, over √2) and SAM's embedding."""
    hw = tuple(image.shape[-2:])
    probability = torch.sigmoid(target_model(image)[0][:, 0].float()).cpu().numpy()
    own = F.normalize(F.interpolate(target_features(target_model, image), hw, mode="bilinear",
                                    align_corners=False), dim=1)
    embedding = sam.embed(image)
    theirs = F.normalize(masks_to_image(sam.sam, embedding, hw), dim=1)
    return probability, torch.cat([own, theirs], 1) / math.sqrt(2), embedding


def object_seeds(probability: np.ndarray, threshold: float, min_size_vx: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(seed (y, x), region) per component of ``probability ≥ threshold`` (``Y×X``) of ``min_size_vx`` or
    more pixels; the seed is the region's innermost pixel."""
    components, n = ndimage.label(probability >= threshold)
    seeds = []
    for k, seed in enumerate(innermost_pixels(components, n), start=1):
        region = components == k
        if region.sum() >= min_size_vx:
            seeds.append((seed.astype(np.float64), region))
    return seeds


def similarity_to(features: torch.Tensor, region: np.ndarray) -> np.ndarray:
    """Cosine similarity (``Y×X``) of unit ``features`` (``C×Y×X``) to their normalised mean over ``region``."""
    prototype = F.normalize(features[:, torch.from_numpy(region)].mean(dim=1), dim=0)
    return torch.einsum("c,cyx->yx", prototype, features).cpu().numpy()


def dfg_slice(target_model: nn.Module, sam: SamSegmenter, image: torch.Tensor, settings: DfgSettings
              ) -> tuple[np.ndarray, list[BoxSearch]]:
    """Instance pseudo-labels ``Y×X`` of one image ``1×1×Y×X``, and the box search of every seed."""
    probability, features, embedding = guidance(target_model, sam, image)
    hw = tuple(image.shape[-2:])
    device = embedding.device

    def segment(box: tuple[int, int, int, int]) -> np.ndarray:
        with torch.no_grad():
            logits, _ = sam.decode(embedding, hw, None, torch.tensor([box], dtype=torch.float32, device=device))
        return (logits[0, 0] > 0).cpu().numpy()

    searches, masks, seeds = [], [], []
    for seed, region in object_seeds(probability[0], settings.seed_threshold, settings.min_seed_vx):
        found = search_box(seed, similarity_to(features[0].cpu(), region), segment, settings.search)
        searches.append(found)
        if found.stable:
            masks.append(clean_object_mask(found.mask, seed, settings.min_size_vx))
            seeds.append(seed)
    if not masks:
        return np.zeros(hw, dtype=np.int32), searches
    return paint_objects(np.stack(masks), np.stack(seeds), settings.min_size_vx), searches


def dfg_pseudo_labels(target_model: nn.Module, sam: SamSegmenter, raw: np.ndarray, settings: DfgSettings
                      ) -> DfgPseudoLabels:
    """:func:`dfg_slice` on every slice of ``raw`` (``K×Y×X``)."""
    target_model.eval()
    sam.eval()
    device = next(target_model.parameters()).device
    labels, searches = [], []
    for k in range(len(raw)):
        found, tried = dfg_slice(target_model, sam, grey_input(raw[k : k + 1]).to(device), settings)
        labels.append(found)
        searches.append(tried)
    return DfgPseudoLabels(raw, np.stack(labels), searches)


def sample_slices(raw: Any, settings: DfgSettings) -> np.ndarray:
    """``settings.slices`` random ``crop_yx`` slices of a target volume (``Z×Y×X``), ``K×Y×X`` as stored."""
    crop = (1, *(min(c, s) for c, s in zip(settings.crop_yx, raw.shape[-2:], strict=True)))
    return np.concatenate([c.raw for c in CropSampler(raw, None, crop, settings.seed).crops(settings.slices)])


def dfg_adapt(target_model: nn.Module, sam: SamSegmenter, target_raw: Any, settings: DfgSettings,
              adapt: AdaptSettings, on_step: StepCallback | None = None) -> tuple[AdaptResult, DfgPseudoLabels]:
    """DFG phase 2 (see the module docstring): pseudo-label sampled slices of ``target_raw``, then adapt
    ``target_model`` in place with the mean teacher (``adapt`` settings, mode ``uda``) on them and the target."""
    pseudo = dfg_pseudo_labels(target_model, sam, sample_slices(target_raw, settings), settings)
    if pseudo.kept == 0:
        raise ConfigError(f"No box search of the {pseudo.tried} target objects stabilised, so SAM gave no "
                          "pseudo-label.", "lower sam_adapt.dfg_seed_threshold or dfg_stable_iou, or check the "
                          "SAM checkpoint and the target model.")
    source = DomainData(pseudo.raw, pseudo.labels)
    result = train_promptdas(target_model, replace(adapt, mode="uda"), source=source,
                             target=DomainData(target_raw), on_step=on_step)
    return result, pseudo
