"""The model shipped inside the package: its card, ONNX Runtime opening it, and its masks on
held-out photographs (the only model users get without training one)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

import retina_batch
from retina_batch.backends import open_backend
from retina_batch.backends.base import default_model
from retina_batch.card import load_card, sha256

# Validation photographs of the shipped model's training run (its card lists them): one copy
# of each of four DRIVE photographs (N // 4 = 2, 4, 6, 19) that it never trained on.
HELD_OUT = ("8", "17", "26", "77")


def test_shipped_card_describes_the_shipped_weights():
    model = default_model()
    card = load_card(model)
    assert model.is_file() and card["weights"] == model.name
    assert card["sha256"] == sha256(model) == card["export"]["onnx_sha256"]
    assert set(HELD_OUT) <= set(card["training"]["images_val"])
    assert not set(HELD_OUT) & set(card["training"]["images_train"])


def test_onnxruntime_opens_the_shipped_model_by_default():
    with open_backend("onnxruntime", batch_size=2) as runner:  # no --model: the shipped one
        assert runner.model_path == default_model()
        assert runner.size == load_card(default_model())["working_size"]
        rng = np.random.default_rng(0)
        probs = runner.infer(rng.integers(0, 256, (2, runner.size, runner.size, 3), np.uint8))
    assert probs.shape == (2, runner.size, runner.size) and probs.dtype == np.float32
    assert 0 <= probs.min() and probs.max() <= 1


def test_shipped_model_finds_the_vessels_of_held_out_photographs(shared_data, tmp_path):
    """Measured Dice 0.78-0.81 (mean 0.795) against the manual annotations."""
    data = shared_data / "retina-blood-vessel" / "train"
    for folder in ("image", "mask"):
        (tmp_path / folder).mkdir()
        for key in HELD_OUT:
            if not (data / folder / f"{key}.png").exists():
                pytest.skip(f"{data / folder / key}.png is absent")
            shutil.copy(data / folder / f"{key}.png", tmp_path / folder)
    summary = retina_batch.segment(tmp_path / "image", tmp_path / "out",
                                   truth_dir=tmp_path / "mask", batch_size=2)
    assert summary["counts"]["ok"] == len(HELD_OUT) == summary["truth_images"]
    assert summary["truth_means"]["dice"] > 0.77
    assert summary["truth_means"]["auc"] > 0.97
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        dice = {row["path"]: float(row["dice"]) for row in csv.DictReader(f)}
    assert min(dice.values()) > 0.75, dice
