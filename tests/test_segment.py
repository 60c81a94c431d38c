"""`retina-batch segment` end to end: outputs, resume, interrupts, bad files, exit codes, scores.

Most runs use the tiny ONNX model (64-pixel canvas) through the real CLI; geometry checks use a
fake backend whose "probability" is a colour channel of the canvas, so the expected mask is
known exactly; kill tests run the command in a subprocess.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from kill_resume import masks_written
from tiny import TINY_SIZE, fundus_like

import retina_batch
from retina_batch.cli import main
from retina_batch.io import read_probability
from retina_batch.metrics import roc_auc
from retina_batch.pipeline import Options, Pipeline

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"


# --- helpers -----------------------------------------------------------------------------

def write(path: Path, image: np.ndarray, params=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(Path(path).suffix.lower(), image, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def segment_cli(model: Path, source, out, *args: str, workers: int = 2):
    result = CliRunner().invoke(main, ["segment", str(source), "--out", str(out),
                                       "--model", str(model), "--workers", str(workers), *args])
    assert "Traceback" not in result.output, result.output
    return result


def rows_of(metrics: Path) -> list[dict]:
    with open(metrics, newline="") as f:
        return list(csv.DictReader(f))


def read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END), f"incomplete {path}"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def assert_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit single-channel 0/255 PNG of (width, height) `size`."""
    mask = read_png(path)
    assert mask.dtype == np.uint8 and mask.ndim == 2, (path, mask.dtype, mask.shape)
    assert (mask.shape[1], mask.shape[0]) == size, (path, mask.shape, size)
    assert set(np.unique(mask)) <= {0, 255}, path
    return mask


