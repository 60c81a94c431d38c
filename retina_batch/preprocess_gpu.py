"""preprocess.py's pixel work in PyTorch, on whatever device the image tensors live on.

Same names as preprocess.py, same decisions: the FOV comes from `preprocess.fov_from_thumbnail`
(run on the host, on a 256 px thumbnail: cheap and branchy, so it stays where it is cheapest)
and every crop, scale and placement from `preprocess.plan_letterbox`. Only applying them to
pixels differs: here on a GPU (or the CPU, which is how CI checks that both paths give the same
masks, tests/test_preprocess_gpu.py). A photograph crosses the bus once, as decoded uint8; what
comes back is the uint8 mask at the original size (and the probability map when asked for).

Resampling reproduces OpenCV's formulas rather than torch's look-alikes, because the model is
sensitive to them (torch's "area" mode, adaptive average pooling, differs from cv2.INTER_AREA by
up to 65 grey levels at non-integer ratios, which moved mask Dice to 0.94 on a DRIVE
photograph): shrinking uses cv2.INTER_AREA's pixel-coverage weights as separable weight
matrices (two matrix products per image, cheap on a GPU), growing reproduces cv2.INTER_LINEAR's
uint8 fixed-point arithmetic in integer tensor ops (the float formula differs from it by one
grey level on 12% of pixels, which moved mask Dice to 0.996); nearest neighbour uses
OpenCV's source indices (floor of dst x in/out, in double); probability maps use bilinear
float interpolation (F.interpolate, align_corners=False: the same formula as cv2's float
path). What remains are float rounding differences: canvases within a grey level or so, masks
within a few boundary pixels (Dice >= 0.999 is the tested bound).

Images are H x W x 3 uint8 tensors (as decoded, RGB); probabilities canvas x canvas float.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import (
    FOV_THUMB,
    FieldOfView,
    Letterbox,
    Masked,
    fov_from_thumbnail,
    plan_letterbox,
)


# --- OpenCV's resampling weights (host, numpy), applied on the device -----------------------
def area_weights(src: int, dst: int) -> np.ndarray:
    """dst x src matrix of cv2.INTER_AREA (shrinking): each output pixel averages the source
    pixels its footprint covers, weighted by coverage (OpenCV's computeResizeAreaTab)."""
    scale = src / dst
    weights = np.zeros((dst, src), np.float64)
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = int(np.ceil(f1)), int(np.floor(f2))
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            weights[d, s1 - 1] = (s1 - f1) / cell
        weights[d, s1:s2] = 1.0 / cell
        if f2 - s2 > 1e-3:
            weights[d, s2] = min(min(f2 - s2, 1.0), cell) / cell
    return weights.astype(np.float32)


def linear_table(src: int, dst: int) -> np.ndarray:
    """4 x dst int32 rows (first source index, second, their weights in 1/2048) of
    cv2.INTER_LINEAR: half-pixel centres in float32, borders clamped, weights rounded to
    11 bits, as OpenCV's computeResizeLinear does for uint8."""
    position = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    frac = (position - first.astype(np.float32)).astype(np.float32)
    clamped = (first < 0) | (first >= src - 1)
    frac[clamped] = 0
    first = np.clip(first, 0, src - 1)
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048))
    w1 = np.rint(frac * np.float32(2048))
    return np.stack([first, np.minimum(first + 1, src - 1), w0, w1]).astype(np.int32)


