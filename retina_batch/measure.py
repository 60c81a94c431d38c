"""Vessel measurements of one binary mask, on the field-of-view-normalised grid.

The grid: the FOV's bounding box is cropped and scaled so its longer side is GRID (512) pixels,
exactly as `segment` letterboxes photographs onto the model's canvas (preprocess.letterbox), so
a calibre of 6 px means the same fraction of the FOV whatever the camera's resolution and
whatever model produced the mask. Masks are resampled by pixel area (INTER_AREA) and
re-thresholded at one half, so a mask already at grid size is measured as it is. Shrinking a
mask would break its thinnest vessels where they fall between two grid pixels (each then less
than half covered), so the centre line of the pixels at least a quarter covered is added: the
manual mask of DRIVE photograph 21, shrunk by 6%, fell into 108 pieces instead of 15 without it.

Columns (all on the grid; None where undefined, e.g. an empty mask):

    vessel_density     vessel pixels / FOV pixels
    skeleton_density   centre-line length (px) / FOV area (px^2). The centre line is
                       skimage's skeletonize (Zhang's thinning); its length counts a
                       horizontal or vertical step between skeleton pixels as 1 and a
                       diagonal step as sqrt(2) (a diagonal that only cuts a staircase corner
                       is not counted twice)
    branch_points      junctions: 8-connected clusters of skeleton pixels whose crossing
                       number (0 -> 1 transitions round the 8 neighbours) is 3 or more
    end_points         skeleton pixels with crossing number 1
    fractal_dimension  box counting on the vessel mask: slope of log N(s) against log(1/s)
                       for box sides s = 2, 4, 8, 16, 32, 64 px (FRACTAL_BOXES), least squares
    calibre_median_px  vessel width along the centre line (junction pixels excluded): at a
    calibre_mean_px    centre-line pixel, d0 + d1 where d0 is the distance transform there
                       and d1 the largest distance transform of its non-skeleton neighbours
                       (why this is exact for straight vessels: _calibres)
    tortuosity         mean over segments (centre line between junctions and ends, at least
                       MIN_SEGMENT_PX = 16 px of arc) of arc length / chord length; the arc is
                       the polyline through every SAMPLE_STEP-th pixel of the traced segment
                       (pixel-by-pixel steps would make a straight line at 22.5 degrees 8%
                       longer than it is); loops (ends closer than LOOP_CHORD_PX) are left out

Centre-line pieces of fewer than MIN_PIECE_PX pixels (specks) are left out of every skeleton
column; vessel_density and fractal_dimension count every vessel pixel.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from .preprocess import letterbox

GRID = 512
FRACTAL_BOXES = (2, 4, 8, 16, 32, 64)
MIN_SEGMENT_PX = 16.0
SAMPLE_STEP = 4
MIN_PIECE_PX = 16
LOOP_CHORD_PX = 8.0
COLUMNS = ["vessel_density", "skeleton_density", "branch_points", "end_points",
           "fractal_dimension", "calibre_median_px", "calibre_mean_px", "tortuosity"]

# Neighbour offsets in circular order (N, NE, E, SE, S, SW, W, NW); bit i of a pixel's
# neighbour code is set when neighbour i is on the skeleton. Everything about the skeleton is
# computed at its pixels only (a few thousand of the grid's 262,144), through these tables.
_RING = np.array([(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)])
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1
# Crossing number: 0 -> 1 transitions going once round the ring.
_CROSSINGS = ((_BITS == 0) & (np.roll(_BITS, -1, axis=1) == 1)).sum(axis=1)
N, NE, E, SE, S, SW, W, NW = _BITS.T
# Centre-line length owned by a pixel: its steps east and south (1 each), south-east and
# south-west (sqrt 2), a diagonal step counted only when it does not cut the corner of two
# straight steps that are already counted. Every step is then counted exactly once.
_LENGTH = E + S + math.sqrt(2) * (SE * (1 - E) * (1 - S) + SW * (1 - S) * (1 - W))
del N, NE, E, SE, S, SW, W, NW


def to_grid(mask: np.ndarray, fov: np.ndarray, size: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """(vessels, fov) as bool size x size: the FOV's bounding box letterboxed like segment's
    canvas, vessels outside the FOV dropped. Raises ValueError for an empty FOV."""
    fov = (np.asarray(fov) > 0).astype(np.uint8)
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if fov.shape != mask.shape:
        fov = cv2.resize(fov, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
    x, y, w, h = cv2.boundingRect(fov)
    if w == 0:
        raise ValueError("the field-of-view mask is empty")
    box = (x, y, x + w, y + h)
    fov_grid = letterbox(fov * 255, box, size)[0] >= 128
    coverage = letterbox(mask * 255, box, size)[0]
    vessels = coverage >= 128
    if max(w, h) > size:  # shrunk: keep the thinnest vessels connected (module docstring)
        from skimage.morphology import skeletonize

        vessels |= skeletonize(coverage >= 64)
    return vessels & fov_grid, fov_grid


def measure_mask(mask: np.ndarray, fov: np.ndarray | None = None) -> dict:
    """Every column of COLUMNS for a binary vessel mask (any size; `fov`: the field of view at
    any size, default the whole image). Values are rounded for the CSV."""
    if fov is None:
        fov = np.ones(np.shape(mask)[:2], np.uint8)
    if not _any(mask):  # nothing to measure: skip the grid (~1 ms at 512 px, more when larger)
        if not _any(fov):
            raise ValueError("the field-of-view mask is empty")
        return dict(_empty())
    vessels, fov_grid = to_grid(mask, fov)
    return measure_grid(vessels, fov_grid)


def _any(image) -> bool:
    """Whether any pixel is nonzero; in C for uint8 and bool images."""
    image = np.asarray(image)
    if image.dtype in (np.uint8, np.bool_) and image.ndim == 2:
        return cv2.hasNonZero(image.view(np.uint8))
    return bool(np.any(image))


def measure_grid(vessels: np.ndarray, fov: np.ndarray) -> dict:
    """COLUMNS for a mask already on the grid (bool, vessels inside `fov` only)."""
    from skimage.morphology import skeletonize

    fov_area = max(int(np.count_nonzero(fov)), 1)
    vessel_area = int(np.count_nonzero(vessels))
    fd = fractal_dimension(vessels)  # on the whole grid: its boxes are the grid's
    # The skeleton work on the vessels' bounding box only, with a background border: every
    # skeleton pixel then has its 8 neighbours inside the array.
    x, y, w, h = cv2.boundingRect(vessels.view(np.uint8))
    vessels = np.pad(vessels[y:y + h, x:x + w], 1)
    skeleton = skeletonize(vessels).view(np.uint8)
    ys, xs = _without_specks(skeleton)
    codes = (_ring(skeleton, ys, xs) << np.arange(8, dtype=np.uint8)).sum(1)
    crossings = _CROSSINGS[codes]
    junctions = np.zeros(skeleton.shape, np.uint8)
    junctions[ys[crossings >= 3], xs[crossings >= 3]] = 1
    # Without its junction pixel a fork can stay 8-connected through its branches' first
    # pixels (diagonal neighbours of each other): segments start outside the 3 x 3 around it.
    away = cv2.dilate(junctions, np.ones((3, 3), np.uint8))[ys, xs] == 0
    segments = np.zeros(skeleton.shape, np.uint8)
    segments[ys[away], xs[away]] = 1
    calibres = _calibres(vessels, skeleton, ys[away], xs[away])
    return {
        "vessel_density": round(vessel_area / fov_area, 5),
        "skeleton_density": round(float(_LENGTH[codes].sum()) / fov_area, 6),
        "branch_points": cv2.connectedComponents(junctions, connectivity=8)[0] - 1,
        "end_points": int(np.count_nonzero(crossings == 1)),
        "fractal_dimension": _rounded(fd, 4),
        "calibre_median_px": _rounded(np.median(calibres) if calibres.size else None, 3),
        "calibre_mean_px": _rounded(calibres.mean() if calibres.size else None, 3),
        "tortuosity": _rounded(_mean_tortuosity(segments), 4),
    }


@functools.cache
def _empty() -> dict:
    """What measure_grid gives for a grid without vessels (whatever the FOV): measure_mask
    returns it for an empty mask without making the grid."""
    return measure_grid(np.zeros((GRID, GRID), bool), np.ones((GRID, GRID), bool))


def _without_specks(skeleton: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove pieces of fewer than MIN_PIECE_PX pixels from `skeleton` (uint8, in place);
    returns the coordinates of the pixels left.

    Isolated specks (noise in predicted masks, a few pixels each) would otherwise add two end
    points apiece: on DRIVE they made the end-point counts of predicted and manual masks
    anti-correlated (README, "Measurements").
    """
    labels = cv2.connectedComponents(skeleton, connectivity=8)[1]  # WithStats: 4x slower
    ys, xs = np.nonzero(skeleton)
    piece = labels[ys, xs]
    keep = np.bincount(piece)[piece] >= MIN_PIECE_PX
    skeleton[ys[~keep], xs[~keep]] = 0
    return ys[keep], xs[keep]


