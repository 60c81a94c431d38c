"""The model shipped inside the package, loaded as a user gets it (no --model): its card, ONNX
Runtime opening it, the threshold its masks follow, and its masks on real photographs (the
only model users get without training one)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_segment import read_png, rows_of

import retina_batch
from retina_batch.backends import open_backend
from retina_batch.backends.base import default_model
from retina_batch.card import load_card, sha256
from retina_batch.cli import main
from retina_batch.io import read_probability
from retina_batch.synth import synthesize

# One copy of each of four DRIVE photographs (N // 4 = 2, 4, 6, 19): the recipe's validation
# photographs, in the shipped model's training set since its final run on every photograph
# (train/default/README.md; the recipe's held-out scores are in train/experiments/).
PHOTOGRAPHS = ("8", "17", "26", "77")
TRAINED_ON = {f"retina-blood-vessel/{n}" for n in range(80)} | \
    {f"les-av/{stem}" for stem in ("37", "119", "318", "486")}  # a sample of the card's names


def test_shipped_card_describes_the_shipped_weights():
    model = default_model()
    card = load_card(model)
    assert model.is_file() and card["weights"] == model.name
    assert card["sha256"] == sha256(model) == card["export"]["onnx_sha256"]
    # the final run: every photograph of both folders, nothing held out, the last epoch
    assert TRAINED_ON <= set(card["training"]["images_train"])
    assert card["training"]["images_val"] == [] and "dice" not in card["validation"]
    assert card["training"]["epoch"] == card["training"]["recipe"]["epochs"]


def test_onnxruntime_opens_the_shipped_model_by_default():
    # no --model: the shipped one, fp32 or (on a CPU with VNNI/AMX) its int8 file beside it
    from retina_batch.backends.precision import cpu_int8_support

    with open_backend("onnxruntime", batch_size=2) as runner:
        int8 = cpu_int8_support()[0]
        assert runner.model_path == default_model().with_name(
            "model.int8.onnx" if int8 else "model.onnx")
        assert runner.describe()["precision"] == ("int8" if int8 else "fp32")
        assert runner.size == load_card(default_model())["working_size"]
        rng = np.random.default_rng(0)
        probs = runner.infer(rng.integers(0, 256, (2, runner.size, runner.size, 3), np.uint8))
    assert probs.shape == (2, runner.size, runner.size) and probs.dtype == np.float32
    assert 0 <= probs.min() and probs.max() <= 1


def test_shipped_model_finds_the_vessels_of_real_photographs(shared_data, tmp_path):
    """The shipped files through the whole pipeline on four DRIVE photographs (in its training
    set: this checks the files and the pipeline, not how well the model generalises)."""
    data = shared_data / "retina-blood-vessel" / "train"
    for folder in ("image", "mask"):
        (tmp_path / folder).mkdir()
        for key in PHOTOGRAPHS:
            if not (data / folder / f"{key}.png").exists():
                pytest.skip(f"{data / folder / key}.png is absent")
            shutil.copy(data / folder / f"{key}.png", tmp_path / folder)
    summary = retina_batch.segment(tmp_path / "image", tmp_path / "out",
                                   truth_dir=tmp_path / "mask", batch_size=2)
    assert summary["counts"]["ok"] == len(PHOTOGRAPHS) == summary["truth_images"]
    assert summary["truth_means"]["dice"] > 0.77
    assert summary["truth_means"]["auc"] > 0.97
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        dice = {row["path"]: float(row["dice"]) for row in csv.DictReader(f)}
    assert min(dice.values()) > 0.75, dice


CARD_THRESHOLD = 0.45  # not 0.5: a fallback to 0.5 would change the masks


@pytest.fixture
def model_with_threshold(tmp_path) -> Path:
    """The shipped fp32 weights under a card whose threshold is CARD_THRESHOLD, whatever the
    shipped card says (retraining moves it, and 0.5 would hide a fallback to 0.5)."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(default_model(), folder / "model.onnx")
    card = load_card(default_model())
    (folder / "model.onnx.json").write_text(json.dumps({**card, "threshold": CARD_THRESHOLD}))
    return folder / "model.onnx"


def clearly(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose stored 16-bit probability (round(p x 65535)) says on which side of
    `threshold` the unrounded p lies."""
    return np.abs(prob - threshold) > 0.5 / 65535 + 1e-6


def test_masks_follow_the_card_threshold_and_the_threshold_option(model_with_threshold,
                                                                  tmp_path):
    """Both runs write the probability map; each mask must be that map thresholded at the
    threshold of its run, and the two masks differ exactly where threshold <= p < card's."""
    image, _ = synthesize(300, 260, seed=3)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "eye.png"), image)
    masks, probs = {}, {}
    for name, extra in (("card", ()), ("option", ("--threshold", "0.3"))):
        out, prob = tmp_path / name, tmp_path / f"{name}-prob"
        args = ["segment", str(tmp_path / "in"), "--out", str(out), "--prob", str(prob),
                "--model", str(model_with_threshold), "-q", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        masks[name] = read_png(out / "eye.png") > 0
        read_png(prob / "eye.png")  # complete
        probs[name] = read_probability(prob / "eye.png")
        (row,) = rows_of(out / "metrics.csv")
        assert float(row["threshold"]) == (CARD_THRESHOLD if name == "card" else 0.3)
    assert np.array_equal(probs["card"], probs["option"])  # the model does not change
    p = probs["card"]
    for name, threshold in (("card", CARD_THRESHOLD), ("option", 0.3)):
        sure = clearly(p, threshold)
        assert np.array_equal(masks[name][sure], p[sure] >= threshold), name
    # Where both runs are sure, the 0.3 mask adds exactly the pixels with 0.3 <= p < CARD_THRESHOLD.
    sure = clearly(p, CARD_THRESHOLD) & clearly(p, 0.3)
    added = masks["option"] & ~masks["card"]
    assert np.array_equal(added[sure], ((p >= 0.3) & (p < CARD_THRESHOLD))[sure])
    assert not (masks["card"] & ~masks["option"]).any()
    # The image has pixels in both bands, so each mistake shows: 0.5 instead of the
    # card's, the card's instead of 0.3 (the option ignored).
    assert np.count_nonzero(sure & (p > CARD_THRESHOLD) & (p < 0.5)) >= 20
    assert np.count_nonzero(added[sure]) >= 100
