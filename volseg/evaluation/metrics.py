"""Segmentation metrics: foreground Dice/IoU (counts add up across blocks) and instance metrics.

Foreground (semantic) metrics compare two binary maps voxel by voxel; :class:`Confusion` counts add
up, so a volume is scored block by block and the sums give the exact whole-volume value.

Instance metrics compare two *instance label maps* (0 = background, every other value one object).
Each function also accepts boolean arrays: a boolean array is a binary map whose connected components
(:func:`connected_instances`) become the instances. Integer arrays are taken as label maps as they
are, so a 0/1 ``uint8`` mask is ONE instance per value — pass ``mask > 0`` to get components.

* :func:`aggregated_jaccard` — AJI, Kumar et al. 2017 (per 2D slice in volseg).
* :func:`panoptic_quality` — PQ = SQ × RQ, Kirillov et al. 2019 (per 2D slice in volseg).
* :func:`average_precision` — AP at IoU 0.75 over 3D instances, the MitoEM challenge's AP-75; for a
  volume too large for memory, :func:`overlap_counts` of its blocks, summed
  (:func:`sum_overlap_counts`), give :meth:`Overlaps.from_counts` and :func:`ranked_average_precision`.

Empty inputs: when neither map has any foreground, every metric is 1.0 (nothing to find, nothing
found wrongly); when exactly one of them is empty, every metric is 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import cc3d
import fastremap
import numpy as np

COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
"""The 101 recall levels at which COCO (and the MitoEM evaluation built on it) samples precision."""


@dataclass(frozen=True)
class Confusion:
    """Foreground voxel counts: true positives, false positives, false negatives, true negatives."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, predicted: np.ndarray, truth: np.ndarray) -> Confusion:
        """Counts of two boolean (or 0/1) arrays of the same shape."""
        p = np.asarray(predicted, dtype=bool)
        t = np.asarray(truth, dtype=bool)
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(t)) - tp
        return cls(tp, fp, fn, p.size - tp - fp - fn)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def empty(self) -> bool:
        """Whether neither prediction nor truth has any foreground voxel."""
        return self.tp + self.fp + self.fn == 0

    @property
    def dice(self) -> float:
        """2·TP / (2·TP + FP + FN); 1.0 when both prediction and truth are empty."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2 * self.tp / denominator

    @property
    def iou(self) -> float:
        """TP / (TP + FP + FN) (Jaccard); 1.0 when both are empty."""
        denominator = self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else self.tp / denominator


def total(confusions: Iterable[Confusion]) -> Confusion:
    """The sum of confusion counts (e.g. of the blocks of a volume)."""
    result = Confusion()
    for c in confusions:
        result = result + c
    return result


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two binary maps (see :attr:`Confusion.dice`)."""
    return Confusion.of(predicted, truth).dice


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU (Jaccard) of two binary maps (see :attr:`Confusion.iou`)."""
    return Confusion.of(predicted, truth).iou


# --- instances ---------------------------------------------------------------------------------------


def full_connectivity(ndim: int) -> int:
    """The cc3d connectivity where diagonal neighbours touch: 8 in 2D, 26 in 3D."""
    if ndim not in (2, 3):
        raise ValueError(f"instance metrics take 2D or 3D arrays, got {ndim} dimensions")
    return 8 if ndim == 2 else 26


def connected_instances(mask: np.ndarray, min_size_vx: int = 0, connectivity: int | None = None) -> np.ndarray:
    """Instance label map (uint32, ids 1..n, 0 = background) of the connected components of ``mask``.

    ``mask`` is 2D or 3D; nonzero is foreground. Components touch through faces, edges and corners
    unless ``connectivity`` says otherwise (cc3d: 4/8 in 2D, 6/18/26 in 3D). Components with fewer
    than ``min_size_vx`` voxels are removed (0 and 1 keep all); the rest are numbered 1..n in the
    order cc3d finds them (raster order of their first voxel).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.flags.writeable:  # cc3d refuses read-only buffers (e.g. arrays from Ray's object store)
        mask = mask.copy()
    labels = cc3d.connected_components(mask, connectivity=connectivity or full_connectivity(mask.ndim))
    labels = labels.astype(np.uint32, copy=False)
    if min_size_vx > 1:
        keep = np.bincount(labels.ravel()) >= min_size_vx
        keep[0] = False
        renumber = (np.cumsum(keep) * keep).astype(np.uint32)
        labels = renumber[labels]
    return labels


