"""Metrics against values computed by hand on tiny arrays (drawings: rows y, columns x)."""

from __future__ import annotations

import numpy as np
import pytest

from volseg.evaluation.metrics import (
    Confusion,
    Overlaps,
    aggregated_jaccard,
    average_precision,
    connected_instances,
    panoptic_quality,
    total,
)


def grid(rows: list[str]) -> np.ndarray:
    """A 2D label map drawn with characters: '.' is 0, a digit is that instance id."""
    return np.array([[0 if c == "." else int(c) for c in row] for row in rows], dtype=np.uint16)


# --- foreground ------------------------------------------------------------------------------------------


def test_confusion_dice_iou_by_hand():
    c = Confusion.of(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)
    assert c.dice == pytest.approx(0.5) and c.iou == pytest.approx(1 / 3)
    assert total([c, c]) == Confusion(2, 2, 2, 2)


def test_confusion_empty_cases():
    nothing = np.zeros(4, bool)
    something = np.array([0, 1, 0, 0], bool)
    assert Confusion.of(nothing, nothing).empty
    assert Confusion.of(nothing, nothing).dice == 1.0 and Confusion.of(nothing, nothing).iou == 1.0
    assert Confusion.of(something, nothing).dice == 0.0 and Confusion.of(nothing, something).iou == 0.0


# --- instances -------------------------------------------------------------------------------------------


def test_connected_instances_connectivity_and_min_size():
    mask = grid(["1...",
                 ".1..",
                 "...1",
                 "...1"]) > 0
    assert connected_instances(mask).max() == 2               # 8-connected: the diagonal pair is one
    assert connected_instances(mask, connectivity=4).max() == 3
    kept = connected_instances(mask, min_size_vx=2, connectivity=4)
    assert kept.max() == 1 and np.count_nonzero(kept) == 2    # only the vertical pair survives, as id 1


def test_overlaps_pairs():
    truth = grid(["11..",
                  "11.2"])
    pred = grid(["1...",
                 "1.22"])
    o = Overlaps.of(pred, truth)
    assert o.true_id.tolist() == [1, 2] and o.predicted_id.tolist() == [1, 2]
    assert o.intersection.tolist() == [2, 1] and o.union.tolist() == [4, 2]


# Truth G1, G2 (4 voxels each); prediction S1 ⊃ G1 (6 voxels), S2 = half of G2, S3 a lone voxel.
TRUTH = grid(["11..22",
              "11..22",
              "......",
              "......"])
PRED = grid(["111.22",
             "111...",
             "......",
             "3....."])


def test_aji_by_hand():
    # G1↔S1: ∩ 4, ∪ 6;  G2↔S2: ∩ 2, ∪ 4;  S3 never matched adds 1:  AJI = (4 + 2) / (6 + 4 + 1)
    assert aggregated_jaccard(PRED, TRUTH) == pytest.approx(6 / 11)
    assert aggregated_jaccard(PRED > 0, TRUTH > 0) == pytest.approx(6 / 11)   # components of masks


def test_aji_counts_a_merging_prediction_once_per_truth():
    truth = grid(["11.22",
                  "11.22"])
    merged = np.ones((2, 5), bool)
    # Kumar's AJI: S matches G1 and G2, its union enters twice: (4 + 4) / (10 + 10)
    assert aggregated_jaccard(merged, truth > 0) == pytest.approx(0.4)


def test_aji_ties_take_the_lowest_predicted_id():
    truth = grid(["1111",
                  "1111"])
    pred = grid(["1122",
                 "1122"])       # a label map: touching instances stay apart
    # IoU 0.5 with both; S1 is the match, S2 is unused:  4 / (8 + 4)
    assert aggregated_jaccard(pred, truth) == pytest.approx(1 / 3)


def test_pq_by_hand():
    pq = panoptic_quality(PRED, TRUTH)
    # S1↔G1 IoU 2/3 matches; S2↔G2 IoU exactly 0.5 does not (> 0.5 needed)
    assert (pq.tp, pq.fp, pq.fn) == (1, 2, 1)
    assert pq.sq == pytest.approx(2 / 3)
    assert pq.rq == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))
    assert pq.pq == pytest.approx((2 / 3) / 2.5)


