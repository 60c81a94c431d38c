"""From a decoded photograph to the model's square working canvas, and back.

Every photograph is cropped to its field of view (FOV) and scaled so the FOV fills the working
canvas. Vessel calibres in pixels then depend on the FOV size, not on the camera's sensor size,
which is what lets a model trained on DRIVE (565 px FOV) work on 3504x2336 photographs. Training
and inference use these same functions, so the model always sees the geometry it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# FOV detection works on a thumbnail: the rim is large and smooth, full resolution buys nothing.
_FOV_THUMB = 256
# A FOV covering (almost) the whole frame means there is no dark rim: probably not a fundus photo.
_FOV_MAX_FRACTION = 0.97
_FOV_MIN_FRACTION = 0.10


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image (gray, BGR, BGRA; 8 or 16 bit; float) as contiguous RGB uint8."""
    if img is None or img.size == 0:
        raise ValueError("empty image")
    if img.dtype == np.uint16:
        # Cameras often store 10-14 significant bits in a 16-bit file; a fixed >> 8 would turn
        # such a photograph almost black (and hide its field of view). Shift by the bits used.
        shift = max(0, int(img.max()).bit_length() - 8)
        img = (img >> shift).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise ValueError(f"unsupported channel count {channels}")


@dataclass(frozen=True)
class FieldOfView:
    mask: np.ndarray  # uint8 0/1 at the image's size
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the FOV in the image
    found: bool  # False: no dark rim found, the whole frame is used

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def detect_fov(rgb: np.ndarray) -> FieldOfView:
    """The bright, convex region of a fundus photograph, found on a thumbnail.

    The rim outside the FOV is near black in every camera we know of; the brightest channel
    separates it from even the darkest retina. The FOV is convex, so the convex hull of the
    largest bright component fills vessels and dark lesions that thresholding would punch out.
    """
    h, w = rgb.shape[:2]
    scale = _FOV_THUMB / max(h, w)
    thumb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    bright = thumb.max(axis=2)
    level = max(8.0, 0.12 * float(np.percentile(bright, 99)))
    binary = (bright > level).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    full = np.ones((h, w), np.uint8)
    if count < 2:
        return FieldOfView(full, (0, 0, w, h), False)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    points = cv2.findNonZero((labels == largest).astype(np.uint8))
    hull = cv2.convexHull(points)
    small = np.zeros(binary.shape, np.uint8)
    cv2.fillConvexPoly(small, hull, 1)
    fraction = float(small.mean())
    if not (_FOV_MIN_FRACTION <= fraction <= _FOV_MAX_FRACTION):
        return FieldOfView(full, (0, 0, w, h), False)
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST) if small.shape != (h, w) \
        else small
    x, y, bw, bh = cv2.boundingRect(mask)
    return FieldOfView(mask, (x, y, x + bw, y + bh), True)


# `--size auto`: photographs whose longer side reaches AUTO_LARGE_SIDE pixels go on a canvas
# 1.5x the model's working size (768 for 512), smaller ones on the working size itself. Why
# (benchmarks/canvas_sizes.py, train/default/README.md): on a 512 canvas a 3504 px photograph's
# finest vessels (3-5 px at full size) shrink below one canvas pixel; 768 keeps them at ~1 px and
# costs nothing measurable where we have labels (shipped model, DRIVE validation: Dice 0.795 at
# both sizes; 22 LES-AV photographs: 0.779 at 512, 0.775 at 768), while 1024 draws the large
# vessels thicker than training showed them (DRIVE validation 0.795 -> 0.759). Photographs
# below 2400 px (DRIVE, LES-AV, ...) keep the working size: nothing is gained there.
AUTO_LARGE_SIDE = 2400
AUTO_SCALE = 1.5


def choose_canvas(image_size: tuple[int, int], working_size: int, policy: int | str) -> int:
    """The canvas side for one photograph: `policy` is a side in pixels or "auto"."""
    if policy != "auto":
        return int(policy)
    return canvas_sizes(working_size, policy)[-1] if max(image_size) >= AUTO_LARGE_SIDE \
        else working_size


def canvas_sizes(working_size: int, policy: int | str) -> list[int]:
    """Every canvas side `policy` can choose (what the backend and its engine must accept)."""
    if policy != "auto":
        return [int(policy)]
    return [working_size, 32 * round(AUTO_SCALE * working_size / 32)]


@dataclass(frozen=True)
class Letterbox:
    """Where a crop of the image went on the square canvas; enough to map predictions back."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop, in ORIGINAL image pixels
    placed: tuple[int, int, int, int]  # x0, y0, x1, y1 where the crop landed on the canvas
    canvas: int  # side of the square canvas
    image_size: tuple[int, int]  # original (width, height)


def scale_box(box: tuple[int, int, int, int], sx: float, sy: float, limit: tuple[int, int]):
    """A box from decoded-image pixels to original-image pixels (reduced decoding)."""
    w, h = limit
    x0, y0, x1, y1 = box
    return (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
            min(w, int(np.ceil(x1 * sx))), min(h, int(np.ceil(y1 * sy))))


def letterbox(rgb: np.ndarray, box: tuple[int, int, int, int], canvas: int,
              image_size: tuple[int, int] | None = None,
              interpolation: int = cv2.INTER_AREA) -> tuple[np.ndarray, Letterbox]:
    """Crop `box` out of `rgb`, scale its longer side to `canvas`, centre it on black.

    `image_size` is the original (width, height) when `rgb` was decoded at reduced size; the
    returned Letterbox is always in original-image pixels so the writer never needs the
    decoded size.
    """
    h, w = rgb.shape[:2]
    orig_w, orig_h = image_size or (w, h)
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    scale = canvas / max(ch, cw)
    nw, nh = max(1, min(canvas, round(cw * scale))), max(1, min(canvas, round(ch * scale)))
    interp = interpolation if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(crop, (nw, nh), interpolation=interp) if (nw, nh) != (cw, ch) else crop
    ox, oy = (canvas - nw) // 2, (canvas - nh) // 2
    out = np.zeros((canvas, canvas) + rgb.shape[2:], rgb.dtype)
    out[oy:oy + nh, ox:ox + nw] = resized
    orig_box = scale_box(box, orig_w / w, orig_h / h, (orig_w, orig_h))
    return out, Letterbox(orig_box, (ox, oy, ox + nw, oy + nh), canvas, (orig_w, orig_h))


def unletterbox(canvas_map: np.ndarray, lb: Letterbox) -> np.ndarray:
    """A canvas-sized float map back onto the original image grid (zero outside the crop)."""
    w, h = lb.image_size
    out = np.zeros((h, w), np.float32)
    px0, py0, px1, py1 = lb.placed
    x0, y0, x1, y1 = lb.box
    if x1 <= x0 or y1 <= y0:
        return out
    region = canvas_map[py0:py1, px0:px1].astype(np.float32, copy=False)
    out[y0:y1, x0:x1] = cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return out


def prepare(rgb: np.ndarray, canvas: int, image_size: tuple[int, int] | None = None,
            fov: FieldOfView | None = None) -> tuple[np.ndarray, Letterbox, FieldOfView]:
    """Detect the FOV (unless given) and letterbox the FOV's bounding box onto the canvas."""
    fov = fov or detect_fov(rgb)
    tensor, lb = letterbox(rgb, fov.box, canvas, image_size)
    return tensor, lb, fov
