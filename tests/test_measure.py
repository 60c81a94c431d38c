"""Vessel measurements on synthetic masks of known geometry, and the `measure` command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from retina_batch.cli import main
from retina_batch.measure import (
    COLUMNS,
    GRID,
    fractal_dimension,
    measure_grid,
    measure_mask,
    to_grid,
)

YY, XX = np.mgrid[0:GRID, 0:GRID].astype(float)


def vessel(width: float, angle: float = 0.0, length: float = 360.0, size: int = GRID,
           centre: float | None = None) -> np.ndarray:
    """A straight vessel: pixels whose centre lies within width/2 of a segment. Centred on a
    pixel centre for odd widths and between two for even ones, so an axis-aligned vessel is
    exactly `width` pixels wide."""
    yy, xx = (YY, XX) if size == GRID else np.mgrid[0:size, 0:size].astype(float)
    c = centre if centre is not None else size / 2 + (0.0 if round(width) % 2 else 0.5)
    t = math.radians(angle)
    along = (xx - c) * math.cos(t) + (yy - c) * math.sin(t)
    across = -(xx - c) * math.sin(t) + (yy - c) * math.cos(t)
    return (np.abs(across) < width / 2) & (np.abs(along) <= length / 2)


def arc(radius: float, width: float) -> np.ndarray:
    """Half an annulus (flat ends): a semicircular vessel."""
    r = np.hypot(XX - 256, YY - 200)
    return (np.abs(r - radius) <= width / 2) & (YY >= 200)


# --- must-show geometry --------------------------------------------------------------------

@pytest.mark.parametrize("width", range(3, 12))
@pytest.mark.parametrize("angle", [0, 90])
def test_straight_vessel_calibre_and_tortuosity(width, angle):
    m = measure_mask(vessel(width, angle))
    assert abs(m["calibre_median_px"] - width) <= 0.5, m
    assert abs(m["calibre_mean_px"] - width) <= 0.5, m
    assert abs(m["tortuosity"] - 1.0) <= 0.02, m
    assert (m["branch_points"], m["end_points"]) == (0, 2)


@pytest.mark.parametrize("angle", [10, 22.5, 30, 45, 60])
def test_oblique_straight_vessel_stays_close(angle):
    """Off the pixel axes a width is no longer a whole number of pixels: within 0.7 px, and a
    straight line is still straight (the arc is a polyline through every 4th pixel, not the
    pixel staircase, which would make it 8% longer at 22.5 degrees)."""
    for width in (3, 5, 7):
        m = measure_mask(vessel(width, angle))
        assert abs(m["calibre_median_px"] - width) <= 0.7, (width, m)
        assert abs(m["tortuosity"] - 1.0) <= 0.02, (width, m)


@pytest.mark.parametrize("radius", [100, 150])
@pytest.mark.parametrize("width", [1, 3, 5, 7])
def test_semicircle_tortuosity_is_half_pi(radius, width):
    m = measure_mask(arc(radius, width))
    assert abs(m["tortuosity"] / (math.pi / 2) - 1) <= 0.03, m


@pytest.mark.parametrize("start,length", [(0, 512), (37, 450), (100, 300)])
def test_fractal_dimension_of_a_line(start, length):
    line = np.zeros((GRID, GRID), bool)
    line[201, start:start + length] = True
    assert abs(fractal_dimension(line) - 1.0) <= 0.05
    diagonal = np.eye(GRID, dtype=bool)
    assert abs(fractal_dimension(diagonal) - 1.0) <= 0.05


@pytest.mark.parametrize("start,side", [(0, 512), (37, 411), (100, 300), (5, 450)])
def test_fractal_dimension_of_a_filled_square(start, side):
    square = np.zeros((GRID, GRID), bool)
    square[start:start + side, start + 3:start + 3 + side - 3] = True
    assert abs(fractal_dimension(square) - 2.0) <= 0.05


# --- what the columns count --------------------------------------------------------------

def test_fork_and_ends():
    """A one-pixel Y: one branch point, three end points."""
    y = np.zeros((GRID, GRID), np.uint8)
    for end in ((256, 60), (90, 400), (420, 400)):
        cv2.line(y, (256, 256), end, 1)
    m = measure_mask(y)
    assert (m["branch_points"], m["end_points"]) == (1, 3)


def test_forks_three_pixels_apart_are_two_branch_points():
    """Junctions are pixels whose ring of neighbours is crossed 3 or more times. Counting
    3 or more neighbours instead would also take the pixels between the two forks (each
    touches a branch diagonally) and merge them into one."""
    m = np.zeros((GRID, GRID), np.uint8)
    m[300, 100:400] = 1
    m[200:300, 250] = 1
    m[200:300, 253] = 1
    result = measure_mask(m)
    assert (result["branch_points"], result["end_points"]) == (2, 4)


def test_specks_are_not_vessels():
    """Isolated dots add nothing to the skeleton measurements (they would add end points)."""
    clean = vessel(5)
    specks = clean.copy()
    for x in range(40, 480, 40):
        specks[60:63, x:x + 3] = True
    a, b = measure_mask(clean), measure_mask(specks)
    assert b["end_points"] == a["end_points"] == 2
    assert b["vessel_density"] > a["vessel_density"]  # the area still counts them


def test_a_loop_is_not_a_tortuous_segment():
    """A lollipop: the ring leaves its junction and comes back to it, so its arc / chord
    (about 310 / 3) means nothing; the stick is what is left, and it is straight."""
    m = np.zeros((GRID, GRID), np.uint8)
    cv2.line(m, (50, 256), (300, 256), 1)
    cv2.circle(m, (351, 256), 50, 1)  # its leftmost pixel touches the stick's end
    result = measure_mask(m)
    assert result["branch_points"] == 1
    assert abs(result["tortuosity"] - 1.0) <= 0.02


def test_skeleton_density_is_centre_line_length_over_fov_area():
    fov = np.zeros((GRID, GRID), np.uint8)
    fov[:, :256] = 1  # the left half; the FOV's box is scaled to the grid: 2x horizontally
    line = np.zeros((GRID, GRID), np.uint8)
    line[100, 20:220] = 1  # 200 px -> 400 px on the grid
    line[300, 300:500] = 1  # outside the FOV: ignored
    m = measure_mask(line, fov)
    assert m["skeleton_density"] == pytest.approx(399 / (GRID * GRID), rel=0.02)
    diagonal = np.eye(GRID, dtype=np.uint8)[:300]
    diagonal = np.pad(diagonal, ((0, GRID - 300), (0, 0)))
    m = measure_mask(diagonal, np.ones((GRID, GRID)))
    assert m["skeleton_density"] == pytest.approx(299 * math.sqrt(2) / GRID**2, rel=0.01)


def test_vessel_density_counts_inside_the_fov_only():
    fov = np.zeros((GRID, GRID), np.uint8)
    cv2.circle(fov, (256, 256), 200, 1, -1)
    mask = np.zeros((GRID, GRID), np.uint8)
    mask[:, :256] = 1
    m = measure_mask(mask, fov)
    assert m["vessel_density"] == pytest.approx(0.5, abs=0.01)


def test_measurements_do_not_depend_on_resolution():
    """The same photograph at twice the resolution measures the same (the grid)."""
    small = measure_mask(vessel(6, 30, size=GRID))
    large = measure_mask(vessel(12, 30, length=720, size=2 * GRID))
    for column in ("vessel_density", "calibre_median_px", "tortuosity"):
        assert large[column] == pytest.approx(small[column], rel=0.1, abs=0.4), column


def test_thin_vessels_survive_downsampling():
    """A one-pixel line in a mask 1.1x the grid stays one piece (area resampling alone would
    break it where it falls between two grid pixels)."""
    size = int(GRID * 1.1)
    line = np.zeros((size, size), np.uint8)
    cv2.line(line, (20, 100), (540, 130), 1)
    m = measure_mask(line)
    assert m["end_points"] == 2 and m["branch_points"] == 0


def test_empty_mask():
    m = measure_mask(np.zeros((100, 120), bool))
    assert list(m) == COLUMNS
    assert m["vessel_density"] == m["skeleton_density"] == 0
    assert m["branch_points"] == m["end_points"] == 0
    assert m["fractal_dimension"] is m["calibre_median_px"] is m["tortuosity"] is None


@pytest.mark.parametrize("shape,fov_shape", [((100, 120), None), ((GRID, GRID), (64, 64)),
                                             ((1500, 1100), (256, 190))])
def test_an_empty_mask_measures_as_the_grid_would(shape, fov_shape):
    """measure_mask skips the grid for an empty mask (segment's every image behind --backend
    none, and any image without vessels): the same columns as measuring the empty grid."""
    fov = None
    if fov_shape:
        fov = np.zeros(fov_shape, np.uint8)
        cv2.circle(fov, (fov_shape[1] // 2, fov_shape[0] // 2), min(fov_shape) // 3, 1, -1)
    for mask in (np.zeros(shape, np.uint8), np.zeros(shape, bool), np.zeros(shape, np.float32)):
        grid = to_grid(mask, np.ones(shape) if fov is None else fov)
        assert measure_mask(mask, fov) == measure_grid(*grid)


def test_empty_fov_is_an_error():
    for mask in (np.ones((50, 50)), np.zeros((50, 50)), np.zeros((50, 50), np.uint8)):
        with pytest.raises(ValueError, match="empty"):
            measure_mask(mask, np.zeros((50, 50)))


# --- the command ---------------------------------------------------------------------------

def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array.astype(np.uint8) * 255)
    return path


def test_measure_cli_csv_json_fov_pairing_and_bad_files(tmp_path):
    masks, fovs = tmp_path / "masks", tmp_path / "fov"
    _png(masks / "01_manual1.png", vessel(5))
    _png(masks / "02_manual1.png", vessel(7, 90))
    (masks / "03_manual1.png").write_text("not an image")
    half = np.zeros((GRID, GRID), bool)
    half[:, :GRID // 2 + 100] = True
    for key in ("01", "02", "03"):
        _png(fovs / f"{key}_training_mask.png", half)
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["measure", str(masks), "--fov", str(fovs),
                                       "--out", str(out), "--json"])
    assert result.exit_code == 1, result.output  # one mask could not be read
    report = json.loads(result.stdout)
    assert report["images"] == 2 and report["errors"][0]["path"] == "03_manual1.png"
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["01_manual1.png", "02_manual1.png"]
    assert list(rows[0]) == ["path", "fov", *COLUMNS] and rows[0]["fov"] == "mask"
    # measured with the FOV: the same as measuring the arrays with it
    direct = measure_mask(vessel(5), half)
    assert float(rows[0]["vessel_density"]) == direct["vessel_density"]
    assert float(rows[0]["calibre_median_px"]) == direct["calibre_median_px"]


def test_measure_cli_without_fov_uses_the_whole_image(tmp_path):
    _png(tmp_path / "a.png", vessel(3))
    result = CliRunner().invoke(main, ["measure", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    assert row["fov"] == "whole image"
    assert row["vessel_density"] == measure_mask(vessel(3))["vessel_density"]


@pytest.mark.parametrize("args,message", [
    (["nowhere"], "input not found"),
    (["{tmp}", "--fov", "nowhere"], "--fov folder not found"),
    (["{tmp}", "--fov", "{tmp}", "--images", "{tmp}"], "not both"),
])
def test_measure_cli_usage_errors_are_one_line(tmp_path, args, message):
    _png(tmp_path / "a.png", vessel(3))
    result = CliRunner().invoke(main, ["measure", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_measure_cli_missing_fov_pair_is_an_error_row(tmp_path):
    _png(tmp_path / "masks" / "a.png", vessel(3))
    _png(tmp_path / "fov" / "b_mask.png", np.ones((GRID, GRID)))
    result = CliRunner().invoke(main, ["measure", str(tmp_path / "masks"), "--fov",
                                       str(tmp_path / "fov")])
    assert result.exit_code == 1 and "no field-of-view mask pairs" in result.output


def test_segment_rows_carry_the_measurements_of_their_masks(tiny_onnx, tmp_path):
    """segment's metrics columns are `measure` of the masks it wrote, with the FOV detected on
    the photographs: one definition, whichever way the numbers are produced."""
    from tiny import fundus_like

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i, size in enumerate(((300, 200), (640, 480), (512, 512))):
        cv2.imwrite(str(images / f"p{i}.png"), fundus_like(*size, seed=i))
    result = CliRunner().invoke(main, ["segment", str(images), "--out", str(out), "--model",
                                       str(tiny_onnx), "-q"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "metrics.csv"))}
    result = CliRunner().invoke(main, ["measure", str(out), "--images", str(images), "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["rows"]
    assert len(measured) == 3
    for m in measured:
        row = rows[m["path"]]
        assert m["fov"] == "detected" and row["qc"]
        for column in COLUMNS:
            expected = "" if m[column] is None else m[column]
            assert row[column] == str(expected), (m["path"], column)