def _linear_u8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H x W x C uint8 -> h x w x C uint8 as cv2.INTER_LINEAR computes it on x86: integer
    rows (source x weights), then the vector path's rounding of the vertical blend,
    ((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2 (resize.cpp,
    VResizeLinearVec_32s8u). Matches OpenCV on all but its clamped first and last rows, where
    it differs by at most 1 (OpenCV's border rows take another path)."""
    h, w = size
    device = str(image.device)
    x0, x1, a0, a1 = _on_device(linear_table, image.shape[1], w, device)
    y0, y1, b0, b1 = _on_device(linear_table, image.shape[0], h, device)
    pixels = image.to(torch.int32)
    rows = pixels[:, x0.long()] * a0[None, :, None] + pixels[:, x1.long()] * a1[None, :, None]
    top, bottom = rows[y0.long()] >> 4, rows[y1.long()] >> 4
    blended = ((b0[:, None, None] * top) >> 16) + ((b1[:, None, None] * bottom) >> 16)
    return ((blended + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each output pixel for cv2.INTER_NEAREST: floor(d * src/dst), in double
    precision as OpenCV computes it."""
    scale = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * scale).astype(np.int64), src - 1)


@lru_cache(maxsize=512)
def _on_device(kind, src: int, dst: int, device: str) -> torch.Tensor:
    """Weights (or indices) by sizes, made and uploaded once: photographs of one camera share
    sizes, so a batch costs no host work or bus traffic for them after the first."""
    return torch.from_numpy(kind(src, dst)).to(device)


def _resample(image: torch.Tensor, size: tuple[int, int], weights) -> torch.Tensor:
    """H x W x C float image -> h x w x C with separable weight matrices (rows, then columns)."""
    h, w = size
    if tuple(image.shape[:2]) == (h, w):
        return image
    device = str(image.device)
    ay = _on_device(weights, image.shape[0], h, device)
    ax = _on_device(weights, image.shape[1], w, device)
    rows = torch.tensordot(ay, image, dims=([1], [0]))  # h x W x C
    return torch.tensordot(ax, rows, dims=([1], [1])).transpose(0, 1)  # h x w x C


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)


def thumbnail_on_device(rgb: torch.Tensor) -> torch.Tensor:
    """The brightest channel of a <= 256 px thumbnail (see preprocess), left on the device."""
    h, w = rgb.shape[:2]
    scale = FOV_THUMB / max(h, w)
    thumb = rgb
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        thumb = _to_uint8(_resample(rgb.float(), size, area_weights))
    return thumb.amax(dim=2)


def fov_thumbnail(rgb: torch.Tensor) -> np.ndarray:
    """thumbnail_on_device, fetched to the host."""
    return thumbnail_on_device(rgb).cpu().numpy()


def detect_fovs(images: list[torch.Tensor]) -> list[FieldOfView]:
    """detect_fov for a batch: the thumbnails made on the device and fetched in one transfer
    (one wait for the device per batch, not one per photograph), decided on the host."""
    if not images:
        return []
    thumbs = [thumbnail_on_device(rgb) for rgb in images]
    fetched = torch.cat([t.reshape(-1) for t in thumbs]).cpu().numpy()
    fovs, offset = [], 0
    for rgb, thumb in zip(images, thumbs, strict=True):
        small = fetched[offset:offset + thumb.numel()].reshape(tuple(thumb.shape))
        offset += thumb.numel()
        fovs.append(fov_from_thumbnail(small, (rgb.shape[1], rgb.shape[0]), full_mask=False))
    return fovs


def detect_fov(rgb: torch.Tensor) -> FieldOfView:
    """FOV of an image tensor: thumbnail here, decisions on the host; `small` holds the mask
    at thumbnail size and `mask` is None (fov_mask_at makes it on the device)."""
    return detect_fovs([rgb])[0]


def letterbox(rgb: torch.Tensor, box: tuple[int, int, int, int], canvas: int,
              image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, Letterbox]:
    """The canvas (canvas x canvas x 3 uint8, on rgb's device) and its plan."""
    plan = plan_letterbox(box, (rgb.shape[1], rgb.shape[0]), canvas, image_size)
    x0, y0, x1, y1 = plan.source_box
    px0, py0, px1, py1 = plan.placed
    crop = rgb[y0:y1, x0:x1]
    out = torch.zeros((canvas, canvas, rgb.shape[2]), dtype=torch.uint8, device=rgb.device)
    size = (py1 - py0, px1 - px0)
    if tuple(crop.shape[:2]) == size:
        out[py0:py1, px0:px1] = crop
    elif plan.shrinks:
        out[py0:py1, px0:px1] = _to_uint8(_resample(crop.float(), size, area_weights))
    else:
        out[py0:py1, px0:px1] = _linear_u8(crop, size)
    return out, plan


def blank_outside(canvas: torch.Tensor, lb: Letterbox, fov_mask: torch.Tensor) -> None:
    """preprocess.blank_outside on the device: the canvas zeroed outside the FOV, in place
    (`fov_mask` at the decoded image's size; the same nearest-neighbour resize)."""
    x0, y0, x1, y1 = lb.source_box
    px0, py0, px1, py1 = lb.placed
    if x1 <= x0 or y1 <= y0:
        return
    inside = fov_mask_at(fov_mask[y0:y1, x0:x1], (px1 - px0, py1 - py0))
    canvas[py0:py1, px0:px1] *= inside[..., None].to(canvas.dtype)


def _back_to_box(canvas_map: torch.Tensor, lb: Letterbox) -> torch.Tensor | None:
    px0, py0, px1, py1 = lb.placed
    x0, y0, x1, y1 = lb.box
    if x1 <= x0 or y1 <= y0:
        return None
    region = canvas_map[py0:py1, px0:px1].float()
    if tuple(region.shape) == (y1 - y0, x1 - x0):
        return region
    return F.interpolate(region[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                         align_corners=False)[0, 0]


def unletterbox(canvas_map: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """A canvas-sized map back onto the original image grid (zero outside the crop)."""
    w, h = lb.image_size
    out = torch.zeros((h, w), dtype=torch.float32, device=canvas_map.device)
    region = _back_to_box(canvas_map, lb)
    if region is not None:
        x0, y0, x1, y1 = lb.box
        out[y0:y1, x0:x1] = region
    return out


def fov_mask_at(fov_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 FOV mask at (width, height), nearest neighbour as cv2.INTER_NEAREST."""
    w, h = size
    if tuple(fov_mask.shape) == (h, w):
        return fov_mask
    device = str(fov_mask.device)
    rows = _on_device(nearest_index, fov_mask.shape[0], h, device)
    cols = _on_device(nearest_index, fov_mask.shape[1], w, device)
    return fov_mask.index_select(0, rows).index_select(1, cols)


def fov_on_device(fov: FieldOfView, decoded_size: tuple[int, int],
                  device) -> torch.Tensor:
    """The FOV mask at the decoded image's size, on `device`, as the CPU path has it: the
    thumbnail mask (`small`) scaled up there (the host's full mask is that same nearest
    resize, and the thumbnail crosses the bus in a fraction of the bytes), or a full mask
    without a thumbnail (read from a FOV file) uploaded."""
    if fov.small is None:
        return torch.from_numpy(fov.mask).to(device)
    return fov_mask_at(torch.from_numpy(fov.small).to(device), decoded_size)


def threshold_in_fov(canvas_prob: torch.Tensor, lb: Letterbox, fov_mask: torch.Tensor,
                     threshold: float, keep_prob: bool = False) -> Masked:
    """Canvas probabilities -> the original image's mask, on the device (see preprocess).
    fov_area and vessel_pixels are 0-d tensors (no host sync per image); the caller fetches
    them together with the masks."""
    w, h = lb.image_size
    fov = fov_mask_at(fov_mask, (w, h))
    region = _back_to_box(canvas_prob, lb)
    mask = torch.zeros((h, w), dtype=torch.uint8, device=canvas_prob.device)
    prob = torch.zeros((h, w), dtype=torch.float32, device=canvas_prob.device) \
        if keep_prob else None
    if region is not None:
        x0, y0, x1, y1 = lb.box
        mask[y0:y1, x0:x1] = region >= threshold
        if prob is not None:
            prob[y0:y1, x0:x1] = region
            prob *= fov
    mask &= fov
    return Masked(mask, fov, fov.count_nonzero(), mask.count_nonzero(), prob)
