"""From a decoded photograph to the model's square working canvas, and back.

Every photograph is cropped to its field of view (FOV) and scaled so the FOV fills the working
canvas. Vessel calibres in pixels then depend on the FOV size, not on the camera's sensor size,
which is what lets a model trained on DRIVE (565 px FOV) work on 3504x2336 photographs. Training
and inference use these same functions, so the model always sees the geometry it was trained on.

The *decisions* (FOV from a thumbnail, `plan_letterbox`: crop, scale, placement) are made here
for every path; the pixel work that applies them has two implementations with the same names:
this module (OpenCV, host memory) and preprocess_gpu.py (PyTorch, on any device). The host's
cost per image matters as much as the model's behind a GPU, so the per-pixel steps here avoid
full-size float maps where a uint8 one carries the same answer (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# FOV detection works on a thumbnail: the rim is large and smooth, full resolution buys nothing.
FOV_THUMB = 256
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
    mask: np.ndarray | None  # uint8 0/1 at the image's size (None: only `small` was made)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the FOV in the image
    found: bool  # False: no dark rim found, the whole frame is used
    small: np.ndarray | None = None  # the mask at thumbnail size (what a GPU path uploads)

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def fov_thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The brightest channel of a <= 256 px thumbnail: all that FOV detection looks at (the rim
    is large and smooth, full resolution buys nothing)."""
    h, w = rgb.shape[:2]
    scale = FOV_THUMB / max(h, w)
    thumb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    # Channel by channel: numpy's max(axis=2) over a 3-wide axis is ~10x slower.
    return np.maximum(np.maximum(thumb[:, :, 0], thumb[:, :, 1]), thumb[:, :, 2])


def percentile_u8(values: np.ndarray, q: float) -> float:
    """np.percentile(values, q) of a uint8 array, bit for bit (numpy's default 'linear' method,
    its own index and interpolation formulas), from a 256-bin histogram instead of a sort
    (a thumbnail: ~0.04 ms against ~0.6 ms)."""
    values = np.ascontiguousarray(values)
    if values.size < 1 << 24:  # float32 bin counts are exact below 2**24
        counts = cv2.calcHist([values.reshape(-1, 1)], [0], None, [256], [0, 256]).ravel()
    else:
        counts = np.bincount(values.ravel(), minlength=256)
    cumulative = np.cumsum(counts.astype(np.int64))
    n = int(cumulative[-1])
    quantile = np.true_divide(q, 100)
    index = (n - 1) * quantile
    below = np.floor(index)
    gamma = index - below
    lo = int(min(max(below, 0), n - 1))
    a = np.float64(np.searchsorted(cumulative, lo, side="right"))
    b = np.float64(np.searchsorted(cumulative, min(lo + 1, n - 1), side="right"))
    diff = b - a
    return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def _nearest_span(present: np.ndarray, length: int) -> tuple[int, int]:
    """First and last+1 index of `present` (a 0/1 row) after an INTER_NEAREST resize to
    `length`: the bounding box of the full-size mask, from the thumbnail (OpenCV's nearest
    neighbour maps each axis independently, so a 1-row resize gives the same columns)."""
    row = cv2.resize(present.astype(np.uint8)[None], (length, 1),
                     interpolation=cv2.INTER_NEAREST)[0]
    hits = np.flatnonzero(row)
    return int(hits[0]), int(hits[-1]) + 1