def files_under(folder: Path) -> list[str]:
    """Files under `folder`, the ledger's own folder (.retina-batch) left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".retina-batch" not in p.relative_to(folder).parts)


# Every format and layout the issue lists, at awkward sizes: (relative path, BGR-ish image).
def format_zoo() -> dict[str, np.ndarray]:
    rgb = fundus_like(101, 77, seed=1)
    return {
        "rgb.png": rgb,
        "upper/CASE.PNG": fundus_like(64, 64, seed=2),
        "upper/photo.JPEG": fundus_like(333, 251, seed=3),
        "deep/er/still/tiny.png": fundus_like(3, 2),
        "deep/one_pixel.bmp": np.full((1, 1, 3), 90, np.uint8),
        "gray.pgm": fundus_like(97, 61, seed=4)[:, :, 2],
        "colour.ppm": fundus_like(61, 97, seed=5),
        "rgba.png": cv2.cvtColor(fundus_like(80, 50, seed=6), cv2.COLOR_BGR2BGRA),
        "sixteen.tif": fundus_like(70, 90, seed=7).astype(np.uint16) * 257,
        "sixteen_gray.png": fundus_like(45, 39, seed=8)[:, :, 1].astype(np.uint16) * 257,
        "eight.TIF": fundus_like(57, 41, seed=9),
        "photo.gif": fundus_like(66, 44, seed=10),
        "wide.jpg": fundus_like(1000, 17, seed=11),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("zoo")
    for rel, image in format_zoo().items():
        write(src / rel, image)
    return src


# --- outputs -----------------------------------------------------------------------------

def test_every_format_and_size_gives_full_size_outputs_in_a_mirrored_tree(
        tiny_onnx, zoo, tmp_path):
    out, prob, over = tmp_path / "masks", tmp_path / "prob", tmp_path / "over"
    result = segment_cli(tiny_onnx, zoo, out, "--prob", str(prob), "--overlay", str(over), "-q")
    assert result.exit_code == 0, result.output
    inputs = format_zoo()
    masks = sorted(str(Path(rel).with_suffix(".png")) for rel in inputs)
    assert files_under(out) == sorted(masks + ["metrics.csv", "report.html", "summary.json"])
    assert files_under(prob) == masks
    assert files_under(over) == sorted(str(Path(r).with_suffix(".jpg")) for r in inputs)
    rows = {r["path"]: r for r in rows_of(out / "metrics.csv")}
    for rel, image in inputs.items():
        size = (image.shape[1], image.shape[0])
        name = Path(rel).with_suffix(".png")
        mask = assert_mask(out / name, size)
        levels = read_png(prob / name)
        assert levels.dtype == np.uint16 and levels.shape == mask.shape
        overlay = cv2.imread(str(over / Path(rel).with_suffix(".jpg")))
        assert overlay.shape[:2] == mask.shape
        row = rows[str(zoo / rel)]
        assert row["status"] == "ok" and row["output"] == str(name)
        assert (int(row["width"]), int(row["height"])) == size
        assert int(row["fov_area"]) > 0
        assert float(row["vessel_fraction"]) == pytest.approx(
            np.count_nonzero(mask) / int(row["fov_area"]), abs=1e-4)
        for stage in ("decode_s", "preprocess_s", "infer_s", "postprocess_s", "measure_s",
                      "write_s"):
            assert float(row[stage]) >= 0
    assert len(rows) == len(inputs)


def test_summary_records_the_run(tiny_onnx, zoo, tmp_path):
    out = tmp_path / "out"
    result = segment_cli(tiny_onnx, zoo, out, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    n = len(format_zoo())
    rows = rows_of(out / "metrics.csv")
    # The summary's tally must agree with the rows it summarises, and the rows with the images:
    # a 1-pixel or 3x2 image has no field of view, a fundus-like photograph does.
    without = {Path(r["path"]).name for r in rows if r["fov_found"] == "False"}
    assert {"tiny.png", "one_pixel.bmp"} <= without
    assert not without & {"rgb.png", "photo.JPEG", "colour.ppm"}
    no_fov = len(without)
    assert summary["counts"] == {"ok": n, "error": 0, "skipped": 0, "no_fov": no_fov,
                                 "processed": n}
    assert summary["folder"] == {"done": n, "failed": 0, "pending": 0}
    assert summary["inputs"] == n
    assert summary["failures"] == [] and summary["interrupted"] is False
    assert summary["images_per_second"] * summary["wall_seconds"] == pytest.approx(n, rel=0.05)
    assert summary["backend"]["backend"] == "onnxruntime"
    # The card's hash is the card file's; the model's is the weights file's.
    card = Path(str(tiny_onnx) + ".json")
    assert summary["model_card_sha256"] == hashlib.sha256(card.read_bytes()).hexdigest()
    assert summary["model_sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert summary["threshold"] == json.loads(card.read_text())["threshold"]
    assert summary["versions"]["retina-batch"] == retina_batch.__version__
    assert {"python", "numpy", "opencv", "onnxruntime"} <= set(summary["versions"])
    assert summary["started"] <= summary["ended"]
    assert set(summary["mean_stage_seconds"]) == {
        "decode_s", "preprocess_s", "infer_s", "postprocess_s", "measure_s", "write_s"}


def test_python_api_returns_the_summary(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(90, 70))
    summary = retina_batch.segment(src, tmp_path / "out", model=tiny_onnx, workers=1)
    assert summary["counts"]["ok"] == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(
        json.dumps(summary))
    assert_mask(tmp_path / "out" / "a.png", (90, 70))


def test_quiet_run_prints_nothing(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(90, 70))
    result = segment_cli(tiny_onnx, src, tmp_path / "out", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_list_file_input_mirrors_paths_relative_to_the_list(tiny_onnx, tmp_path):
    data = tmp_path / "data"
    write(data / "clinic_a" / "1.png", fundus_like(70, 60))
    write(data / "clinic_b" / "1.JPG", fundus_like(71, 61))
    (data / "todo.csv").write_text("id,path\nx,clinic_a/1.png\ny,clinic_b/1.JPG\n")
    metrics = tmp_path / "records" / "run1.csv"
    result = segment_cli(tiny_onnx, data / "todo.csv", tmp_path / "out", "-q",
                         "--metrics", str(metrics))
    assert result.exit_code == 0, result.output
    assert [r["output"] for r in rows_of(metrics)] == ["clinic_a/1.png", "clinic_b/1.png"]
    assert not (tmp_path / "out" / "metrics.csv").exists()
    assert_mask(tmp_path / "out" / "clinic_a" / "1.png", (70, 60))
    assert_mask(tmp_path / "out" / "clinic_b" / "1.png", (71, 61))


def test_single_image_input(tiny_onnx, tmp_path):
    image = write(tmp_path / "Eye.TIFF", fundus_like(123, 45))
    result = segment_cli(tiny_onnx, image, tmp_path / "out")
    assert result.exit_code == 0, result.output
    # The summary table is the command's result (stdout: `segment ... > log` keeps it); the
    # model line and the progress are for the person watching (stderr).
    assert "images done" in result.stdout and "backend" not in result.stdout
    assert "backend onnxruntime" in result.stderr and "images done" not in result.stderr
    assert_mask(tmp_path / "out" / "Eye.png", (123, 45))


def test_output_folder_inside_the_input_is_not_read_back(tiny_onnx, tmp_path):
    src = tmp_path / "images"
    write(src / "a.png", fundus_like(80, 60))
    for _ in range(2):
        result = segment_cli(tiny_onnx, src, src / "masks", "--prob", str(src / "prob"),
                             "--json")
        assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["processed"] == 0
    assert files_under(src) == ["a.png", "masks/a.png", "masks/metrics.csv",
                                "masks/report.html", "masks/summary.json", "prob/a.png"]


# --- geometry with a backend whose output is known ---------------------------------------

class RedChannelBackend:
    """'Vessel probability' = the red channel of the canvas: the mask is predictable."""

    name, size, threshold, batch_size = "fake", TINY_SIZE, 0.5, 3
    card = {"sha256": "fake"}

    def submit(self, batch: np.ndarray) -> Future:
        assert batch.dtype == np.uint8 and batch.shape[1:] == (self.size, self.size, 3)
        future: Future = Future()
        future.set_result(batch[..., 0].astype(np.float32) / 255)
        return future

    def describe(self) -> dict:
        return {"backend": self.name, "model": "none"}


def half_red_fundus(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A BGR disc, red on its left half only (a horizontal ramp across the middle), and the
    mask a correct pipeline must produce from it with RedChannelBackend."""
    x = np.arange(width, dtype=np.float32)
    ramp = np.clip(128 + (width / 2 - x) * (256 / width) * 4, 20, 235)  # crosses 127.5 mid-way
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 2] = ramp[None, :].astype(np.uint8)
    img[..., 1] = 160
    disc = np.zeros((height, width), np.uint8)
    cv2.circle(disc, (width // 2, height // 2), int(0.45 * min(width, height)), 1, -1)
    img *= disc[..., None]
    return img, (disc > 0) & (img[..., 2] >= 128)


@pytest.mark.parametrize("name, width, height", [
    ("odd.png", 301, 203), ("tall.bmp", 97, 311), ("big.jpg", 3504, 2336)])
def test_probabilities_return_to_original_pixels_before_thresholding(
        tmp_path, name, width, height):
    img, expected = half_red_fundus(width, height)
    write(tmp_path / "in" / name, img, [cv2.IMWRITE_JPEG_QUALITY, 98])
    opt = Options(out=tmp_path / "out", prob_dir=tmp_path / "prob", workers=1)
    rows = []
    summary = Pipeline(RedChannelBackend(), opt, on_row=rows.append).run(tmp_path / "in")
    assert summary["counts"]["ok"] == 1
    # Large JPEGs are decoded reduced (DCT scaling), the rest at full size.
    assert rows[0]["decode_scale"] == (8 if name.endswith(".jpg") else 1)
    stem = Path(name).with_suffix(".png")
    mask = assert_mask(tmp_path / "out" / stem, (width, height)) > 0
    read_png(tmp_path / "prob" / stem)  # complete
    prob = read_probability(tmp_path / "prob" / stem)
    # The mask is the full-resolution probability map thresholded: wherever the stored map is
    # clearly on one side of the threshold, they agree pixel for pixel (a canvas-size threshold
    # scaled up would give a staircase edge that disagrees with the smooth map).
    clear = np.abs(prob - 0.5) > 1.5 / 65535
    assert np.array_equal(mask[clear], prob[clear] >= 0.5)
    # The vessels land where the red half of the photograph is, up to the FOV rim (resampling).
    rim = cv2.morphologyEx(expected.astype(np.uint8), cv2.MORPH_GRADIENT,
                           np.ones((9, 9), np.uint8)) > 0
    assert np.mean(mask[~rim] == expected[~rim]) > 0.995
    assert not mask[:, : width // 20].any() and not mask[:, width // 2 + width // 20:].any()


def test_photograph_without_fov_is_segmented_and_flagged(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "flat.png", np.full((50, 70, 3), 128, np.uint8))
    write(src / "eye.png", fundus_like(70, 50))
    result = segment_cli(tiny_onnx, src, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in rows_of(tmp_path / "out" / "metrics.csv")}
    assert rows["flat.png"]["status"] == "ok"
    assert rows["flat.png"]["fov_found"] == "False"
    assert "no field of view" in rows["flat.png"]["message"]
    assert int(rows["flat.png"]["fov_area"]) == 50 * 70
    assert rows["eye.png"]["fov_found"] == "True" and rows["eye.png"]["message"] == ""
    assert json.loads(result.stdout)["counts"]["no_fov"] == 1
    assert_mask(tmp_path / "out" / "flat.png", (70, 50))


# --- resume and overwrite ----------------------------------------------------------------

def test_resume_skips_done_work_and_overwrite_redoes_it(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(5):
        write(src / f"sub{i % 2}" / f"{i}.png", fundus_like(60 + i, 50, seed=i))
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 0
    masks = sorted(out.rglob("*.png"))
    assert len(masks) == 5
    first_run = {r["path"]: r["run_id"] for r in rows_of(out / "metrics.csv")}
    stamps = {p: p.stat().st_mtime_ns for p in masks}
    masks[2].unlink()

    result = segment_cli(tiny_onnx, src, out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["counts"]["ok"], summary["counts"]["skipped"]) == (1, 4)
    assert summary["folder"] == {"done": 5, "failed": 0, "pending": 0}
    for p, stamp in stamps.items():
        assert p.exists() and (p == masks[2] or p.stat().st_mtime_ns == stamp)
    # One current row per input: the redone image's row is this run's, the others unchanged.
    rows = {r["path"]: r["run_id"] for r in rows_of(out / "metrics.csv")}
    redone = str(src / masks[2].relative_to(out))
    assert rows.keys() == first_run.keys()
    assert {p for p in rows if rows[p] != first_run[p]} == {redone}
    assert rows[redone] == summary["run_id"]

    result = segment_cli(tiny_onnx, src, out, "--overwrite", "--json")
    counts = json.loads(result.stdout)["counts"]
    assert (counts["ok"], counts["skipped"]) == (5, 0)
    rows = rows_of(out / "metrics.csv")
    assert len(rows) == 5 and {r["run_id"] for r in rows} == {json.loads(result.stdout)["run_id"]}


def test_a_damaged_metrics_file_is_rewritten_from_the_ledger(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write(src / f"{i}.png", fundus_like(60, 50, seed=i))
    retina_batch.segment(src, out, model=tiny_onnx, workers=1)
    with open(out / "metrics.csv", "a") as f:
        f.write("20990101T000000Z,/killed/mid-ro")  # a half row, as from an older version
    (out / "1.png").unlink()
    retina_batch.segment(src, out, model=tiny_onnx, workers=1)
    rows = rows_of(out / "metrics.csv")
    assert [r["path"] for r in rows] == [str(src / "0.png"), str(src / "1.png")]
    assert all(r["status"] == "ok" and r["width"] == "60" for r in rows)


# --- bad input and exit codes ------------------------------------------------------------

def make_bad_files(src: Path) -> set[str]:
    """Broken files of several kinds among good ones; returns the broken ones' names."""
    write(src / "good" / "a.png", fundus_like(80, 60))
    write(src / "good" / "b.jpg", fundus_like(81, 61))
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("not a photograph\n")
    ok, buf = cv2.imencode(".jpg", fundus_like(200, 150))
    (src / "cut_jpeg.jpg").write_bytes(buf.tobytes()[: len(buf) // 3])
    ok, buf = cv2.imencode(".png", fundus_like(200, 150))
    (src / "cut_png.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    ok, buf = cv2.imencode(".tif", fundus_like(200, 150))
    (src / "cut_tiff.tif").write_bytes(buf.tobytes()[:100])
    return {"empty.png", "text.jpg", "cut_jpeg.jpg", "cut_png.png", "cut_tiff.tif"}


def test_bad_files_are_error_rows_and_the_rest_is_done(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    bad = make_bad_files(src)
    result = segment_cli(tiny_onnx, src, out, "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == len(bad)
    assert {Path(f["path"]).name for f in summary["failures"]} == bad
    rows = rows_of(out / "metrics.csv")
    assert len(rows) == len(bad) + 2
    for row in rows:
        name = Path(row["path"]).name
        assert row["status"] == ("error" if name in bad else "ok"), row
        if name in bad:
            assert row["message"].startswith("decode: ") and len(row["message"]) > 10
    assert files_under(out) == ["good/a.png", "good/b.png", "metrics.csv", "report.html",
                                "summary.json"]
    # One stderr line per bad file, naming it.
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed")]
    assert sorted(Path(line.split()[1].rstrip(":")).name for line in failed) == sorted(bad)


def test_bad_files_give_one_stderr_line_each_from_the_real_command(tiny_onnx, tmp_path):
    """A subprocess sees what OpenCV's decoders print to file descriptor 2 (CliRunner does
    not): nothing beyond our one line per bad file."""
    src = tmp_path / "in"
    bad = make_bad_files(src)
    proc = subprocess.run(
        [sys.executable, "-m", "retina_batch.cli", "segment", str(src), "--out",
         str(tmp_path / "out"), "--model", str(tiny_onnx), "--workers", "1", "-q"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(bad), proc.stderr
    assert all(line.startswith("failed ") for line in lines), proc.stderr
    assert proc.stdout == ""


def test_two_inputs_with_one_output_name(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.jpg", fundus_like(60, 50))
    write(src / "a.png", fundus_like(61, 51))
    result = segment_cli(tiny_onnx, src, tmp_path / "out", "-q")
    assert result.exit_code == 1
    rows = {Path(r["path"]).name: r for r in rows_of(tmp_path / "out" / "metrics.csv")}
    assert rows["a.jpg"]["status"] == "ok"
    assert rows["a.png"]["status"] == "error" and "rename one" in rows["a.png"]["message"]
    assert_mask(tmp_path / "out" / "a.png", (60, 50))  # the first one's, not overwritten


def test_exit_status_for_usage_errors(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(60, 50))
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = {
        "input not found": [str(tmp_path / "nope"), "--out", str(tmp_path / "o1")],
        "no images found": [str(tmp_path / "empty"), "--out", str(tmp_path / "o2")],
        "cannot write to": [str(src), "--out", str(tmp_path / "afile" / "sub")],
        "model file not found": [str(src), "--out", str(tmp_path / "o3"),
                                 "--model", str(tmp_path / "none.onnx")],
        "--truth folder not found": [str(src), "--out", str(tmp_path / "o4"),
                                     "--truth", str(tmp_path / "no-truth")],
    }
    for message, args in cases.items():
        if "--model" not in args:
            args = [*args, "--model", str(tiny_onnx)]
        result = CliRunner().invoke(main, ["segment", *args])
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr, (message, result.stderr)
        assert "Traceback" not in result.output
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit)
    # A model without its card is a usage error too, not a traceback.
    orphan = tmp_path / "orphan.onnx"
    orphan.write_bytes(Path(tiny_onnx).read_bytes())
    result = CliRunner().invoke(main, ["segment", str(src), "--out", str(tmp_path / "o5"),
                                       "--model", str(orphan)])
    assert result.exit_code == 2 and "no model card" in result.stderr
    assert segment_cli(tiny_onnx, src, tmp_path / "o6", "-q").exit_code == 0


def test_cli_restores_signal_handlers(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(60, 50))
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.getsignal(signal.SIGINT)
    try:
        assert segment_cli(tiny_onnx, src, tmp_path / "out", "-q").exit_code == 0
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == before[1]
    finally:
        signal.signal(signal.SIGTERM, before[0])


# --- scores against ground truth ---------------------------------------------------------

def test_scores_against_hand_made_ground_truth(tiny_onnx, tmp_path):
    src, out, truth = tmp_path / "in", tmp_path / "out", tmp_path / "truth"
    write(src / "21_training.tif", fundus_like(90, 80, seed=1))
    write(src / "im0002.ppm", fundus_like(75, 66, seed=2))
    write(src / "nolabel.png", fundus_like(40, 40, seed=3))
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 0
    same = read_png(out / "21_training.png")
    mask = read_png(out / "im0002.png") > 0
    assert 50 < mask.sum() < mask.size - 50  # both classes present: the flips below are real

    # Truth 1: exactly the mask the run produced (DRIVE naming) -> perfect scores.
    write(truth / "21_manual1.png", same)
    # Truth 2 (STARE naming): 7 vessel pixels removed and 11 background pixels added.
    flipped = mask.copy()
    vessel, background = np.argwhere(mask), np.argwhere(~mask)
    flipped[tuple(vessel[::max(1, len(vessel) // 7)][:7].T)] = False
    flipped[tuple(background[::max(1, len(background) // 11)][:11].T)] = True
    assert np.count_nonzero(mask & ~flipped) == 7 and np.count_nonzero(~mask & flipped) == 11
    write(truth / "im0002.ah.png", flipped.astype(np.uint8) * 255)

    result = segment_cli(tiny_onnx, src, out, "--truth", str(truth), "--prob",
                         str(tmp_path / "prob"), "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in rows_of(out / "metrics.csv")}
    perfect = rows["21_training.tif"]
    assert perfect["truth"] == str(truth / "21_manual1.png")
    for key in ("dice", "iou", "sensitivity", "specificity", "accuracy"):
        assert float(perfect[key]) == 1.0, key

    n, p = mask.size, int(mask.sum())
    tp, fp, fn = p - 7, 7, 11
    tn = n - tp - fp - fn
    row = rows["im0002.ppm"]
    assert float(row["dice"]) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-5)
    assert float(row["iou"]) == pytest.approx(tp / (tp + fp + fn), abs=1e-5)
    assert float(row["sensitivity"]) == pytest.approx(tp / (tp + fn), abs=1e-5)
    assert float(row["specificity"]) == pytest.approx(tn / (tn + fp), abs=1e-5)
    assert float(row["accuracy"]) == pytest.approx((tp + tn) / n, abs=1e-5)
    # AUC from the float map agrees with AUC from the stored 16-bit map.
    levels = read_png(tmp_path / "prob" / "im0002.png")
    assert levels.dtype == np.uint16
    assert float(row["auc"]) == pytest.approx(roc_auc(levels, flipped), abs=1e-5)

    assert rows["nolabel.png"]["truth"] == "" and rows["nolabel.png"]["dice"] == ""
    summary = json.loads(result.stdout)
    assert summary["truth_images"] == 2
    assert summary["truth_means"]["dice"] == pytest.approx(
        (1 + 2 * tp / (2 * tp + fp + fn)) / 2, abs=1e-5)


def test_drive_photographs_pair_with_their_manual_annotations(tiny_onnx, shared_data,
                                                              tmp_path):
    drive = shared_data / "drive-training"
    images = sorted((drive / "images").glob("*.tif"))[:2]
    if not images or not (drive / "masks").is_dir():
        pytest.skip("drive-training images/masks not present")
    listing = tmp_path / "two.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    result = segment_cli(tiny_onnx, listing, tmp_path / "out", "--truth", str(drive / "masks"),
                         "--json")
    assert result.exit_code == 0, result.output
    for row in rows_of(tmp_path / "out" / "metrics.csv"):
        stem = Path(row["path"]).name.split("_")[0]
        assert row["truth"] == str(drive / "masks" / f"{stem}_manual1.gif")
        assert (row["width"], row["height"], row["fov_found"]) == ("565", "584", "True")
        assert 0 <= float(row["dice"]) <= 1 and 0 <= float(row["fov_auc"]) <= 1
        assert_mask(tmp_path / "out" / row["output"], (565, 584))
    assert json.loads(result.stdout)["truth_images"] == 2


def test_drive_style_folder_pairs_vessels_as_truth_and_mask_as_fov(tmp_path):
    from retina_batch.io import index_by_key

    for name in ("21_training_mask.png", "21_manual1.png", "22_manual1.png", "23_mask.png"):
        write(tmp_path / "labels" / name, np.zeros((4, 4), np.uint8))
    truth = index_by_key(tmp_path / "labels")
    fov = index_by_key(tmp_path / "labels", fov=True)
    assert {k: p.name for k, p in truth.items()} == {
        "21": "21_manual1.png", "22": "22_manual1.png", "23": "23_mask.png"}
    assert fov["21"].name == "21_training_mask.png" and fov["22"].name == "22_manual1.png"


def test_truth_of_the_wrong_size_is_an_error_row(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(60, 50))
    write(tmp_path / "truth" / "a_manual1.png", np.zeros((10, 10), np.uint8))
    result = segment_cli(tiny_onnx, src, tmp_path / "out", "--truth", str(tmp_path / "truth"),
                         "-q")
    assert result.exit_code == 1
    (row,) = rows_of(tmp_path / "out" / "metrics.csv")
    assert row["status"] == "error" and row["message"].startswith("truth: ")
    assert "10x10" in row["message"] and "60x50" in row["message"]


# --- interrupts ----------------------------------------------------------------------------

def test_stop_event_finishes_in_flight_images_and_writes_the_summary(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(40):
        write(src / f"{i:02d}.png", fundus_like(64, 48, seed=i))
    stop = threading.Event()
    rows = []

    def on_row(row):
        rows.append(row)
        stop.set()  # as a signal handler would, after the first image

    summary = retina_batch.segment(src, out, model=tiny_onnx, workers=1, batch_size=2,
                                   on_row=on_row, stop=stop)
    assert summary["interrupted"] is True
    done = summary["counts"]["ok"]
    assert 1 <= done < 40
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    recorded = rows_of(out / "metrics.csv")
    assert len(recorded) == done == len(list(out.glob("*.png")))
    for row in recorded:  # every row has its mask and every mask its row
        assert_mask(out / row["output"], (64, 48))


def start_run(model: Path, src: Path, out: Path, total: int, images: int = 6) -> subprocess.Popen:
    """A real `retina-batch segment` run, returned once it has written `images` masks."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "retina_batch.cli", "segment", str(src), "--out", str(out),
         "--model", str(model), "--workers", "1", "--batch-size", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and masks_written(out) >= images:
            return proc
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"run ended or stalled before {images} rows: {proc.communicate()}")


@pytest.fixture
def many_images(tmp_path) -> tuple[Path, int]:
    src, total = tmp_path / "in", 300
    ok, buf = cv2.imencode(".png", fundus_like(400, 360))
    for i in range(total):
        folder = src / f"batch{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(buf.tobytes())
    return src, total


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_sigterm_finishes_in_flight_work_writes_summary_and_exits_130(
        tiny_onnx, many_images, tmp_path, signum):
    src, total = many_images
    out = tmp_path / "out"
    proc = start_run(tiny_onnx, src, out, total)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    done = summary["counts"]["ok"]
    assert 0 < done < total
    assert summary["counts"]["error"] == 0
    rows = rows_of(out / "metrics.csv")
    masks = sorted(p for p in out.rglob("*.png"))
    assert len(rows) == done == len(masks)  # what was in flight was written and recorded
    assert sorted(out / r["output"] for r in rows) == masks
    for p in masks:
        assert_mask(p, (400, 360))
    assert not [p for p in out.rglob(".*") if p.is_file()]  # a clean stop leaves no temporaries
    assert os.path.getsize(out / "metrics.csv") > 0
