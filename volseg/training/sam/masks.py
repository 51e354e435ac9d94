"""SAM's per-object masks as pseudo-labels, cleaned by connected-component analysis.

SAM answers each prompt with one mask that can carry stray blobs (a neighbour's membrane, texture) and
holes. A pseudo-label keeps one component per object — the one containing the object's seed point, or
else the largest — fills its holes, and drops objects smaller than ``min_size_vx``. Objects are then
painted into one instance image, earlier objects winning where two overlap.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from volseg.models.sam.model import SamSegmenter


def clean_object_mask(mask: np.ndarray, seed_yx: np.ndarray | None = None, min_size_vx: int = 0) -> np.ndarray:
    """The component of ``mask`` (``Y×X`` bool, 4-connected) containing ``seed_yx`` (else the largest),
    holes filled; all False when that is smaller than ``min_size_vx``."""
    components, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    keep = 0
    if seed_yx is not None:
        y, x = (int(np.rint(v)) for v in np.asarray(seed_yx, dtype=np.float64)[:2])
        if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]:
            keep = int(components[y, x])
    if keep == 0:
        keep = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    obj = ndimage.binary_fill_holes(components == keep)
    return obj if obj.sum() >= min_size_vx else np.zeros(mask.shape, dtype=bool)


def paint_objects(masks: np.ndarray, seeds_yx: np.ndarray | None = None, min_size_vx: int = 0) -> np.ndarray:
    """``K×Y×X`` object masks → ``Y×X`` int32 instance labels 1..K (ids of dropped objects stay unused).

    Where objects overlap, the earlier one keeps the pixels; what is left of a later object is cleaned
    again (:func:`clean_object_mask` with its seed, row ``k`` of ``seeds_yx``), so every painted object
    is still one hole-free component of at least ``min_size_vx`` pixels.
    """
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for k, mask in enumerate(masks):
        seed = None if seeds_yx is None else seeds_yx[k]
        labels[clean_object_mask(mask & (labels == 0), seed, min_size_vx) & (labels == 0)] = k + 1
    return labels


@torch.no_grad()
def sam_object_masks(sam: SamSegmenter, image: torch.Tensor, points_yx: np.ndarray | None = None,
                     boxes_yxyx: np.ndarray | None = None, embedding: torch.Tensor | None = None) -> np.ndarray:
    """SAM's masks (logit > 0) of one image ``1×1×Y×X`` in [0, 1]: one per point, then one per box,
    as a ``K×Y×X`` bool array (``K = 0`` without prompts). ``embedding``: ``sam.embed(image)``, if known."""
    device = next(sam.parameters()).device

    def as_tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None or len(a) == 0 else torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)

    points, boxes = as_tensor(points_yx), as_tensor(boxes_yxyx)
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    if points is None and boxes is None:
        return np.zeros((0, *hw), dtype=bool)
    embedding = sam.embed(image.to(device)) if embedding is None else embedding
    logits, _ = sam.decode(embedding, hw, points, boxes)
    return (logits[:, 0] > 0).cpu().numpy()
