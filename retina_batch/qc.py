"""Image-quality flags for fundus photographs: the `qc` column of segment's metrics.

Three numbers per photograph, computed on the FOV-normalised grid (the FOV's bounding box
scaled to 512 px, as for the vessel measurements, so they do not depend on the camera's
resolution) inside the field of view shrunk by INNER_MARGIN px (the rim's own edge and
vignetting would dominate every statistic otherwise). G is the green channel, where vessels
have their contrast, and G_s is G smoothed with a Gaussian of sigma s grid pixels:

    qc_brightness  mean luminance (0.299 R + 0.587 G + 0.114 B), 0..255
    qc_contrast    std(G - G_8) / mean(G): local contrast (vessels and texture, without the
                   slow illumination gradient) relative to the light level, so a photograph
                   that is merely dark is not also "low contrast"
    qc_sharpness   std(G_0.5 - G_1) / std(G_1 - G_4): the finest detail relative to detail at
                   the scale of vessels. Unchanged by darkening or contrast loss (both bands
                   scale alike) and falls with any blur. Computed from Gaussian bands rather
                   than the variance of the Laplacian: on dark or very blurred photographs
                   the Laplacian measures the 8-bit quantisation noise, which made heavily
                   blurred photographs look sharper than slightly blurred ones.

`qc` is "ok" or the reasons, joined by ";": no_fov, dark, bright, low_contrast, blurred,
vessel_density_low, vessel_density_high. The thresholds (THRESHOLDS) were chosen by
benchmarks/qc_thresholds.py from the 122 real photographs in ../shared/data (DRIVE, the
Retina Blood Vessel set, LES-AV) and synthetic degradations of them; its output, with the
reasoning, is in benchmarks/README.md ("Quality flags").
"""

from __future__ import annotations

import cv2
import numpy as np

from .measure import GRID
from .preprocess import letterbox

INNER_MARGIN = 10
COLUMNS = ["qc_brightness", "qc_contrast", "qc_sharpness", "qc"]

THRESHOLDS = {
    "dark": 25.0,  # qc_brightness below
    "bright": 200.0,  # qc_brightness above
    "low_contrast": 0.035,  # qc_contrast below
    "blurred": 0.21,  # qc_sharpness below
    "vessel_density_low": 0.05,  # vessel_density below
    "vessel_density_high": 0.20,  # vessel_density above
}


def image_quality(rgb: np.ndarray, fov: np.ndarray) -> dict:
    """qc_brightness, qc_contrast, qc_sharpness of an RGB uint8 photograph whose field of view
    is `fov` (any size; resized to the photograph's). None where the FOV has no inside."""
    fov = (np.asarray(fov) > 0).astype(np.uint8)
    if fov.shape != rgb.shape[:2]:
        fov = cv2.resize(fov, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    x, y, w, h = cv2.boundingRect(fov)
    empty = dict.fromkeys(COLUMNS[:3])
    if w == 0:
        return empty
    box = (x, y, x + w, y + h)
    canvas = letterbox(rgb, box, GRID)[0]
    inside = letterbox(fov * 255, box, GRID)[0] >= 128
    side = 2 * INNER_MARGIN + 1
    inside = cv2.erode(inside.astype(np.uint8), np.ones((side, side), np.uint8)) > 0
    if np.count_nonzero(inside) < 100:
        return empty
    green = canvas[:, :, 1].astype(np.float32)
    smooth = {s: cv2.GaussianBlur(green, (0, 0), s) for s in (0.5, 1.0, 4.0, 8.0)}

    def spread(fine, coarse) -> float:
        return float((fine - coarse)[inside].std())

    luminance = cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY)[inside]
    contrast = spread(green, smooth[8.0]) / max(float(green[inside].mean()), 1.0)
    sharpness = spread(smooth[0.5], smooth[1.0]) / max(spread(smooth[1.0], smooth[4.0]), 1e-3)
    return {"qc_brightness": round(float(luminance.mean()), 2),
            "qc_contrast": round(contrast, 5), "qc_sharpness": round(sharpness, 4)}


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
