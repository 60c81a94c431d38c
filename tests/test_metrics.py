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
    truth = np.zeros((4, 5), bool)
    truth[0, :4] = True  # 4 vessel pixels
    pred = np.zeros((4, 5), bool)
    pred[0, :3] = True  # 3 of them found
    pred[3, 0] = True  # and 1 false alarm
    return pred, truth


def test_confusion_counts():
    pred, truth = masks()
    assert Confusion.of(pred, truth) == Confusion(tp=3, fp=1, fn=1, tn=15)


def test_scores_by_hand():
    s = scores(Confusion.of(*masks()))
    assert s["dice"] == pytest.approx(6 / 8)
    assert s["iou"] == pytest.approx(3 / 5)
    assert s["sensitivity"] == pytest.approx(3 / 4)
    assert s["specificity"] == pytest.approx(15 / 16)
    assert s["accuracy"] == pytest.approx(18 / 20)


def test_region_restricts_the_count():
    pred, truth = masks()
    region = np.ones_like(truth)
    region[3] = False  # the false alarm lies outside
    s = evaluate_mask(pred, truth, region)
    assert s["fov_dice"] == pytest.approx(6 / 7)
    assert s["dice"] == pytest.approx(6 / 8)


def test_empty_masks_agree_perfectly():
    empty = np.zeros((3, 3), bool)
    assert scores(Confusion.of(empty, empty))["dice"] == 1.0


def test_auc_perfect_random_and_tied():
    truth = np.array([0, 0, 1, 1], bool)
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), truth) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), truth) == 0.0
    assert roc_auc(np.full(4, 0.5), truth) == 0.5
    # One positive ranked below one negative: 3 of 4 pairs ordered -> 0.75.
    assert roc_auc(np.array([0.1, 0.6, 0.5, 0.9]), truth) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)))


def test_auc_matches_pairwise_definition_on_uint8_maps():
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    prob = np.clip(rng.normal(0.5 + 0.2 * truth, 0.2), 0, 1)
    levels = np.rint(prob * 255).astype(np.uint8)
    pos, neg = levels[truth].astype(int), levels[~truth].astype(int)
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
    expected = pairwise / (len(pos) * len(neg))
    assert roc_auc(levels, truth) == pytest.approx(expected)
    assert roc_auc(prob, truth) == pytest.approx(expected)


def test_evaluate_image_thresholds_float_and_uint8_alike():
    pred, truth = masks()
    prob = np.where(pred, 0.8, 0.1).astype(np.float32)
    as_float = evaluate_image(prob, truth, 0.5)
    as_uint8 = evaluate_image((prob * 255).astype(np.uint8), truth, 0.5)
    assert as_float["dice"] == pytest.approx(6 / 8) == as_uint8["dice"]
    assert as_float["auc"] == pytest.approx(as_uint8["auc"])


def test_mean_scores_ignores_undefined_auc():
    rows = [{"dice": 0.5, "auc": float("nan")}, {"dice": 1.0, "auc": 0.9}]
    assert mean_scores(rows) == {"dice": 0.75, "auc": 0.9}
