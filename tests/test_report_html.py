"""OUT/report.html: its content after a real segment run, and the report on hand-made rows."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from tiny import fundus_like

from retina_batch.cli import main
from retina_batch.measure import COLUMNS as MEASURE_COLUMNS
from retina_batch.report_html import read_rows, write_report


def section(page: str, name: str) -> str:
    """The HTML of <section id=NAME> ('' when the page has none)."""
    found = re.search(rf"<section id={name}>(.*?)</section>", page, re.S)
    return found.group(1) if found else ""


def images_in(html: str) -> list[str]:
    return re.findall(r'<img src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)" alt="([^"]+)"', html)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> Path:
    """6 fundus-like photographs (one of them dark), their truth, and 2 files that fail."""
    root = tmp_path_factory.mktemp("report-run")
    images, truth = root / "images", root / "truth"
    images.mkdir()
    truth.mkdir()
    for i in range(6):
        photo = fundus_like(160, 120, seed=i)
        if i == 5:
            photo = (photo * 0.08).astype(np.uint8)
        cv2.imwrite(str(images / f"eye{i}.png"), photo)
        cv2.imwrite(str(truth / f"eye{i}.png"), (photo[:, :, 2] < 100).astype(np.uint8) * 255)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    return root


def segment(model: Path, root: Path, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["segment", str(root / "images"), "--out", str(out),
                                       "--model", str(model), "--workers", "2", "-q", *extra])
    assert result.exit_code == 1, result.output  # two files fail, the rest is done
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    return (out / "report.html").read_text(), rows


def test_report_of_a_run_with_failures_flags_and_truth(tiny_onnx, run_inputs, tmp_path):
    page, rows = segment(tiny_onnx, run_inputs, tmp_path / "out", "--truth",
                         str(run_inputs / "truth"))
    ok = [r for r in rows if r["status"] == "ok"]
    flagged = [r for r in ok if r["qc"] != "ok"]
    assert len(ok) == 6 and flagged  # the dark photograph at least
    assert "dark" in next(r["qc"] for r in ok if r["path"].endswith("eye5.png"))
    totals = section(page, "totals")
    assert re.search(r">6</div><div class=label>images measured<", totals)
    assert re.search(r">2</div><div class=label>failed<", totals)
    assert re.search(rf">{len(flagged)}</div><div class=label>flagged by quality", totals)
    failures = section(page, "failures")
    assert "empty.png" in failures and "notes.jpg" in failures and "empty file" in failures
    gallery = section(page, "gallery-flagged")
    shown = {alt for _, alt in images_in(gallery)}
    assert {Path(r["path"]).name for r in flagged} == shown
    for uri, _ in images_in(gallery):  # real JPEG thumbnails of the photograph
        import base64

        jpeg = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8),
                            cv2.IMREAD_COLOR)
        assert jpeg is not None and jpeg.shape[1] == 220
    plots = section(page, "measurements")
    for column in MEASURE_COLUMNS:
        assert f"<div class=plot-title>{column}</div><svg" in plots
    assert plots.count("<rect") >= len(MEASURE_COLUMNS)
    assert section(page, "quality").count("<svg") == 3
    scores = section(page, "scores")
    assert "Scores against ground truth (6 images" in scores
    assert all(f"eye{i}.png" in scores for i in range(6))


def test_report_without_truth_has_no_dice_table(tiny_onnx, run_inputs, tmp_path):
    page, _ = segment(tiny_onnx, run_inputs, tmp_path / "out")
    assert section(page, "totals") and section(page, "measurements")
    assert "id=scores" not in page and "dice" not in page.lower()


def test_report_is_self_contained(tiny_onnx, run_inputs, tmp_path):
    page, _ = segment(tiny_onnx, run_inputs, tmp_path / "out")
    sources = re.findall(r"""(?:src|href)=["']?([^"' >]*)""", page)
    assert sources and all(s.startswith("data:") for s in sources)  # no file, no network
    assert "<script" not in page and "<link" not in page and "url(" not in page


# --- the report on hand-made rows ------------------------------------------------------------

def _row(i: int, **values) -> dict:
    base = {"path": f"/photos/p{i}.png", "output": f"p{i}.png", "status": "ok", "qc": "ok",
            "fov_found": "True", "vessel_density": 0.11 + 0.001 * (i % 7),
            "skeleton_density": 0.03, "branch_points": 100 + i % 5, "end_points": 90,
            "fractal_dimension": 1.43, "calibre_median_px": 3.0 + 0.1 * (i % 3),
            "calibre_mean_px": 3.4, "tortuosity": 1.03, "qc_brightness": 110,
            "qc_contrast": 0.07, "qc_sharpness": 0.3}
    return {**base, **values}


def test_gallery_shows_flagged_and_unusual_images_with_previews(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = [_row(i) for i in range(30)]
    rows[3] = _row(3, qc="blurred;vessel_density_low", vessel_density=0.02)
    rows[7] = _row(7, calibre_median_px=9.0)  # far from the others' 3.0-3.2
    for i in (3, 7):
        rows[i]["path"] = str(photos / f"p{i}.png")
        cv2.imwrite(rows[i]["path"], fundus_like(300, 200, seed=i))
        cv2.imwrite(str(tmp_path / f"p{i}.png"), np.full((200, 300), 255, np.uint8))
    rows.append({"path": "/photos/bad.png", "output": "bad.png", "status": "error",
                 "message": "decode: empty file (0 bytes)"})
    page = write_report(tmp_path, rows, {"images_per_second": 3.5}).read_text()
    flagged = section(page, "gallery-flagged")
    assert [alt for _, alt in images_in(flagged)] == ["p3.png"]
    assert "blurred, vessel_density_low" in flagged
    unusual = section(page, "gallery-unusual")
    assert [alt for _, alt in images_in(unusual)] == ["p7.png"]
    assert unusual.count("<figure>") == 1  # the others are within 2 robust z of the median
    assert "calibre_median_px 9" in unusual
    assert "bad.png" in section(page, "failures")
    assert "3.50" in section(page, "totals")


def test_missing_photograph_still_gets_a_caption(tmp_path):
    rows = [_row(i) for i in range(6)]
    rows[0]["qc"] = "dark"
    page = write_report(tmp_path, rows, {}).read_text()
    flagged = section(page, "gallery-flagged")
    assert "no preview" in flagged and "p0.png" in flagged


def test_read_rows_keeps_the_newest_row_of_each_image(tmp_path):
    metrics = tmp_path / "metrics.csv"
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "output", "status", "message"])
        writer.writeheader()
        writer.writerow({"path": "a.png", "output": "a.png", "status": "error", "message": "x"})
        writer.writerow({"path": "b.png", "output": "b.png", "status": "ok"})
        writer.writerow({"path": "a.png", "output": "a.png", "status": "ok"})  # resumed run
    rows = list(read_rows(metrics))
    assert [(r["path"], r["status"]) for r in rows] == [("b.png", "ok"), ("a.png", "ok")]


def test_a_half_written_row_does_not_break_the_report(tmp_path):
    """What SIGKILL can leave at the end of metrics.csv: a row with most fields missing."""
    metrics = tmp_path / "metrics.csv"
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_row(0)) + ["message"])
        writer.writeheader()
        writer.writerow(_row(0))
        f.write("20990101T000000Z,/killed/mid-ro\r\n")
    page = write_report(tmp_path, read_rows(metrics), {}).read_text()
    assert ">1</div><div class=label>images measured<" in page
    assert ">1</div><div class=label>failed<" in page