def test_instance_metrics_empty_cases():
    empty = np.zeros_like(TRUTH)
    assert aggregated_jaccard(empty, empty) == 1.0
    assert aggregated_jaccard(PRED, empty) == 0.0 and aggregated_jaccard(empty, TRUTH) == 0.0
    both_empty = panoptic_quality(empty, empty)
    assert (both_empty.pq, both_empty.sq, both_empty.rq) == (1.0, 1.0, 1.0)
    missed = panoptic_quality(empty, TRUTH)
    assert (missed.tp, missed.fp, missed.fn, missed.pq, missed.sq, missed.rq) == (0, 0, 2, 0.0, 0.0, 0.0)
    assert panoptic_quality(PRED, empty).fp == 3 and panoptic_quality(PRED, empty).pq == 0.0


# --- AP at IoU 0.75 (3D) -----------------------------------------------------------------------------------


def cubes() -> np.ndarray:
    """Truth: two 2×2×2 cubes, T1 at x 0-1 and T2 at x 4-5."""
    truth = np.zeros((2, 6, 6), np.uint8)
    truth[:, 0:2, 0:2] = 1
    truth[:, 0:2, 4:6] = 2
    return truth


def test_ap75_ranked_by_size():
    truth = cubes()
    pred = np.zeros_like(truth)
    pred[:, 0:2, 0:2] = 1          # = T1 (8 voxels, IoU 1: TP)
    pred[:, 0:2, 4:5] = 2          # half of T2 (4 voxels, IoU 0.5: FP)
    ap = average_precision(pred, truth)
    # ranked [TP, FP]: recall (0.5, 0.5), precision (1, 0.5) → precision 1 at the 51 recall levels
    # 0 … 0.5, 0 at the 50 above
    assert ap.ap == pytest.approx(51 / 101)
    assert (ap.tp, ap.fp, ap.fn, ap.precision, ap.recall) == (1, 1, 1, 0.5, 0.5)


def test_ap75_a_larger_false_positive_ranks_first_unless_scored():
    truth = cubes()
    pred = np.zeros_like(truth)
    pred[:, 0:2, 0:2] = 7          # = T1 (8 voxels)
    pred[:, 3:6, 0:3] = 3          # 18 voxels of nothing
    # ranked [FP, TP]: precision (0, 0.5) → envelope 0.5 at recall levels 0 … 0.5
    assert average_precision(pred, truth).ap == pytest.approx(0.5 * 51 / 101)
    scored = average_precision(pred, truth, scores={7: 0.9, 3: 0.1})
    assert scored.ap == pytest.approx(51 / 101)
    with pytest.raises(ValueError, match="lack"):
        average_precision(pred, truth, scores={7: 0.9})


def test_ap75_threshold_is_inclusive():
    truth = np.zeros((1, 1, 5), np.uint8)
    truth[0, 0, 0:4] = 1
    pred = np.zeros_like(truth)
    pred[0, 0, 0:3] = 1            # IoU 3/4 exactly
    assert average_precision(pred, truth).ap == pytest.approx(1.0)
    assert average_precision(pred, truth, iou_threshold=0.8).ap == 0.0


def test_ap75_boolean_masks_are_26_connected():
    truth = np.zeros((2, 2, 2), bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True     # corner-touching: one instance
    assert average_precision(truth, truth).tp == 1


def test_ap75_empty_cases():
    truth = cubes()
    empty = np.zeros_like(truth)
    assert average_precision(empty, empty).ap == 1.0
    missed = average_precision(empty, truth)
    assert (missed.ap, missed.fn, missed.precision, missed.recall) == (0.0, 2, 0.0, 0.0)
    spurious = average_precision(truth, empty)
    assert (spurious.ap, spurious.fp, spurious.precision) == (0.0, 2, 0.0)


def test_read_only_inputs():
    """Arrays from Ray's object store are read-only; cc3d refused them (found by the Ray eval test)."""
    pred, truth = PRED.copy(), TRUTH.copy()
    for array in (pred, truth):
        array.flags.writeable = False
    assert aggregated_jaccard(pred > 0, truth > 0) == pytest.approx(6 / 11)
    assert aggregated_jaccard(pred, truth) == pytest.approx(6 / 11)
    masks = [np.asarray(a > 0) for a in (pred, truth)]
    for mask in masks:
        mask.flags.writeable = False
    assert panoptic_quality(*masks).tp == 1 and average_precision(*masks).fn == 2
