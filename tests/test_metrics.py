"""Scores on hand-made masks whose values can be worked out on paper."""

import math

import numpy as np
import pytest

from retina_batch.metrics import (
    Confusion,
    evaluate_image,
    evaluate_mask,
    mean_scores,
    roc_auc,
    scores,
)


def masks():
    """4 vessel pixels in row 0, 3 of them found; 3 false alarms, one of them in row 3.

    fp != fn, inside and outside the region of `fov()`, so swapping them changes the scores.
    """
    truth = np.zeros((4, 5), bool)
    truth[0, :4] = True
    pred = np.zeros((4, 5), bool)
    pred[0, :3] = True
    pred[2, 3:] = True  # false alarms inside the FOV
    pred[3, 0] = True  # and one outside it
    return pred, truth


def fov():
    region = np.ones((4, 5), bool)
    region[3] = False  # rows 0-2: 15 pixels
    return region


def test_confusion_counts():
    pred, truth = masks()
    assert Confusion.of(pred, truth) == Confusion(tp=3, fp=3, fn=1, tn=13)
    assert Confusion.of(pred, truth, fov()) == Confusion(tp=3, fp=2, fn=1, tn=9)


def test_scores_by_hand():
    s = scores(Confusion.of(*masks()))
    assert s["dice"] == pytest.approx(6 / 10)
    assert s["iou"] == pytest.approx(3 / 7)
    assert s["sensitivity"] == pytest.approx(3 / 4)
    assert s["specificity"] == pytest.approx(13 / 16)
    assert s["accuracy"] == pytest.approx(16 / 20)


def test_region_restricts_the_count():
    pred, truth = masks()
    s = evaluate_mask(pred, truth, fov())
    assert s["dice"] == pytest.approx(6 / 10)
    assert s["fov_dice"] == pytest.approx(6 / 9)
    assert s["fov_iou"] == pytest.approx(3 / 6)
    assert s["fov_sensitivity"] == pytest.approx(3 / 4)
    assert s["fov_specificity"] == pytest.approx(9 / 11)
    assert s["fov_accuracy"] == pytest.approx(12 / 15)


def probabilities() -> np.ndarray:
    """A map that thresholds (at 0.5) to `masks()`: the missed vessel pixel at 0.3, the false
    alarms at 0.6 inside the FOV and 0.9 outside it, background 0.1."""
    prob = np.full((4, 5), 0.1)
    prob[0, :3], prob[0, 3] = 0.8, 0.3
    prob[2, 3:], prob[3, 0] = 0.6, 0.9
    return prob


def test_evaluate_image_scores_inside_the_fov_by_hand():
    _, truth = masks()
    s = evaluate_image(probabilities(), truth, 0.5, fov())
    assert s["dice"] == pytest.approx(6 / 10) and s["fov_dice"] == pytest.approx(6 / 9)
    assert s["sensitivity"] == pytest.approx(3 / 4) and s["fov_specificity"] == pytest.approx(
        9 / 11)
    # AUC: each positive against the negatives below it. Whole image, 16 negatives: the three
    # 0.8s beat 15 (not the 0.9), the 0.3 beats the 13 background pixels -> 58 of 64 pairs.
    assert s["auc"] == pytest.approx(58 / 64)
    # Inside the FOV, 11 negatives: 0.8s beat all 11, the 0.3 beats 9 -> 42 of 44 pairs.
    assert s["fov_auc"] == pytest.approx(42 / 44)


def test_empty_masks_agree_perfectly():
    empty = np.zeros((3, 3), bool)
    assert scores(Confusion.of(empty, empty)) == dict.fromkeys(
        ["dice", "iou", "sensitivity", "specificity", "accuracy"], 1.0)
    # No background at all (specificity's 0/0), and an empty region (accuracy's 0/0).
    full = np.ones((3, 3), bool)
    assert scores(Confusion.of(full, full))["specificity"] == 1.0
    assert scores(Confusion.of(full, empty, region=empty))["accuracy"] == 1.0


