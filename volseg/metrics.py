"""Segmentation metrics, computable in a stream of blocks (counts add up across blocks)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


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
    result = Confusion()
    for c in confusions:
        result = result + c
    return result


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return Confusion.of(predicted, truth).dice


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    return Confusion.of(predicted, truth).iou
