"""Image-quality flags for fundus photographs: the `qc` column of segment's metrics.

Three numbers per photograph, computed on the FOV-normalised grid (the FOV's bounding box
scaled to 512 px, as for the vessel measurements, so they do not depend on the camera's
resolution) inside the field of view shrunk by INNER_MARGIN px (the rim's own edge and
vignetting would dominate every statistic otherwise). G is the green channel, where vessels
have their contrast, G_s is G smoothed with a Gaussian of sigma s grid pixels, and H, H_s the
same at half resolution (cv2.pyrDown, where the slow bands cost a quarter):

    qc_brightness  mean luminance (0.299 R + 0.587 G + 0.114 B), 0..255
    qc_contrast    std(H - H_8) / mean(G): local contrast (vessels and texture, without the
                   slow illumination gradient) relative to the light level, so a photograph
                   that is merely dark is not also "low contrast"
    qc_sharpness   std(G_0.5 - G_1) / std(H - H_4): the finest detail relative to detail at
                   the scale of vessels. Unchanged by darkening or contrast loss (both bands
                   scale alike) and falls with any blur. Gaussian bands rather than the
                   variance of the Laplacian: on dark or very blurred photographs the
                   Laplacian measures the 8-bit quantisation noise, which made heavily blurred
                   photographs look sharper than slightly blurred ones.

`qc` is "ok" or the reasons, joined by ";": no_fov, dark, bright, low_contrast, blurred,
vessel_density_low, vessel_density_high. The thresholds (THRESHOLDS) were chosen by
benchmarks/qc_thresholds.py from the 122 real photographs in ../shared/data (DRIVE, the
Retina Blood Vessel set, LES-AV) and synthetic degradations of them; its output, with the
reasoning, is in benchmarks/README.md ("Quality flags").
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .measure import GRID
from .preprocess import letterbox

INNER_MARGIN = 10
MIN_INSIDE = 100  # grid pixels inside the shrunken FOV below which there are no statistics
COLUMNS = ["qc_brightness", "qc_contrast", "qc_sharpness", "qc"]

THRESHOLDS = {
    "dark": 25.0,  # qc_brightness below
    "bright": 200.0,  # qc_brightness above
    "low_contrast": 0.035,  # qc_contrast below
    "blurred": 0.21,  # qc_sharpness below
    "vessel_density_low": 0.05,  # vessel_density below
    "vessel_density_high": 0.20,  # vessel_density above
}


def image_quality(rgb: np.ndarray, fov: np.ndarray, made=None) -> dict:
    """qc_brightness, qc_contrast, qc_sharpness of an RGB uint8 photograph whose field of view
    is `fov` (any size; resized to the photograph's). None where the FOV has no inside.

    `made`: (canvas, source_box) when the caller has already letterboxed `rgb`'s crop
    `source_box` onto a canvas (segment's model canvas): used as the grid when it is the same
    crop at GRID px, which it is for photographs on the working size (saves the largest resize
    here, ~0.8 ms of ~3 per 512 px photograph)."""
    fov = np.asarray(fov)
    # 0/255 masks (cv2.threshold: > level) all the way: no bool arrays, no uint8 copies between
    # steps. (Not cv2.compare: it takes a 1 x 1 image for the scalar operand.)
    fov = cv2.threshold(fov, 0, 255, cv2.THRESH_BINARY)[1] if fov.dtype == np.uint8 else \
        (fov > 0).astype(np.uint8) * 255
    if fov.shape != rgb.shape[:2]:
        fov = cv2.resize(fov, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    x, y, w, h = cv2.boundingRect(fov)
    empty = dict.fromkeys(COLUMNS[:3])
    if w == 0:
        return empty
    box = (x, y, x + w, y + h)
    canvas = grid_canvas(made, box)
    if canvas is None:
        canvas = letterbox(rgb, box, GRID)[0]
    inside = cv2.threshold(letterbox(fov, box, GRID)[0], 127, 255, cv2.THRESH_BINARY)[1]
    side = 2 * INNER_MARGIN + 1
    inside = cv2.erode(inside, np.ones((side, side), np.uint8))
    count = cv2.countNonZero(inside)
    if count < MIN_INSIDE:
        return empty
    green = cv2.extractChannel(canvas, 1)
    green_mean = _mean_u8(green, inside, count)
    green = green.astype(np.float32)
    # The slow bands at half resolution, where they cost a quarter (pyrDown is itself a
    # Gaussian of sigma 1: sqrt(sigma^2 - 1) / 2 at half size makes up a full-size sigma).
    half, half_inside = cv2.pyrDown(green), inside[::2, ::2].copy()
    g4, g8 = (cv2.GaussianBlur(half, (0, 0), math.sqrt(s * s - 1) / 2) for s in (4.0, 8.0))
    brightness = _mean_u8(cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY), inside, count)
    contrast = _spread(half, g8, half_inside) / max(green_mean, 1.0)
    finest = _spread(cv2.GaussianBlur(green, (0, 0), 0.5), cv2.GaussianBlur(green, (0, 0), 1.0),
                     inside)
    sharpness = finest / max(_spread(half, g4, half_inside), 1e-3)
    return quality_columns(brightness, contrast, sharpness, count)


def grid_canvas(made, box):
    """The caller's canvas when it is this grid (the crop `box` at GRID x GRID), else None:
    `made` is (canvas, source_box) as image_quality takes it, numpy or torch (qc_gpu)."""
    if made is None or tuple(made[1]) != tuple(box) or tuple(made[0].shape) != (GRID, GRID, 3):
        return None
    return made[0]


def quality_columns(brightness: float, contrast: float, sharpness: float,
                    inside: float) -> dict:
    """The row's qc_* columns from the statistics (either implementation: this one or
    qc_gpu's) and the pixel count they were taken over; None where too few."""
    if inside < MIN_INSIDE:
        return dict.fromkeys(COLUMNS[:3])
    return {"qc_brightness": round(float(brightness), 2),
            "qc_contrast": round(float(contrast), 5), "qc_sharpness": round(float(sharpness), 4)}


def _mean_u8(values: np.ndarray, inside: np.ndarray, count: int) -> float:
    """cv2.mean(values, mask=inside) of a uint8 image and a 0/255 mask with `count` pixels set,
    bit for bit (an exact integer sum times 1 / count, as OpenCV computes it), ~7x faster:
    OpenCV's masked mean does not vectorise, bitwise_and and sum do."""
    return cv2.sumElems(cv2.bitwise_and(values, inside))[0] * (1.0 / count)


def _spread(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> float:
    """std of a - b where `inside` is set, in C (no masked copies)."""
    return float(cv2.meanStdDev(cv2.subtract(a, b), mask=inside)[1][0, 0])


def reasons(row: dict, fov_found: bool = True, thresholds: dict = THRESHOLDS) -> list[str]:
    """Which quality problems a metrics row shows (empty: none). Reads the qc_* columns of
    image_quality and measure's vessel_density; a missing value flags nothing."""
    t = thresholds
    checks = [
        ("no_fov", not fov_found),
        ("dark", _below(row.get("qc_brightness"), t["dark"])),
        ("bright", _below(t["bright"], row.get("qc_brightness"))),
        ("low_contrast", _below(row.get("qc_contrast"), t["low_contrast"])),
        ("blurred", _below(row.get("qc_sharpness"), t["blurred"])),
        ("vessel_density_low", _below(row.get("vessel_density"), t["vessel_density_low"])),
        ("vessel_density_high", _below(t["vessel_density_high"], row.get("vessel_density"))),
    ]
    return [name for name, failed in checks if failed]


def flags(row: dict, fov_found: bool = True) -> str:
    """The `qc` column: "ok", or the reasons joined by ";"."""
    return ";".join(reasons(row, fov_found)) or "ok"


def _below(value, limit) -> bool:
    if value is None or limit is None or value == "":
        return False
    return float(value) < float(limit)