def _rounded(value, digits: int):
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _ring(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """len(ys) x 8: the values of the 8 neighbours (in _RING order) of pixels off the border."""
    width = image.shape[1]
    return image.ravel()[(ys * width + xs)[:, None] + (_RING[:, 0] * width + _RING[:, 1])]


def _calibres(vessels: np.ndarray, skeleton: np.ndarray, ys: np.ndarray,
              xs: np.ndarray) -> np.ndarray:
    """Vessel width at the centre-line pixels (ys, xs).

    The distance transform d (to the nearest background pixel centre) across a vessel of width
    w is a tent sampled at pixel centres. For odd w the centre line sits on the tent's peak:
    d0 = (w + 1) / 2 and the pixels beside it have d1 = d0 - 1, so d0 + d1 = w. For even w the
    peak falls between two pixels that both have d = w / 2, one of which is on the skeleton:
    d0 + d1 = w again. (Plain 2 * d0 would give w + 1 for odd and w for even widths.)
    5x5 chamfer distances: exact along rows and columns, within 2% obliquely, 5x cheaper than
    the exact Euclidean transform on this grid.
    """
    dist = cv2.distanceTransform(vessels.astype(np.uint8), cv2.DIST_L2, 5)
    beside = _ring(dist, ys, xs) * (_ring(skeleton, ys, xs) == 0)
    return dist[ys, xs] + beside.max(axis=1, initial=0.0)


def fractal_dimension(vessels: np.ndarray, boxes=FRACTAL_BOXES) -> float | None:
    """Box-counting dimension of a bool mask over the box sides `boxes` (powers of two).

    N(s) is the smallest count over four placements of the box grid (shifted by 0 or s/2 in
    each direction): a fixed grid adds up to a row of boxes at every edge of a finite shape,
    which bends the fit at large boxes (a 300-px square would measure 1.88 instead of 2).
    """
    if not vessels.any():
        return None
    h, w = vessels.shape
    big = max(boxes)  # whole largest boxes, with room for the shifted placements
    occupied = np.zeros((-(-h // big) * big + big, -(-w // big) * big + big), np.uint8)
    occupied[:h, :w] = vessels  # occupied: which boxes of the current side hold vessel
    counts, s = {}, 1
    while s < max(boxes):
        # Any of 2 x 2 boxes (a 2 x 2 max filter), then every other one from each of the
        # four starting corners: the four placements of the boxes twice the size.
        pairs = cv2.dilate(occupied, np.ones((2, 2), np.uint8), anchor=(0, 0),
                           borderType=cv2.BORDER_CONSTANT, borderValue=0)
        counts[2 * s] = min(np.count_nonzero(pairs[dy::2, dx::2])
                            for dy in (0, 1) for dx in (0, 1))
        occupied, s = pairs[0::2, 0::2], 2 * s
    x = np.log(1.0 / np.array(boxes, float))
    y = np.log(np.array([counts[b] for b in boxes], float))
    return float(np.polyfit(x, y, 1)[0])


def segment_arcs(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(arc length, chord length) of every open segment of a junction-free skeleton.

    OpenCV's border following walks a one-pixel-wide curve out and back; the walk reverses at
    the curve's two ends (the points before and after are the same pixel), so the stretch
    between the first two reversals is the curve traced from end to end. Vectorised over all
    segments at once: a retina has hundreds of them and a Python loop would cost more than
    the rest of the measurements together. Closed loops (no reversal) are left out.
    """
    contours, _ = cv2.findContours(segments.astype(np.uint8), cv2.RETR_LIST,
                                   cv2.CHAIN_APPROX_NONE)
    n = np.fromiter(map(len, contours), int, len(contours))
    # A walk visits each pixel of a curve twice, and a curve of MIN_SEGMENT_PX has at least
    # MIN_SEGMENT_PX / sqrt(2) pixels: shorter walks cannot become a counted segment.
    long_enough = np.flatnonzero(n >= 2 * MIN_SEGMENT_PX / math.sqrt(2) - 2)
    if not long_enough.size:
        return np.zeros(0), np.zeros(0)
    walks, n = [contours[i] for i in long_enough], n[long_enough]
    pts = np.concatenate(walks).reshape(-1, 2).astype(np.float64)
    start = np.cumsum(n) - n
    owner = np.repeat(np.arange(len(n)), n)
    local = np.arange(len(pts)) - start[owner]
    before = start[owner] + (local - 1) % n[owner]
    after = start[owner] + (local + 1) % n[owner]
    reversal = np.flatnonzero((pts[before] == pts[after]).all(axis=1))
    # A simple open curve reverses exactly twice; anything else (a loop) is left out.
    simple = np.flatnonzero(np.bincount(owner[reversal], minlength=len(n)) == 2)
    ends = reversal[np.isin(owner[reversal], simple)].reshape(-1, 2)
    a, b = ends[:, 0], ends[:, 1]
    return _polyline_lengths(pts, a, b), np.hypot(*(pts[b] - pts[a]).T)


def _polyline_lengths(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the polyline through pts[a], pts[a + k], ..., pts[b] for each (a, b)."""
    count = (b - a + SAMPLE_STEP - 1) // SAMPLE_STEP + 1
    which = np.repeat(np.arange(len(a)), count)
    rank = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    index = np.minimum(a[which] + SAMPLE_STEP * rank, b[which])
    steps = np.hypot(*np.diff(pts[index], axis=0).T)
    same = which[1:] == which[:-1]
    return np.bincount(which[1:][same], steps[same], minlength=len(a))


def _mean_tortuosity(segments: np.ndarray) -> float | None:
    arc, chord = segment_arcs(segments)
    # A segment whose ends are closer than LOOP_CHORD_PX left and re-entered the same junction:
    # a loop (a vessel crossing itself), not a vessel segment; its arc / chord is meaningless
    # (one such loop gave 52 and took an image's mean from 1.01 to 1.74).
    keep = (arc >= MIN_SEGMENT_PX) & (chord >= LOOP_CHORD_PX)
    return float(np.mean(arc[keep] / chord[keep])) if keep.any() else None
