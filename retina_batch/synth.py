"""Synthetic fundus photographs for scale tests and benchmarks without data.

Not a model of any eye: a picture with the properties that cost time and memory in the pipeline
and that the vessel model responds to. A circular field of view (FOV) on a dark rim (what
preprocess.detect_fov looks for), an orange-red retina with vignetting, a tilted illumination
gradient and choroidal texture, a bright optic disc and a darker macula, two branching vessel
trees per arcade (arteries lighter and narrower than veins) whose calibre shrinks towards the
periphery, blurred edges, and sensor noise, so JPEG/PNG sizes and decode times are close to
those of real photographs of the same size (see benchmarks/README.md for the comparison).

Everything is scaled by the FOV radius, so a 128 px and a 3504 x 2336 image have the same
anatomy. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .io import write_atomic

FORMATS = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png"}


@dataclass(frozen=True)
class Vessel:
    points: np.ndarray  # K x 2 float, image pixels
    widths: np.ndarray  # K - 1 segment widths in pixels
    contrast: float  # 0..1 darkening of the green channel at full width


def _tree(rng, start, heading, width, radius, centre, contrast, out, curvature=0.0,
          depth=0):
    """Grow one vessel by a gently curving random walk; branches recurse, thinner."""
    step = 0.025 * radius
    min_width = max(0.6, 0.0035 * radius)
    points, widths = [np.array(start, float)], []
    wobble = 0.0
    while width >= min_width and len(points) < 160:
        wobble = 0.8 * wobble + rng.normal(0, 0.025)
        heading += curvature + wobble
        nxt = points[-1] + step * np.array([math.cos(heading), math.sin(heading)])
        if np.hypot(*(nxt - centre)) > 1.02 * radius:
            break
        points.append(nxt)
        widths.append(width)
        width *= 0.988
        if depth < 6 and len(points) > 2 and rng.random() < 0.075:
            side = rng.choice((-1.0, 1.0))
            _tree(rng, nxt, heading + side * rng.uniform(0.5, 1.0), width * rng.uniform(0.4, 0.7),
                  radius, centre, contrast * rng.uniform(0.85, 1.0), out,
                  rng.normal(0, 0.012), depth + 1)
            width *= 0.93
    if widths:
        out.append(Vessel(np.array(points), np.array(widths), contrast))


def vessel_tree(rng, disc, radius, centre, temporal: float) -> list[Vessel]:
    """Arteries and veins leaving the disc: two temporal arcades that bend round the macula,
    and two nasal trunks."""
    vessels: list[Vessel] = []
    w0 = 0.0185 * radius
    base = 0.0 if temporal > 0 else math.pi  # direction towards the macula
    for up in (-1, 1):  # image y grows downwards: -1 is the superior arcade
        for scale, contrast, offset in ((1.0, 0.45, 0.0), (0.72, 0.32, 0.12)):  # vein, artery
            heading = base + temporal * up * (1.25 + offset + rng.normal(0, 0.06))
            bend = -temporal * up * rng.uniform(0.022, 0.032)
            _tree(rng, disc, heading, w0 * scale, radius, centre, contrast, vessels, bend)
            nasal = base + math.pi - temporal * up * (0.75 + offset + rng.normal(0, 0.08))
            _tree(rng, disc, nasal, 0.75 * w0 * scale, radius, centre, contrast, vessels,
                  temporal * up * rng.uniform(0.0, 0.01))
    return vessels


def _draw(vessels: list[Vessel], shape, subpixel: int = 16) -> np.ndarray:
    """Vessel opacity 0..255 (uint8), anti-aliased; wide vessels drawn last so they win."""
    h, w = shape
    canvas = np.zeros((h, w), np.uint8)
    segments = []
    for v in vessels:
        pts = np.round(v.points * subpixel).astype(np.int64)
        for k, width in enumerate(v.widths):
            segments.append((width, v.contrast, pts[k], pts[k + 1]))
    segments.sort(key=lambda s: (s[0] >= 1.0, s[1] * min(s[0], 1.0), s[0]))
    shift = int(math.log2(subpixel))
    for width, _, p, q in segments:
        value = 255 if width >= 1.0 else int(255 * width)  # sub-pixel capillaries look fainter
        cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), value,
                 max(1, int(round(width))), cv2.LINE_AA, shift)
    return canvas


def _field(rng, shape, cells: int, amplitude: float) -> np.ndarray:
    """Smooth random field (float32, mean 1) from a coarse grid, bicubic upsampled."""
    h, w = shape
    grid = rng.normal(0, amplitude, (cells, max(2, round(cells * w / h)))).astype(np.float32)
    return 1.0 + cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _blob(shape, centre, sigma) -> np.ndarray:
    h, w = shape
    y = (np.arange(h, dtype=np.float32) - centre[1]) ** 2
    x = (np.arange(w, dtype=np.float32) - centre[0]) ** 2
    return np.exp(-(y[:, None] + x[None, :]) / (2 * sigma * sigma))


def synthesize(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(BGR uint8 photograph, bool vessel mask) of size width x height."""
    rng = np.random.default_rng(seed)
    shape = (height, width)
    centre = np.array([width / 2, height / 2]) + rng.normal(0, 0.01 * min(width, height), 2)
    radius = 0.47 * min(width, height) * rng.uniform(0.97, 1.0)
    temporal = rng.choice((-1.0, 1.0))  # right or left eye: which side the macula is on
    disc = centre + np.array([-temporal * 0.42 * radius, rng.normal(0, 0.04 * radius)])
    macula = disc + np.array([temporal * 0.75 * radius, 0.03 * radius])

    yy, xx = np.ogrid[:height, :width]
    rr = np.sqrt(((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2).astype(np.float32)) / radius
    light = 1.0 - 0.45 * np.clip(rr, 0, 1) ** 2.2  # vignetting towards the rim
    tilt = rng.uniform(0, 2 * math.pi)
    light = light * (1.0 + 0.18 * (((xx - centre[0]) * math.cos(tilt) + (yy - centre[1])
                                    * math.sin(tilt)) / radius).astype(np.float32))
    light *= _field(rng, shape, 5, 0.035) * _field(rng, shape, 48, 0.02)
    # fine choroidal grain, a few pixels across at any image size (what JPEG spends bytes on)
    grain = rng.standard_normal(shape, dtype=np.float32)
    light *= 1.0 + 0.025 * cv2.GaussianBlur(grain, (0, 0), max(0.8, 0.003 * radius)) \
        / max(0.2, 0.28 / max(0.8, 0.003 * radius))
    light *= 1.0 - 0.3 * _blob(shape, macula, 0.15 * radius)

    vessels = vessel_tree(rng, disc, radius, centre, temporal)
    opacity = _draw(vessels, shape).astype(np.float32) / 255.0
    mask = opacity >= 0.5
    opacity = cv2.GaussianBlur(opacity, (0, 0), max(0.6, 0.004 * radius))

    colour = np.array([88, 140, 245], np.float32) * rng.uniform(0.85, 1.08, 3)  # B, G, R
    # optic disc: a pale, sharp-edged ellipse in a soft halo, with the vessels crossing it
    d = np.sqrt(((xx - disc[0]) / 0.9) ** 2 + (yy - disc[1]) ** 2).astype(np.float32)
    edge = np.clip((0.13 * radius - d) / max(1.0, 0.012 * radius), 0, 1)
    glow = np.maximum(edge, 0.35 * _blob(shape, disc, 0.14 * radius)) * (1.0 - opacity)
    img = np.empty((height, width, 3), np.float32)
    for c, (lift, strength) in enumerate(zip((80, 95, 30), (0.30, 0.42, 0.18), strict=True)):
        img[:, :, c] = (colour[c] * light + lift * glow) * (1.0 - strength * opacity)

    fov = (rr <= 1.0).astype(np.float32)
    fov = cv2.GaussianBlur(fov, (0, 0), max(0.7, 0.004 * radius))
    img *= fov[:, :, None]
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    img += noise * (0.15 + 0.35 * fov[:, :, None])  # the rim: dark, nearly clean
    img += 3.0
    mask &= fov > 0.5
    return np.clip(img, 0, 255).astype(np.uint8), mask


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' or '512' -> (width, height); ValueError with a reason otherwise."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or min(numbers) < 32 or max(numbers) > 20000:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT, each 32..20000")
    return numbers[0], numbers[1]


def write_synthetic(out, n: int, size: tuple[int, int] = (512, 512), fmt: str = "jpg",
                    seed: int = 0, quality: int = 92, unique: int | None = None,
                    masks=None, on_image=None) -> list[Path]:
    """Write n synthetic photographs (synth_00000.jpg, ...) into `out`; returns their paths.

    `unique` < n draws only that many distinct images and repeats them (as hard links where the
    file system allows, else copies): enough for throughput and memory tests with thousands of
    files, and much faster to make. `masks` (a folder) also receives the drawn vessels as
    PNG masks of the same name (a ground truth for --truth). on_image(done, total) reports.
    """
    if fmt.lower() not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose jpg or png")
    ext = FORMATS[fmt.lower()]
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else \
        [cv2.IMWRITE_PNG_COMPRESSION, 3]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unique = n if unique is None else max(1, min(unique, n))
    paths = []
    digits = max(5, len(str(n - 1)))
    for i in range(n):
        path = out / f"synth_{i:0{digits}d}{ext}"
        if i < unique:
            image, vessels = synthesize(*size, seed=seed * 1_000_003 + i)
            write_atomic(path, cv2.imencode(ext, image, params)[1].tobytes())
            if masks is not None:
                write_atomic(Path(masks) / f"synth_{i:0{digits}d}.png",
                             cv2.imencode(".png", vessels.astype(np.uint8) * 255)[1].tobytes())
        else:
            _repeat(paths[i % unique], path)
        paths.append(path)
        if on_image:
            on_image(i + 1, n)
    return paths


def _repeat(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- a real photograph as another camera would give it (benchmarks/camera_shift.py, tests) ---

def grey_rim(image: np.ndarray, fov: np.ndarray, level: float = 30.0, seed: int = 0) -> np.ndarray:
    """A copy of `image` (H x W x 3) with everything outside `fov` replaced by grainy grey
    (mean `level`, sd 6): the rim of scanned film and some JPEG cameras, where ours is black."""
    out = image.copy()
    outside = ~fov.astype(bool)
    grain = np.random.default_rng(seed).normal(level, 6, (np.count_nonzero(outside), 3))
    out[outside] = np.clip(grain, 0, 255).astype(np.uint8)
    return out


def dim_edge(image: np.ndarray, fov: np.ndarray, edge: float = 0.3) -> np.ndarray:
    """`image` darkened towards the FOV's edge, to `edge` x its brightness there (vignetting,
    uneven illumination): a gain falling with the squared distance from the FOV's centre."""
    inside = fov.astype(bool)
    h, w = inside.shape
    cy, cx = np.argwhere(inside).mean(axis=0)
    yy, xx = np.mgrid[:h, :w]
    d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (np.count_nonzero(inside) / np.pi)
    return (image * np.clip(1 - (1 - edge) * d2, edge, 1)[..., None]).astype(np.uint8)
