"""The model shipped in the package, loaded as a user gets it: no --model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_segment import read_png, rows_of

from retina_batch.backends.base import default_model
from retina_batch.cli import main
from retina_batch.synth import synthesize


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(default_model().with_name("model.onnx.json").read_text())


def clearly(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose stored 8-bit probability (round(p x 255)) says on which side of
    `threshold` the unrounded p lies."""
    return np.abs(prob - threshold) > 0.5 / 255 + 1e-6


def test_masks_follow_the_card_threshold_and_the_threshold_option(card, tmp_path):
    """Both runs write the probability map; each mask must be that map thresholded at the
    threshold of its run, and the two masks differ exactly where threshold <= p < card's."""
    assert card["threshold"] == 0.45  # not 0.5: a fallback to 0.5 would change the masks
    image, _ = synthesize(300, 260, seed=3)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "eye.png"), image)
    masks, probs = {}, {}
    for name, extra in (("card", ()), ("option", ("--threshold", "0.3"))):
        out, prob = tmp_path / name, tmp_path / f"{name}-prob"
        result = CliRunner().invoke(main, ["segment", str(tmp_path / "in"), "--out", str(out),
                                           "--prob", str(prob), "-q", *extra])
        assert result.exit_code == 0, result.output
        masks[name] = read_png(out / "eye.png") > 0
        probs[name] = read_png(prob / "eye.png").astype(np.float32) / 255
        (row,) = rows_of(out / "metrics.csv")
        assert float(row["threshold"]) == (0.45 if name == "card" else 0.3)
    assert np.array_equal(probs["card"], probs["option"])  # the model does not change
    p = probs["card"]
    for name, threshold in (("card", 0.45), ("option", 0.3)):
        sure = clearly(p, threshold)
        assert np.array_equal(masks[name][sure], p[sure] >= threshold), name
    # Where both runs are sure, the 0.3 mask adds exactly the pixels with 0.3 <= p < 0.45.
    sure = clearly(p, 0.45) & clearly(p, 0.3)
    added = masks["option"] & ~masks["card"]
    assert np.array_equal(added[sure], ((p >= 0.3) & (p < 0.45))[sure])
    assert not (masks["card"] & ~masks["option"]).any()
    # The image has pixels in both bands, so each mistake shows: 0.5 instead of 0.45 (the
    # card's), 0.45 instead of 0.3 (the option ignored).
    assert np.count_nonzero(sure & (p > 0.45) & (p < 0.5)) >= 20
    assert np.count_nonzero(added[sure]) >= 100
