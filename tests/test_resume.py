"""The output folder as a ledger, through the command a user runs: inputs are never written,
resume is exact, settings are checked, later outputs are added, usage errors leave nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from test_segment import assert_mask, files_under, read_png, rows_of, segment_cli, write
from tiny import fundus_like

from retina_batch.cli import main


def photographs(src: Path, n: int = 3, ext: str = ".png") -> dict[Path, bytes]:
    """n fundus-like photographs; returns their bytes, to check they are never touched."""
    for i in range(n):
        write(src / f"{i}{ext}", fundus_like(70 + i, 60, seed=i))
    return {p: p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}


def unchanged(files: dict[Path, bytes], folder: Path) -> bool:
    now = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return now == files


def refused(result, *words: str) -> None:
    """A usage error: exit 2, one line on stderr naming `words`, no traceback."""
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in " ".join(result.stderr.split()), (word, result.stderr)


# --- inputs are read-only ------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["plain", "overwrite"])
def test_output_folder_that_is_the_input_folder_is_refused(tiny_onnx, tmp_path, overwrite):
    src = tmp_path / "same"
    files = photographs(src)
    refused(segment_cli(tiny_onnx, src, src, *overwrite), "is the input folder")
    assert unchanged(files, src)  # not one byte written, no ledger folder either


@pytest.mark.parametrize("option", ["--prob", "--overlay"])
def test_prob_or_overlay_folder_that_is_the_input_folder_is_refused(tiny_onnx, tmp_path,
                                                                    option):
    src = tmp_path / "in"
    files = photographs(src)
    refused(segment_cli(tiny_onnx, src, tmp_path / "out", option, str(src)),
            "is the input folder")
    assert unchanged(files, src) and not (tmp_path / "out").exists()


def test_outputs_that_would_land_on_inputs_are_refused_in_every_input_form(tiny_onnx,
                                                                          tmp_path):
    data = tmp_path / "data"
    photographs(data)
    (data / "todo.txt").write_text("0.png\n1.png\n")
    files = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    cases = {  # (input, --out, more options)
        "one image, its mask beside it": (data / "0.png", data, ()),
        "a list file, masks in its folder": (data / "todo.txt", data, ()),
        "--metrics naming a photograph": (data, tmp_path / "out",
                                          ("--metrics", str(data / "1.png"))),
    }
    for name, (source, out, extra) in cases.items():
        for overwrite in ((), ("--overwrite",)):
            result = segment_cli(tiny_onnx, source, out, *extra, *overwrite)
            refused(result, "would overwrite the input")
            assert unchanged(files, data), name
    assert not (tmp_path / "out").exists()


def test_an_output_folder_above_the_input_is_checked_where_it_reaches_back(tiny_onnx,
                                                                          tmp_path):
    """segment data/images --out data: the mask of images/images/x.png is images/x.png."""
    data = tmp_path / "data"
    write(data / "images" / "x.png", fundus_like(50, 40, seed=1))
    write(data / "images" / "images" / "x.png", fundus_like(50, 40, seed=2))
    files = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    refused(segment_cli(tiny_onnx, data / "images", data), "would overwrite the input",
            str(data / "images" / "x.png"))
    assert unchanged(files, data)
    (data / "images" / "images" / "x.png").unlink()  # nothing reaches back: allowed
    assert segment_cli(tiny_onnx, data / "images", data, "-q").exit_code == 0
    assert_mask(data / "x.png", (50, 40))


def test_output_folder_inside_the_input_keeps_working(tiny_onnx, tmp_path):
    src = tmp_path / "images"
    files = photographs(src)
    for _ in range(2):
        result = segment_cli(tiny_onnx, src, src / "masks", "--overwrite", "-q")
        assert result.exit_code == 0, result.output
    assert all(p.read_bytes() == data for p, data in files.items())
    assert len(rows_of(src / "masks" / "metrics.csv")) == 3


# --- usage errors leave nothing behind -----------------------------------------------------

def test_a_run_refused_for_a_usage_error_creates_no_folder(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    photographs(src)
    (tmp_path / "afile").write_text("x")
    orphan = tmp_path / "orphan.onnx"
    orphan.write_bytes(tiny_onnx.read_bytes())
    (tmp_path / "empty").mkdir()
    out = tmp_path / "new" / "out"
    cases = {
        "no images": (["--prob", str(tmp_path / "p")], "no images found"),
        "missing engine": (["--backend", "tensorrt", "--model", str(tmp_path / "x.engine")],
                           "model file not found"),
        "unwritable overlay": (["--overlay", str(tmp_path / "afile" / "o"),
                                "--prob", str(tmp_path / "p")], "cannot write to"),
        "missing card": (["--model", str(orphan)], f"{orphan}.json"),
        "missing truth": (["--truth", str(tmp_path / "t")], "--truth folder not found"),
        "input not found": (["--prob", str(tmp_path / "p")], "input not found"),
    }
    for name, (args, message) in cases.items():
        source = {"input not found": tmp_path / "nope", "no images": tmp_path / "empty"}.get(
            name, src)
        if "--model" not in args:
            args = [*args, "--model", str(tiny_onnx)]
        result = CliRunner().invoke(main, ["segment", str(source), "--out", str(out), *args])
        refused(result, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "afile", "empty", "in", "orphan.onnx"], name


# --- resume is exact -----------------------------------------------------------------------

def test_a_changed_photograph_is_redone_and_the_rest_skipped(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photographs(src)
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 0
    write(src / "1.png", fundus_like(90, 80, seed=9))  # same name, another photograph
    os.utime(src / "1.png", ns=(1, 1))  # and an old date: size alone must catch it
    result = segment_cli(tiny_onnx, src, out, "--json")
    counts = json.loads(result.stdout)["counts"]
    assert (counts["ok"], counts["skipped"]) == (1, 2)
    assert_mask(out / "1.png", (90, 80))
    rows = {Path(r["path"]).name: r for r in rows_of(out / "metrics.csv")}
    assert len(rows) == 3 and rows["1.png"]["width"] == "90"
    # Touched only (same bytes, new time): redone as well (the ledger does not trust it).
    os.utime(src / "2.png")
    counts = json.loads(segment_cli(tiny_onnx, src, out, "--json").stdout)["counts"]
    assert (counts["ok"], counts["skipped"]) == (1, 2)


def test_failed_images_are_retried_on_the_next_run(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photographs(src, 2)
    (src / "late.png").write_bytes(b"still copying")
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 1
    write(src / "late.png", fundus_like(66, 55))
    result = segment_cli(tiny_onnx, src, out, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["counts"]["ok"], summary["counts"]["skipped"]) == (1, 2)
    assert summary["folder"] == {"done": 3, "failed": 0, "pending": 0}
    assert [r["status"] for r in rows_of(out / "metrics.csv")] == ["ok"] * 3


def test_an_overlay_asked_for_later_is_made_for_finished_images(tiny_onnx, tmp_path):
    src, out, over, prob = tmp_path / "in", tmp_path / "out", tmp_path / "over", tmp_path / "p"
    photographs(src)
    assert segment_cli(tiny_onnx, src, out, "--prob", str(prob), "-q").exit_code == 0
    masks = {p: read_png(p) for p in sorted(out.glob("*.png"))}
    result = segment_cli(tiny_onnx, src, out, "--overlay", str(over), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["counts"]["ok"] == 3
    assert files_under(over) == ["0.jpg", "1.jpg", "2.jpg"]
    for path, mask in masks.items():
        assert np.array_equal(read_png(path), mask)
        assert cv2.imread(str(over / path.with_suffix(".jpg").name)).shape[:2] == mask.shape
    assert len(rows_of(out / "metrics.csv")) == 3
    # Everything asked for is there now (the earlier probability maps still count).
    again = segment_cli(tiny_onnx, src, out, "--overlay", str(over), "--prob", str(prob),
                        "--json")
    assert json.loads(again.stdout)["counts"] == {
        "ok": 0, "error": 0, "skipped": 3, "no_fov": 0, "processed": 0}
    # An overlay deleted by hand is made again.
    (over / "1.jpg").unlink()
    again = segment_cli(tiny_onnx, src, out, "--overlay", str(over), "--json")
    assert json.loads(again.stdout)["counts"]["ok"] == 1 and (over / "1.jpg").exists()


# --- settings are checked ----------------------------------------------------------------

def test_another_threshold_is_refused_and_overwrite_redoes_with_it(tiny_onnx, tmp_path):
    src, out, prob = tmp_path / "in", tmp_path / "out", tmp_path / "prob"
    photographs(src)
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = segment_cli(tiny_onnx, src, out, "--threshold", "0.3")
    refused(result, "threshold 0.5", "threshold 0.3", "--overwrite", "another --out")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    result = segment_cli(tiny_onnx, src, out, "--threshold", "0.3", "--overwrite", "--prob",
                         str(prob), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["counts"]["ok"] == 3
    for mask_path in sorted(out.glob("*.png")):
        p = read_png(prob / mask_path.name).astype(np.float32) / 255
        clear = np.abs(p - 0.3) > 0.5 / 255  # the stored map is rounded to 1/255
        assert np.array_equal((read_png(mask_path) > 0)[clear], p[clear] >= 0.3)
    assert {r["threshold"] for r in rows_of(out / "metrics.csv")} == {"0.3"}
    # The folder is a 0.3 folder now: the same command resumes, the card's threshold refuses.
    assert segment_cli(tiny_onnx, src, out, "--threshold", "0.3", "-q").exit_code == 0
    refused(segment_cli(tiny_onnx, src, out), "threshold 0.3", "threshold 0.5")


def test_another_model_is_refused_naming_both(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photographs(src, 1)
    assert segment_cli(tiny_onnx, src, out, "-q").exit_code == 0
    onnx = pytest.importorskip("onnx")
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    graph = onnx.load(str(tiny_onnx))
    graph.doc_string = "retrained"  # other bytes, same card: another model all the same
    onnx.save(graph, str(other))
    Path(f"{other}.json").write_text(Path(f"{tiny_onnx}.json").read_text())
    shas = [hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (tiny_onnx, other)]
    refused(segment_cli(other, src, out), *shas, "--overwrite", "another --out")
    assert segment_cli(other, src, out, "--overwrite", "-q").exit_code == 0


# --- summary -------------------------------------------------------------------------------

def test_summary_counts_the_folder_over_every_run(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photographs(src, 4)
    (src / "bad.png").write_bytes(b"nope")
    segment_cli(tiny_onnx, src, out, "-q")
    result = segment_cli(tiny_onnx, src, out, "--json")
    summary = json.loads(result.stdout)
    assert summary["folder"] == {"done": 4, "failed": 1, "pending": 0}
    assert summary["counts"] == {"ok": 0, "error": 1, "skipped": 4, "no_fov": 0,
                                 "processed": 1}
    assert summary["inputs"] == 5
    # img/s counts processed images only: 1 here, however many were skipped.
    # (wall_seconds is rounded to the millisecond: allow for that on a ~15 ms run.)
    wall = summary["wall_seconds"]
    assert 1 / (wall + 0.0006) <= summary["images_per_second"] <= 1 / max(wall - 0.0006, 1e-6)