def _largest_component_outline(binary: np.ndarray) -> np.ndarray | None:
    """Outer-boundary points of the largest 8-connected component (by pixel count), or None.

    Usually the thresholded thumbnail is one component: findContours' two-level hierarchy
    (RETR_CCOMP) has one top-level contour per 8-connected component, so one top-level
    contour settles it without labelling every pixel (connectedComponentsWithStats is ~5x
    slower); several fall back to counting pixels per component."""
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = [c for c, link in zip(contours, hierarchy[0] if contours else [], strict=True)
             if link[3] < 0]
    if len(outer) > 1:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        outer, _ = cv2.findContours((labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL,
                                    cv2.CHAIN_APPROX_SIMPLE)
    return np.concatenate(outer) if outer else None


def _dark_corners(bright: np.ndarray, p99: float) -> tuple[float, float] | None:
    """(level, noise) of the rim, measured in the thumbnail's four corners, or None where the
    corners are not dark against the retina (`p99`: its bright end), so there is no rim to
    measure. The corners lie outside the FOV's circle in every camera we know of, even where
    the circle is cut at top and bottom."""
    h, w = bright.shape
    side = max(2, min(h, w) // 12)
    corners = np.concatenate([bright[:side, :side], bright[:side, -side:],
                              bright[-side:, :side], bright[-side:, -side:]], axis=None)
    background = percentile_u8(corners, 50)
    noise = percentile_u8(corners, 95) - background
    return (background, noise) if background + noise < 0.25 * p99 else None


def _convex_fov(bright: np.ndarray, level: float) -> np.ndarray | None:
    """The filled convex hull of the largest component brighter than `level` (0/1 uint8 at
    the thumbnail's size), or None."""
    binary = (bright > level).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    outline = _largest_component_outline(binary)
    if outline is None:
        return None
    # The hull of a region is the hull of its outer boundary: hulling the outline's points
    # instead of every pixel's gives the same polygon ~10x faster.
    small = np.zeros(binary.shape, np.uint8)
    cv2.fillConvexPoly(small, cv2.convexHull(outline), 1)
    return small


def _fov_on_thumbnail(bright: np.ndarray) -> np.ndarray | None:
    """The FOV on the thumbnail (see fov_from_thumbnail), or None.

    Where the rim can be measured (dark corners) the threshold is set from it, in two passes:
    first just above the rim's own level and noise, which finds the FOV even where its
    periphery is dim (vignetting) or the rim is grey and grainy (scanned film, some JPEGs);
    then, in a band along that FOV's edge only, a quarter of the way from the rim to the
    brightness there, so the thumbnail pixels that the edge blurs into the rim go with the
    rim only when they are mostly rim (generous on purpose: a rim pixel too many in the FOV
    costs nothing, a FOV pixel too few zeroes a vessel at the edge).
    Where the corners are not dark: a fixed fraction of the brightest retina."""
    p99 = percentile_u8(bright, 99)
    rim = _dark_corners(bright, p99)
    if rim is None:
        return _convex_fov(bright, max(8.0, 0.12 * p99))
    background, noise = rim
    level = background + noise + max(6.0, 0.03 * (p99 - background))
    first = _convex_fov(bright, level)
    if first is None:
        return None
    ring = first - cv2.erode(first, np.ones((5, 5), np.uint8))
    if not ring.any():
        return first
    edge = percentile_u8(bright[ring > 0], 50)
    if edge <= level:
        return first
    # Only the edge band is decided again (thresholding everything at that level would let
    # the vessels cut the FOV apart); the hull closes the notches they leave in the band.
    trimmed = first.copy()
    trimmed[(ring > 0) & (bright <= background + 0.25 * (edge - background))] = 0
    contours, _ = cv2.findContours(trimmed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    small = np.zeros(first.shape, np.uint8)
    cv2.fillConvexPoly(small, cv2.convexHull(np.concatenate(contours)), 1)
    return small & first  # filling a hull again can add a pixel row: never grow the FOV here


def fov_from_thumbnail(bright: np.ndarray, size: tuple[int, int],
                       full_mask: bool = True) -> FieldOfView:
    """The field of view of an image of `size` (width, height) from its fov_thumbnail.

    The rim outside the FOV is dark in every camera we know of; the brightest channel
    separates it from even the darkest retina. The FOV is convex, so the convex hull of the
    largest bright component fills vessels and dark lesions that thresholding would punch out.
    `full_mask=False` skips the image-size mask (a GPU path makes it on the device from
    `small`); the box is the same either way.
    """
    w, h = size
    whole = FieldOfView(np.ones((h, w), np.uint8) if full_mask else None, (0, 0, w, h), False,
                        np.ones(bright.shape, np.uint8))
    small = _fov_on_thumbnail(bright)
    if small is None:
        return whole
    fraction = cv2.countNonZero(small) / small.size
    if not (_FOV_MIN_FRACTION <= fraction <= _FOV_MAX_FRACTION):
        return whole
    x0, x1 = _nearest_span(small.any(axis=0), w)
    y0, y1 = _nearest_span(small.any(axis=1), h)
    mask = None
    if full_mask:
        mask = small if small.shape == (h, w) else cv2.resize(small, (w, h),
                                                               interpolation=cv2.INTER_NEAREST)
    return FieldOfView(mask, (x0, y0, x1, y1), True, small)


def detect_fov(rgb: np.ndarray) -> FieldOfView:
    """The field of view of a decoded photograph (see fov_from_thumbnail)."""
    return fov_from_thumbnail(fov_thumbnail(rgb), (rgb.shape[1], rgb.shape[0]))


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
    # The crop in the pixels the canvas is made from (the decoded image, maybe reduced), and
    # whether it shrinks (area averaging) or grows (bilinear) onto the canvas.
    source_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    shrinks: bool = False


def scale_box(box: tuple[int, int, int, int], sx: float, sy: float, limit: tuple[int, int]):
    """A box from decoded-image pixels to original-image pixels (reduced decoding)."""
    w, h = limit
    x0, y0, x1, y1 = box
    return (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
            min(w, int(np.ceil(x1 * sx))), min(h, int(np.ceil(y1 * sy))))


def plan_letterbox(box: tuple[int, int, int, int], source_size: tuple[int, int], canvas: int,
                   image_size: tuple[int, int] | None = None) -> Letterbox:
    """Every decision of the letterbox, no pixels: the crop `box` of an image of `source_size`
    (width, height, as decoded) scaled so its longer side fills `canvas`, centred. Both pixel
    implementations (letterbox here, preprocess_gpu.letterbox) apply this same plan."""
    w, h = source_size
    orig_w, orig_h = image_size or (w, h)
    x0, y0, x1, y1 = (min(max(v, 0), limit) for v, limit in zip(box, (w, h, w, h),
                                                                  strict=True))
    cw, ch = max(0, x1 - x0), max(0, y1 - y0)
    scale = canvas / max(ch, cw, 1)
    nw, nh = max(1, min(canvas, round(cw * scale))), max(1, min(canvas, round(ch * scale)))
    ox, oy = (canvas - nw) // 2, (canvas - nh) // 2
    orig_box = scale_box(box, orig_w / w, orig_h / h, (orig_w, orig_h))
    return Letterbox(orig_box, (ox, oy, ox + nw, oy + nh), canvas, (orig_w, orig_h),
                     (x0, y0, x1, y1), scale < 1)


def letterbox(rgb: np.ndarray, box: tuple[int, int, int, int], canvas: int,
              image_size: tuple[int, int] | None = None,
              interpolation: int = cv2.INTER_AREA) -> tuple[np.ndarray, Letterbox]:
    """Crop `box` out of `rgb`, scale its longer side to `canvas`, centre it on black.

    `image_size` is the original (width, height) when `rgb` was decoded at reduced size; the
    returned Letterbox is always in original-image pixels so the writer never needs the
    decoded size. `interpolation` is used when shrinking (bilinear when growing).
    """
    plan = plan_letterbox(box, (rgb.shape[1], rgb.shape[0]), canvas, image_size)
    x0, y0, x1, y1 = plan.source_box
    px0, py0, px1, py1 = plan.placed
    crop = rgb[y0:y1, x0:x1]
    out = np.zeros((canvas, canvas) + rgb.shape[2:], rgb.dtype)
    target = out[py0:py1, px0:px1]
    if target.shape[:2] == crop.shape[:2]:
        target[...] = crop
    else:  # straight into the canvas (OpenCV writes into a strided view): no temporary
        resized = cv2.resize(crop, (px1 - px0, py1 - py0), dst=target,
                             interpolation=interpolation if plan.shrinks else cv2.INTER_LINEAR)
        if not np.shares_memory(resized, out):  # an OpenCV build that would not: copy
            target[...] = resized
    return out, plan


def blank_outside(canvas: np.ndarray, lb: Letterbox, fov_mask: np.ndarray) -> None:
    """Zero the canvas outside the FOV, in place (`fov_mask`: 0/1 at the decoded image's size).

    The model only ever saw near-black rims (both training cameras): a grey or grainy rim
    (scanned film, some JPEGs) reads as retina to it and costs Dice at the FOV's edge, and it
    shifts the per-image standardisation. Blanked, every camera's rim looks like training's.
    Measured with benchmarks/camera_shift.py (train/default/README.md)."""
    x0, y0, x1, y1 = lb.source_box
    px0, py0, px1, py1 = lb.placed
    if x1 <= x0 or y1 <= y0:
        return
    inside = cv2.resize(fov_mask[y0:y1, x0:x1], (px1 - px0, py1 - py0),
                        interpolation=cv2.INTER_NEAREST)
    region = canvas[py0:py1, px0:px1]
    # Zeros copied in where the mask says outside: ~0.03 ms a 512 px canvas, against ~1 ms
    # for a numpy multiply or boolean index (benchmarks/README.md, host cost).
    outside = cv2.compare(inside, 0, cv2.CMP_EQ)
    done = cv2.copyTo(np.zeros_like(region), outside, region)
    if not np.shares_memory(done, canvas):  # an OpenCV build that copied the strided view
        region[...] = done


def _back_to_box(canvas_map: np.ndarray, lb: Letterbox) -> np.ndarray | None:
    """The placed part of a canvas-sized float map, resized to the crop box in original
    pixels (float32, bilinear); None for an empty box."""
    px0, py0, px1, py1 = lb.placed
    x0, y0, x1, y1 = lb.box
    if x1 <= x0 or y1 <= y0:
        return None
    region = canvas_map[py0:py1, px0:px1].astype(np.float32, copy=False)
    return cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)


def unletterbox(canvas_map: np.ndarray, lb: Letterbox) -> np.ndarray:
    """A canvas-sized float map back onto the original image grid (zero outside the crop)."""
    w, h = lb.image_size
    out = np.zeros((h, w), np.float32)
    region = _back_to_box(canvas_map, lb)
    if region is not None:
        x0, y0, x1, y1 = lb.box
        out[y0:y1, x0:x1] = region
    return out


@dataclass(frozen=True)
class Masked:
    """What the writer needs from one image's probabilities, at the original size."""

    mask: np.ndarray  # uint8 0/1: vessel inside the FOV
    fov: np.ndarray  # uint8 0/1 FOV mask
    fov_area: int
    vessel_pixels: int
    prob: np.ndarray | None = None  # float32, zero outside the FOV (only when asked for)
    quality: dict | None = None  # qc_* columns made with the mask (on a device), else None


def fov_mask_at(fov_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A FOV mask (decoded or thumbnail size) at (width, height), nearest neighbour."""
    w, h = size
    return fov_mask if fov_mask.shape == (h, w) else cv2.resize(
        fov_mask, (w, h), interpolation=cv2.INTER_NEAREST)


def threshold_in_fov(canvas_prob: np.ndarray, lb: Letterbox, fov_mask: np.ndarray,
                     threshold: float, keep_prob: bool = False) -> Masked:
    """Canvas probabilities -> the original image's mask: back to the crop box (bilinear, in
    float32 so the threshold cuts exactly where the model's map crosses it), threshold, zero
    outside the FOV. No full-size float map unless `keep_prob` (probability maps, scores)."""
    w, h = lb.image_size
    fov = fov_mask_at(fov_mask, (w, h))
    region = _back_to_box(canvas_prob, lb)
    mask = np.zeros((h, w), np.uint8)
    prob = np.zeros((h, w), np.float32) if keep_prob else None
    if region is not None:
        x0, y0, x1, y1 = lb.box
        mask[y0:y1, x0:x1] = region >= threshold
        if prob is not None:
            prob[y0:y1, x0:x1] = region
            prob *= fov
    mask &= fov
    return Masked(mask, fov, cv2.countNonZero(fov), cv2.countNonZero(mask), prob)


def prepare(rgb: np.ndarray, canvas: int, image_size: tuple[int, int] | None = None,
            fov: FieldOfView | None = None) -> tuple[np.ndarray, Letterbox, FieldOfView]:
    """Detect the FOV (unless given) and letterbox the FOV's bounding box onto the canvas."""
    fov = fov or detect_fov(rgb)
    tensor, lb = letterbox(rgb, fov.box, canvas, image_size)
    return tensor, lb, fov
