"""`segment --size` (canvas per photograph) and `--tta` (flip averaging), end to end."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_segment import read_png, rows_of
from tiny import TINY_SIZE, fundus_like, tiny_card, write_tiny_checkpoint

from retina_batch.card import write_json_atomic
from retina_batch.cli import main
from retina_batch.preprocess import AUTO_LARGE_SIDE, canvas_sizes, choose_canvas

pytest.importorskip("torch")


def test_auto_doubles_the_canvas_for_large_photographs_only():
    assert choose_canvas((AUTO_LARGE_SIDE - 1, 1000), 512, "auto") == 512
    assert choose_canvas((1000, AUTO_LARGE_SIDE), 512, "auto") == 768
    assert choose_canvas((3504, 2336), 512, 768) == 768
    assert canvas_sizes(512, "auto") == [512, 768] and canvas_sizes(512, 640) == [640]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint with its last layer scaled up: its probabilities then span
    ~0.06-0.8 instead of ~0.517 +- 0.002, so a change of canvas or TTA shows in 8-bit maps."""
    import torch

    weights = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-pt"))
    state = torch.load(weights, weights_only=False)
    state["state_dict"]["head.weight"] *= 300
    state["state_dict"]["head.bias"].zero_()
    torch.save(state, weights)
    write_json_atomic(weights.with_suffix(".json"), tiny_card(weights))
    return weights


@pytest.fixture()
def photos(tmp_path):
    """One small photograph and one whose longer side reaches AUTO_LARGE_SIDE."""
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "small.png"), fundus_like(200, 180, seed=1))
    cv2.imwrite(str(src / "large.jpg"), fundus_like(AUTO_LARGE_SIDE, 1600, seed=2))
    return src


def run(args):
    return CliRunner().invoke(main, ["segment", *map(str, args), "-q"])


def test_auto_puts_each_photograph_on_its_own_canvas(checkpoint, photos, tmp_path):
    out = tmp_path / "out"
    result = run([photos, "--out", out, "--backend", "torch", "--model", checkpoint])
    assert result.exit_code == 0, result.output
    canvas = {r["output"]: int(r["canvas"]) for r in rows_of(out / "metrics.csv")}
    assert canvas == {"small.png": TINY_SIZE, "large.png": 96}  # 1.5 x 64
    assert read_png(out / "large.png").shape == (1600, AUTO_LARGE_SIDE)


def test_a_fixed_size_changes_the_masks_and_is_checked_on_rerun(checkpoint, photos, tmp_path):
    out, out96 = tmp_path / "auto", tmp_path / "fixed"
    model = ["--backend", "torch", "--model", checkpoint]
    assert run([photos, "--out", out, "--prob", tmp_path / "p0", *model]).exit_code == 0
    assert run([photos, "--out", out96, "--prob", tmp_path / "p1", "--size", "96",
                *model]).exit_code == 0
    assert {int(r["canvas"]) for r in rows_of(out96 / "metrics.csv")} == {96}
    p0, p1 = read_png(tmp_path / "p0" / "small.png"), read_png(tmp_path / "p1" / "small.png")
    assert p0.shape == p1.shape == (180, 200)
    assert np.abs(p0.astype(int) - p1.astype(int)).max() > 2
    # The folder was made on a 96 px canvas: another canvas into it refuses.
    result = run([photos, "--out", out96, *model])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_a_fixed_size_graph_refuses_other_sizes_in_one_line(tiny_onnx, photos, tmp_path):
    result = run([photos, "--out", tmp_path / "o", "--model", tiny_onnx, "--size", "96"])
    assert result.exit_code == 2 and "re-export" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    # auto with a fixed-size graph uses the graph's size for every photograph.
    assert run([photos, "--out", tmp_path / "a", "--model", tiny_onnx]).exit_code == 0
    assert {int(r["canvas"]) for r in rows_of(tmp_path / "a" / "metrics.csv")} == {TINY_SIZE}


def test_bad_size_is_a_usage_error(photos, tmp_path):
    for size in ("big", "100"):
        result = run([photos, "--out", tmp_path / size, "--size", size])
        assert result.exit_code == 2, size
        assert "Traceback" not in result.output


def test_tta_changes_masks_and_is_recorded_in_the_folder(checkpoint, photos, tmp_path):
    model = ["--backend", "torch", "--model", checkpoint]
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    assert run([photos, "--out", plain, "--prob", tmp_path / "p0", *model]).exit_code == 0
    assert run([photos, "--out", tta, "--prob", tmp_path / "p1", "--tta", *model]).exit_code == 0
    # Random weights are not flip-symmetric: averaging the flips must change the map.
    p0, p1 = read_png(tmp_path / "p0" / "small.png"), read_png(tmp_path / "p1" / "small.png")
    assert np.abs(p0.astype(int) - p1.astype(int)).max() > 2
    result = run([photos, "--out", tta, *model])  # the same folder without --tta
    assert result.exit_code == 2 and "--overwrite" in result.output
