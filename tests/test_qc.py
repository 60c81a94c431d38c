"""Quality flags: synthetic photographs and their degradations (always), and the real
photographs of ../shared/data (skipped without it)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from retina_batch.io import index_by_key, list_images, pair_key, read_image, read_mask
from retina_batch.preprocess import detect_fov, to_rgb8
from retina_batch.qc import THRESHOLDS, flags, image_quality, reasons
from retina_batch.synth import synthesize

IMAGE_FLAGS = {"no_fov", "dark", "bright", "low_contrast", "blurred"}


def degrade(rgb: np.ndarray, fov: np.ndarray, kind: str, level: float) -> np.ndarray:
    """The degradations of benchmarks/qc_thresholds.py (the rim stays as it was)."""
    if kind == "blur":  # level: sigma in grid pixels
        x, y, w, h = cv2.boundingRect(fov.astype(np.uint8))
        return cv2.GaussianBlur(rgb, (0, 0), level * max(w, h) / 512)
    f = rgb.astype(np.float32)
    if kind == "gain":
        out = f * level
    else:
        inside = fov.astype(bool)
        mean = f[inside].mean(axis=0)
        out = np.where(inside[..., None], mean + level * (f - mean), f)
    return np.clip(out, 0, 255).astype(np.uint8)


def image_flags(rgb: np.ndarray, fov: np.ndarray | None = None) -> set[str]:
    found = detect_fov(rgb)
    mask = found.mask if fov is None else fov
    return set(reasons(image_quality(rgb, mask), found.found if fov is None else True))


@pytest.fixture(scope="module")
def photograph():
    bgr, _ = synthesize(768, 576, seed=4)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb, detect_fov(rgb).mask


def test_a_good_synthetic_photograph_passes(photograph):
    assert image_flags(photograph[0]) == set()


@pytest.mark.parametrize("kind,level,expected", [
    ("gain", 0.1, {"dark"}),
    ("gain", 3.0, {"bright", "low_contrast"}),  # clipped at 255: the detail is gone too
    ("contrast", 0.15, {"low_contrast"}),
    ("blur", 2.0, {"blurred"}),
])
def test_each_degradation_gets_its_own_flag_and_no_other(photograph, kind, level, expected):
    """Darkening is not 'low contrast' or 'blurred' (both statistics are ratios that a gain
    leaves unchanged); contrast loss is not 'blurred'; blur is not 'low contrast'."""
    rgb, fov = photograph
    assert image_flags(degrade(rgb, fov, kind, level), fov) == expected


def test_no_field_of_view_and_vessel_density_flags():
    row = {"qc_brightness": 120, "qc_contrast": 0.08, "qc_sharpness": 0.3,
           "vessel_density": 0.11}
    assert flags(row) == "ok"
    assert flags(row, fov_found=False) == "no_fov"
    assert flags({**row, "vessel_density": 0.01}) == "vessel_density_low"
    assert flags({**row, "vessel_density": 0.5, "qc_brightness": 5},
                 fov_found=False) == "no_fov;dark;vessel_density_high"
    assert flags({}) == "ok"  # nothing measured (e.g. no FOV inside): nothing to flag


def test_image_quality_of_a_photograph_without_inside(photograph):
    rgb, _ = photograph
    tiny_fov = np.zeros(rgb.shape[:2], np.uint8)
    tiny_fov[10, 10:300] = 1  # a line: nothing is left inside once the rim is taken off
    assert image_quality(rgb, tiny_fov) == {"qc_brightness": None, "qc_contrast": None,
                                            "qc_sharpness": None}


def test_statistics_do_not_depend_on_resolution(photograph):
    rgb, fov = photograph
    big = cv2.resize(rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    big_fov = cv2.resize(fov, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    a, b = image_quality(rgb, fov), image_quality(big, big_fov)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=0.1), key


# --- the real photographs ---------------------------------------------------------------

def real_photographs(data):
    """(name, RGB, FOV mask) of the DRIVE and LES-AV photographs (the Retina Blood Vessel
    set holds the same photographs as DRIVE)."""
    fovs = index_by_key(data / "les-av" / "fov", fov=True)
    for path in list_images(data / "drive-training" / "images"):
        rgb = to_rgb8(read_image(path))
        yield path.name, rgb, detect_fov(rgb).mask
    for path in list_images(data / "les-av" / "images"):
        yield path.name, to_rgb8(read_image(path)), read_mask(fovs[pair_key(path)])


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_photographs_pass_and_their_degradations_are_flagged(shared_data):
    """Every real photograph passes the image flags; blurred (sigma 1.5 grid px), darkened
    (x 0.12), over-exposed and flattened (contrast x 0.2) copies get their flag. Over-exposure
    is x 10: LES-AV photographs are dark (mean luminance ~70), and x 3 leaves them at ~170,
    below the 'bright' threshold of 200 (a merge-time correction: x 3 never flagged them)."""
    missed = []
    for name, rgb, fov in real_photographs(shared_data):
        assert image_flags(rgb, fov) == set(), name
        for kind, level, expected in (("blur", 1.5, "blurred"), ("gain", 0.12, "dark"),
                                      ("gain", 10.0, "bright"),
                                      ("contrast", 0.2, "low_contrast")):
            if expected not in image_flags(degrade(rgb, fov, kind, level), fov):
                missed.append((name, kind, level))
    assert not missed


def test_thresholds_are_ordered():
    assert THRESHOLDS["dark"] < THRESHOLDS["bright"]
    assert THRESHOLDS["vessel_density_low"] < THRESHOLDS["vessel_density_high"]