def as_instances(array: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Instances of ``array`` numbered 1..n: connected components if it is boolean, else its labels in
    ascending order of their values (so a volume's ids do not depend on where its objects lie)."""
    array = np.asarray(array)
    if array.dtype == bool:
        return connected_instances(array, connectivity=connectivity)
    if array.dtype.kind not in "iu":
        raise ValueError(f"instance label maps must be integer (or boolean masks), got {array.dtype}")
    values = fastremap.unique(array)
    values = values[values != 0]
    mapping = {0: 0, **{int(v): i for i, v in enumerate(values.tolist(), start=1)}}
    return fastremap.remap(array, mapping, in_place=False).astype(np.uint32 if len(values) < 2**32 else np.uint64)


@dataclass(frozen=True)
class Overlaps:
    """Every pair of a true and a predicted instance that share at least one voxel.

    Instances are numbered 1..n (as :func:`as_instances` gives them). ``true_id``, ``predicted_id``,
    ``intersection`` and ``union`` are aligned arrays, one entry per overlapping pair, sorted by
    (true id, predicted id). ``true_area``/``predicted_area`` are voxel counts indexed by id
    (index 0 is the background and unused).
    """

    true_id: np.ndarray
    predicted_id: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    true_area: np.ndarray
    predicted_area: np.ndarray

    @classmethod
    def of(cls, predicted: np.ndarray, truth: np.ndarray, connectivity: int | None = None) -> Overlaps:
        """Overlaps of two instance label maps (or boolean masks, see the module docstring)."""
        p = as_instances(predicted, connectivity)
        t = as_instances(truth, connectivity)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
        n_predicted = int(p.max(initial=0))
        both = (p > 0) & (t > 0)
        codes = t[both].astype(np.int64) * (n_predicted + 1) + p[both]
        pairs, intersection = np.unique(codes, return_counts=True)
        true_id, predicted_id = np.divmod(pairs, n_predicted + 1)
        true_area = np.bincount(t.ravel(), minlength=int(t.max(initial=0)) + 1)
        predicted_area = np.bincount(p.ravel(), minlength=n_predicted + 1)
        union = true_area[true_id] + predicted_area[predicted_id] - intersection
        return cls(true_id, predicted_id, intersection, union, true_area, predicted_area)

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> Overlaps:
        """Overlaps from voxel counts of (predicted id, true id) pairs, ``K×3`` (any integer ids, 0 =
        background; each pair once), as :func:`overlap_counts` gives them summed over the blocks of a
        volume: the same as :meth:`of` on the whole volume, whose voxels never need to be in memory."""
        counts = np.asarray(counts, np.uint64).reshape(-1, 3)
        predicted_ids, p = np.unique(counts[:, 0], return_inverse=True)
        true_ids, t = np.unique(counts[:, 1], return_inverse=True)
        # ids 1..n in ascending order of the original ids (0 stays 0 when present)
        p = p + (1 if len(predicted_ids) == 0 or predicted_ids[0] != 0 else 0)
        t = t + (1 if len(true_ids) == 0 or true_ids[0] != 0 else 0)
        n_predicted = len(predicted_ids) - int(len(predicted_ids) > 0 and predicted_ids[0] == 0)
        n_true = len(true_ids) - int(len(true_ids) > 0 and true_ids[0] == 0)
        voxels = counts[:, 2].astype(np.int64)
        predicted_area = np.bincount(p, weights=voxels, minlength=n_predicted + 1).astype(np.int64)
        true_area = np.bincount(t, weights=voxels, minlength=n_true + 1).astype(np.int64)
        both = (p > 0) & (t > 0)
        order = np.lexsort((p[both], t[both]))
        true_id, predicted_id, intersection = t[both][order], p[both][order], voxels[both][order]
        union = true_area[true_id] + predicted_area[predicted_id] - intersection
        return cls(true_id.astype(np.int64), predicted_id.astype(np.int64), intersection, union, true_area,
                   predicted_area)

    @property
    def num_true(self) -> int:
        return len(self.true_area) - 1

    @property
    def num_predicted(self) -> int:
        return len(self.predicted_area) - 1

    @property
    def iou(self) -> np.ndarray:
        """Intersection over union of each overlapping pair."""
        return self.intersection / self.union


def aggregated_jaccard(predicted: np.ndarray, truth: np.ndarray, connectivity: int | None = None) -> float:
    """Aggregated Jaccard Index (AJI) as defined by Kumar et al. 2017 (IEEE TMI 36:1550).

    For every true instance G_i, the predicted instance S_j with the highest IoU with G_i is its
    match (ties: the lowest predicted id); a predicted instance may be the match of several true
    instances. Then::

        AJI = Σ_i |G_i ∩ S_j(i)|  /  ( Σ_i |G_i ∪ S_j(i)|  +  Σ_{S never matched} |S| )

    A true instance that overlaps no prediction adds 0 to the numerator and |G_i| to the
    denominator. Range [0, 1]. Empty: 1.0 when both maps are empty, 0.0 when only one is.
    """
    o = Overlaps.of(predicted, truth, connectivity)
    if o.num_true == 0 and o.num_predicted == 0:
        return 1.0
    iou_of_pair = o.iou
    by_truth_then_best = np.lexsort((o.predicted_id, -iou_of_pair, o.true_id))
    _, first = np.unique(o.true_id[by_truth_then_best], return_index=True)
    best = by_truth_then_best[first]
    matched_true = np.zeros(o.num_true + 1, bool)
    matched_true[o.true_id[best]] = True
    used = np.zeros(o.num_predicted + 1, bool)
    used[o.predicted_id[best]] = True
    intersection = int(o.intersection[best].sum())
    union = (int(o.union[best].sum()) + int(o.true_area[1:][~matched_true[1:]].sum())
             + int(o.predicted_area[1:][~used[1:]].sum()))
    return intersection / union


@dataclass(frozen=True)
class PanopticQuality:
    """Panoptic quality of one (single-class) image, Kirillov et al. 2019 (CVPR), eq. 1.

    A true and a predicted instance match when their IoU is > 0.5 (such matches are unique).
    ``tp`` matched pairs, ``fp`` unmatched predictions, ``fn`` unmatched true instances,
    ``matched_iou_sum`` the sum of the matched pairs' IoUs.
    """

    tp: int
    fp: int
    fn: int
    matched_iou_sum: float

    @property
    def empty(self) -> bool:
        return self.tp + self.fp + self.fn == 0

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of the matched pairs; 1.0 if both are empty, 0.0 if no match."""
        if self.empty:
            return 1.0
        return self.matched_iou_sum / self.tp if self.tp else 0.0

    @property
    def rq(self) -> float:
        """Recognition quality TP / (TP + FP/2 + FN/2) (an F1 score); 1.0 if both are empty."""
        return 1.0 if self.empty else self.tp / (self.tp + 0.5 * self.fp + 0.5 * self.fn)

    @property
    def pq(self) -> float:
        """PQ = SQ × RQ = Σ matched IoU / (TP + FP/2 + FN/2); 1.0 if both are empty."""
        return 1.0 if self.empty else self.matched_iou_sum / (self.tp + 0.5 * self.fp + 0.5 * self.fn)


def panoptic_quality(predicted: np.ndarray, truth: np.ndarray, connectivity: int | None = None) -> PanopticQuality:
    """Panoptic quality (matches at IoU > 0.5) of two instance label maps or boolean masks."""
    o = Overlaps.of(predicted, truth, connectivity)
    iou_of_pair = o.iou
    matched = iou_of_pair > 0.5
    tp = int(np.count_nonzero(matched))
    return PanopticQuality(tp, o.num_predicted - tp, o.num_true - tp, float(iou_of_pair[matched].sum()))


@dataclass(frozen=True)
class AveragePrecision:
    """Instance average precision at one IoU threshold (see :func:`average_precision`).

    ``tp``/``fp``/``fn`` count predicted instances matched / unmatched and true instances unmatched;
    ``precision`` = TP / (TP + FP) and ``recall`` = TP / (TP + FN) over all predictions.
    """

    ap: float
    iou_threshold: float
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1.0 with no predictions and no truth, 0.0 with no predictions only."""
        if self.tp + self.fp == 0:
            return 1.0 if self.fn == 0 else 0.0
        return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1.0 with no truth and no predictions, 0.0 with no truth only."""
        if self.tp + self.fn == 0:
            return 1.0 if self.fp == 0 else 0.0
        return self.tp / (self.tp + self.fn)


def average_precision(
    predicted: np.ndarray,
    truth: np.ndarray,
    iou_threshold: float = 0.75,
    scores: Mapping[int, float] | None = None,
    connectivity: int | None = None,
) -> AveragePrecision:
    """Instance AP at one IoU threshold, as the MitoEM challenge computes AP-75 (Wei et al. 2020,
    MICCAI, "MitoEM dataset", sec. 4; evaluation code github.com/ygCoconut/mAP_3Dvolume, which follows
    the COCO ``cocoeval`` procedure on 3D instances).

    1. Predicted instances are ranked by confidence ``scores`` (predicted id → score, ids as in
       ``predicted``); without scores, by size in voxels — the MitoEM script's default. Ties keep
       ascending id order.
    2. A predicted instance is a true positive if its IoU with some true instance is
       ≥ ``iou_threshold``; with a threshold ≥ 0.5 each true instance can match at most one
       prediction, so COCO's greedy matching needs no tie-breaking. Other predictions are false
       positives.
    3. Going down the ranking, recall_k = TP_k / #true and precision_k = TP_k / k; precision is made
       monotone (each value replaced by the maximum at equal or higher recall) and sampled at the
       101 recall levels 0, 0.01, …, 1 (the first ranked point whose recall reaches the level; 0
       where none does); AP is the mean of those 101 values (COCO's interpolated AP).

    Empty: 1.0 when neither map has instances (COCO reports -1, "undefined"), 0.0 when only one has.
    Works for 2D and 3D maps (boolean masks get 8/26-connected components).
    """
    o = Overlaps.of(predicted, truth, connectivity)
    return ranked_average_precision(o, iou_threshold, None if scores is None else _scores_by_new_id(predicted, scores))


def ranked_average_precision(o: Overlaps, iou_threshold: float = 0.75, score: np.ndarray | None = None
                             ) -> AveragePrecision:
    """:func:`average_precision` of the instances in ``o``, predictions ranked by ``score`` (one per
    predicted id 1..n) or by size."""
    best_iou = np.zeros(o.num_predicted + 1)
    np.maximum.at(best_iou, o.predicted_id, o.iou)
    is_tp = best_iou[1:] >= min(iou_threshold, 1 - 1e-10)
    tp = int(np.count_nonzero(is_tp))
    counts = (iou_threshold, tp, o.num_predicted - tp, o.num_true - tp)
    if o.num_true == 0 or o.num_predicted == 0:
        return AveragePrecision(1.0 if o.num_true == o.num_predicted else 0.0, *counts)
    ids = np.arange(1, o.num_predicted + 1)
    score = o.predicted_area[1:].astype(np.float64) if score is None else np.asarray(score, np.float64)
    ranked = is_tp[np.lexsort((ids, -score))]
    tp_cumulative = np.cumsum(ranked)
    recall = tp_cumulative / o.num_true
    precision = tp_cumulative / np.arange(1, len(ranked) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
    sampled = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
    return AveragePrecision(float(sampled.mean()), *counts)


def overlap_counts(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Voxel counts of every (predicted id, true id) pair in two label blocks of one shape, ``K×3``
    uint64 (background 0 included, so the areas of both sides follow): what
    :meth:`Overlaps.from_counts` sums over a volume's blocks."""
    p_small, p_ids = _small_ids(predicted)
    t_small, t_ids = _small_ids(truth)
    codes = p_small.astype(np.int64).ravel() * len(t_ids) + t_small.astype(np.int64).ravel()
    pairs, voxels = np.unique(codes, return_counts=True)
    p, t = np.divmod(pairs, len(t_ids))
    return np.stack([p_ids[p], t_ids[t], voxels.astype(np.uint64)], axis=1).astype(np.uint64)


def _small_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` renumbered 0..n-1 in ascending order of their values, and the values (uint64)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    values = fastremap.unique(labels)
    small = fastremap.remap(labels, {int(v): i for i, v in enumerate(values.tolist())}, in_place=False)
    return small, values.astype(np.uint64)


def sum_overlap_counts(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Several :func:`overlap_counts` tables (``K×3``) summed into one, each pair once."""
    rows = np.concatenate([np.zeros((0, 3), np.uint64)] + [np.asarray(p, np.uint64).reshape(-1, 3) for p in parts])
    if not len(rows):
        return rows
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    rows = rows[order]
    starts = np.flatnonzero(np.concatenate([[True], (rows[1:, :2] != rows[:-1, :2]).any(axis=1)]))
    return np.concatenate([rows[starts, :2], np.add.reduceat(rows[:, 2], starts)[:, None]], axis=1)


def _scores_by_new_id(predicted: np.ndarray, scores: Mapping[int, float]) -> np.ndarray:
    """``scores`` (keyed by the ids in ``predicted``) ordered as :func:`as_instances` renumbers them."""
    predicted = np.asarray(predicted)
    if predicted.dtype == bool:
        raise ValueError("scores need an instance label map: a boolean mask has no instance ids to score")
    values = fastremap.unique(predicted)
    new_id_of = {int(v): i for i, v in enumerate(values[values != 0].tolist(), start=1)}
    missing = sorted(int(i) for i in new_id_of if i != 0 and int(i) not in scores)
    if missing:
        raise ValueError(f"scores lack predicted instance ids {missing[:10]}")
    ordered = np.zeros(len(new_id_of) - (0 in new_id_of))
    for old, new in new_id_of.items():
        if new != 0:
            ordered[new - 1] = scores[int(old)]
    return ordered