def test_threshold_is_inclusive_for_float_and_8_bit_maps():
    truth = np.array([True, False, True])
    # p == threshold is a vessel; an 8-bit level is compared as level / 255 (115 / 255 > 0.45).
    assert evaluate_image(np.array([0.5, 0.1, 0.9]), truth, 0.5)["dice"] == 1.0
    assert evaluate_image(np.array([115, 114, 200], np.uint8), truth, 0.45)["dice"] == 1.0


def test_auc_perfect_random_and_tied():
    truth = np.array([0, 0, 1, 1], bool)
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), truth) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), truth) == 0.0
    assert roc_auc(np.full(4, 0.5), truth) == 0.5
    # One positive ranked below one negative: 3 of 4 pairs ordered -> 0.75.
    assert roc_auc(np.array([0.1, 0.6, 0.5, 0.9]), truth) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)))
    # One vessel pixel, or one background pixel, is enough to rank.
    assert roc_auc(np.array([0.9, 0.1, 0.2]), np.array([1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0.9, 0.1, 0.8]), np.array([1, 0, 1], bool)) == 1.0


def test_auc_keeps_the_extreme_levels_apart():
    truth = np.array([True, False])
    assert roc_auc(np.array([1 / 255, 0.0]), truth) == 1.0  # levels 1 and 0
    assert roc_auc(np.array([1.0, 254 / 255]), truth) == 1.0  # levels 255 and 254
    # Values a little outside [0, 1] (another tool's maps, a runtime's rounding) are 0 or 1.
    assert roc_auc(np.array([1.01, -0.01]), truth) == 1.0
    assert roc_auc(np.array([1.01, 1.0, -0.01, 0.0]), np.array([1, 0, 1, 0], bool)) == 0.5


def pairwise_auc(values: np.ndarray, truth: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie), over every pair: the definition."""
    pos, neg = values[truth].astype(float), values[~truth].astype(float)
    pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return pairs / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_on_8_and_16_bit_maps_and_float():
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    prob = np.clip(rng.normal(0.5 + 0.2 * truth, 0.2), 0, 1)
    for levels in (np.rint(prob * 255).astype(np.uint8), np.rint(prob * 65535).astype(np.uint16)):
        assert roc_auc(levels, truth) == pytest.approx(pairwise_auc(levels, truth))
    # float maps: binned at 16 bits, so ties only where 16-bit levels tie
    assert roc_auc(prob, truth) == pytest.approx(pairwise_auc(np.rint(prob * 65535), truth))


def test_auc_ranks_faint_vessels_above_the_background():
    """Vessels the model barely sees (p < 1/510) still rank above a background at p ~ 0: what
    an 8-bit map (256 levels) cannot tell apart. It cost the shipped model ~0.003 AUC."""
    truth = np.array([True] * 10 + [False] * 90)
    prob = np.where(truth, 0.0015, 0.0001)
    assert roc_auc(prob, truth) == 1.0
    assert roc_auc(np.rint(prob * 65535).astype(np.uint16), truth) == 1.0
    assert roc_auc(np.rint(prob * 255).astype(np.uint8), truth) == 0.5  # all tied at level 0


def test_evaluate_image_thresholds_float_and_uint8_alike():
    pred, truth = masks()
    prob = np.where(pred, 0.8, 0.1).astype(np.float32)
    as_float = evaluate_image(prob, truth, 0.5)
    as_uint8 = evaluate_image((prob * 255).astype(np.uint8), truth, 0.5)
    assert as_float["dice"] == pytest.approx(6 / 10) == as_uint8["dice"]
    assert as_float["auc"] == pytest.approx(as_uint8["auc"])


def test_mean_scores_ignores_undefined_auc():
    rows = [{"dice": 0.5, "auc": float("nan")}, {"dice": 1.0, "auc": 0.9}]
    assert mean_scores(rows) == {"dice": 0.75, "auc": 0.9}
    assert mean_scores(rows[1:]) == {"dice": 1.0, "auc": 0.9}
    assert mean_scores([]) == {}
