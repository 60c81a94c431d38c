"""Augmentation aimed at other cameras and hospitals, not only DRIVE.

Geometry: any rotation, both flips, scale 0.75-1.33 (log-uniform), one warp per sample so crops
never show interpolation twice. FOV-size normalisation removes the camera's resolution but not
its field angle: a 30 degree photograph (LES-AV, CHASE) shows vessels ~1.5x thicker relative to
the FOV than a 45 degree one (DRIVE). A wider range (0.7-2.0) was measured and lost about 0.02
validation Dice on DRIVE at equal epochs without gaining on LES-AV (train/experiments/
r1-both-partial/ against r2-both-scale133-partial/): training on both cameras teaches the
thicker 30 degree vessels directly, so the range stays narrow.
Photometry: contrast/brightness, gamma, per-channel colour balance, blur (defocus), sensor noise
and JPEG artefacts (screening images are often JPEG). Optionally (`illumination`, off in the
default recipe) a smooth random gain field: cameras differ in vignetting and uneven flash, which
the global jitters above cannot imitate.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 256
    scale: tuple[float, float] = (0.75, 1.33)
    contrast: tuple[float, float] = (0.7, 1.4)
    brightness: float = 25.0
    gamma: tuple[float, float] = (0.7, 1.5)
    colour: float = 0.15
    p_blur: float = 0.2
    p_noise: float = 0.3
    p_jpeg: float = 0.2
    illumination: float = 0.0  # probability of a smooth gain field (0: off, no random draw)
    illumination_gain: float = 1.6  # the field's gains lie within [1/g, g]


def illumination_field(size: int, rng: np.random.Generator, gain: float) -> np.ndarray:
    """A size x size float32 gain field in [1/gain, gain], smooth over about a third of the
    crop: a 3x3 grid of log-uniform gains, bicubic-upsampled (clipped: bicubic overshoots)."""
    grid = np.exp(rng.uniform(-np.log(gain), np.log(gain), (3, 3))).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 1.0 / gain, gain)


def random_view(image: np.ndarray, target: np.ndarray, fov: np.ndarray,
                rng: np.random.Generator, cfg: AugmentConfig):
    """A rotated, scaled, flipped `cfg.crop`-sized view centred on a random FOV pixel."""
    size = cfg.crop
    ys, xs = np.nonzero(fov)
    if len(xs):
        i = rng.integers(len(xs))
        cx, cy = float(xs[i]), float(ys[i])
    else:
        cx, cy = image.shape[1] / 2, image.shape[0] / 2
    scale = float(np.exp(rng.uniform(*np.log(cfg.scale))))
    matrix = cv2.getRotationMatrix2D((cx, cy), float(rng.uniform(0, 360)), scale)
    matrix[:, 2] += (size / 2 - cx, size / 2 - cy)
    if rng.random() < 0.5:  # horizontal flip, folded into the same warp
        matrix[0] = -matrix[0]
        matrix[0, 2] += size - 1
    warp = dict(dsize=(size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return (cv2.warpAffine(image, matrix, **warp), cv2.warpAffine(target, matrix, **warp))


def photometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(*cfg.contrast) + rng.uniform(-cfg.brightness, cfg.brightness) / 255.0
    x = x * (1.0 + rng.uniform(-cfg.colour, cfg.colour, size=3)).astype(np.float32)
    x = np.clip(x, 0, 1) ** rng.uniform(*cfg.gamma)
    # Drawn only when enabled, so the default recipe's random stream (and weights) stay as shipped.
    if cfg.illumination and rng.random() < cfg.illumination:
        x = x * illumination_field(x.shape[0], rng, cfg.illumination_gain)[..., None]
    if rng.random() < cfg.p_blur:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.3))
    if rng.random() < cfg.p_noise:
        x = x + rng.normal(0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    out = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < cfg.p_jpeg:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


def augment(image: np.ndarray, target: np.ndarray, fov: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """One training view: uint8 crop x crop x 3 and float32 crop x crop target in [0, 1]."""
    view, view_target = random_view(image, target, fov, rng, cfg)
    return photometric(view, rng, cfg), view_target
