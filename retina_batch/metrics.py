"""Segmentation scores for binary vessel masks and probability maps.

All scores come from one confusion count so they can never disagree with each other. ROC AUC is
computed from a histogram of the probabilities with one bin per level of a 16-bit map (`segment
--prob` writes 16-bit PNGs): exact for such maps and for 8-bit ones (ties counted half), within
~1e-5 of the float maps', and O(pixels) rather than a sort. 256 bins (8-bit maps, as written
before) cost the shipped model ~0.003 ROC AUC on DRIVE: the background and the faintest vessels
share the lowest levels (train/default/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AUC_BINS = 65536  # a uint16 map's levels
# Stored probability maps: p = level / scale.
PROB_SCALE = {np.uint8: 255, np.uint16: 65535}


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, pred: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None):
        pred, truth = pred.astype(bool), truth.astype(bool)
        if region is not None:
            region = region.astype(bool)
            pred, truth = pred[region], truth[region]
        tp = int(np.count_nonzero(pred & truth))
        fp = int(np.count_nonzero(pred & ~truth))
        fn = int(np.count_nonzero(~pred & truth))
        return cls(tp, fp, fn, int(pred.size) - tp - fp - fn)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                         self.tn + other.tn)


def _ratio(num: float, den: float, empty: float) -> float:
    """num/den, or `empty` when the denominator is zero (e.g. Dice of two empty masks is 1)."""
    return num / den if den else empty


def scores(c: Confusion) -> dict[str, float]:
    total = c.tp + c.fp + c.fn + c.tn
    return {
        "dice": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, 1.0),
        "iou": _ratio(c.tp, c.tp + c.fp + c.fn, 1.0),
        "sensitivity": _ratio(c.tp, c.tp + c.fn, 1.0),
        "specificity": _ratio(c.tn, c.tn + c.fp, 1.0),
        "accuracy": _ratio(c.tp + c.tn, total, 1.0),
    }


def roc_auc(prob: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> float:
    """Area under the ROC curve of probabilities (float in [0, 1], uint8 or uint16 levels)
    against a mask.

    NaN when the region holds only one class (AUC is undefined there).
    """
    if prob.dtype in (np.uint8, np.uint16):
        levels = prob.astype(np.int64)
    else:
        levels = np.clip(np.rint(prob * (AUC_BINS - 1)), 0, AUC_BINS - 1).astype(np.int64)
    truth = truth.astype(bool)
    if region is not None:
        region = region.astype(bool)
        levels, truth = levels[region], truth[region]
    pos = np.bincount(levels[truth], minlength=AUC_BINS).astype(np.float64)
    neg = np.bincount(levels[~truth], minlength=AUC_BINS).astype(np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # P(score_pos > score_neg) + 0.5 P(equal): for each positive level, negatives strictly below.
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def evaluate_image(prob: np.ndarray, truth: np.ndarray, threshold: float,
                   fov: np.ndarray | None = None) -> dict[str, float]:
    """Scores of one probability map, over the whole image and inside the FOV."""
    pred = prob >= (threshold * PROB_SCALE[prob.dtype.type] if prob.dtype.type in PROB_SCALE
                    else threshold)
    out = scores(Confusion.of(pred, truth))
    out["auc"] = roc_auc(prob, truth)
    if fov is not None:
        inside = scores(Confusion.of(pred, truth, fov))
        out.update({f"fov_{k}": v for k, v in inside.items()})
        out["fov_auc"] = roc_auc(prob, truth, fov)
    return out


def evaluate_mask(pred: np.ndarray, truth: np.ndarray,
                  fov: np.ndarray | None = None) -> dict[str, float]:
    """Scores of a binary mask (no AUC: a mask has no ranking)."""
    out = dict(scores(Confusion.of(pred, truth)))
    if fov is not None:
        out.update({f"fov_{k}": v for k, v in scores(Confusion.of(pred, truth, fov)).items()})
    return out


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over images, ignoring NaN (undefined AUCs)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], float | int)] if rows else []
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}


__all__ = ["Confusion", "scores", "roc_auc", "evaluate_image", "evaluate_mask", "mean_scores"]
