"""qc.py's quality flags in PyTorch, on the device where the GPU-resident flow already has the
photograph and its canvas (pixel_work.DevicePixels).

Same name and definition as qc.image_quality (read the statistics there): the FOV-normalised
512 px grid, the FOV shrunk by INNER_MARGIN, the green channel's Gaussian bands at full and
half resolution. OpenCV's operations are reproduced, not approximated: its Gaussian kernels for
float images (size 8 sigma + 1, made odd; reflect-101 borders), pyrDown's 5-tap kernel, its
RGB -> grey fixed-point weights, erosion whose border never erodes, and masked means and
standard deviations in float64. What remains are float rounding differences (the tested bound:
within 0.1 % of the host's values on real photographs, tests/test_qc.py).

The statistics stay on the device as one small tensor per image (no host sync per image); the
caller fetches them with the masks and turns them into the row's columns with
qc.quality_columns, the host path's rounding and "too little FOV" rule.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .measure import GRID
from .preprocess_gpu import letterbox
from .qc import INNER_MARGIN, grid_canvas

# cv2.COLOR_RGB2GRAY on uint8: 0.299 R + 0.587 G + 0.114 B in 15-bit fixed point, rounded
# (OpenCV's vectorised path; checked against it on every pixel of a random image in the tests)
_GREY_WEIGHTS, _GREY_SHIFT = (9798, 19235, 3735), 15


def gaussian_kernel(sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel as cv2.GaussianBlur(ksize=(0, 0)) picks it for a float image:
    size cvRound(8 sigma + 1) made odd, weights exp(-x^2 / 2 sigma^2) normalised in double."""
    n = int(np.rint(sigma * 4 * 2 + 1)) | 1
    x = np.arange(n, dtype=np.float64) - (n - 1) * 0.5
    weights = np.exp(-0.5 / (sigma * sigma) * x * x)
    return (weights / weights.sum()).astype(np.float32)


_PYR_DOWN = np.array([1, 4, 6, 4, 1], np.float32) / 16


@lru_cache(maxsize=32)
def _kernel(sigma: float | None, device: str) -> torch.Tensor:
    """A Gaussian's taps (None: pyrDown's), made and uploaded once per device: a small
    upload from pageable memory every image would stall the host thread on a GPU."""
    taps = _PYR_DOWN if sigma is None else gaussian_kernel(sigma)
    return torch.from_numpy(taps).to(device)


def _separable(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """H x W float image filtered by `kernel` along rows and columns, reflect-101 borders
    (OpenCV's default; torch's "reflect" is the same rule)."""
    r = kernel.numel() // 2
    x = F.pad(image[None, None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[0, 0]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(image, (0, 0), sigma) of an H x W float32 image."""
    return _separable(image, _kernel(float(sigma), str(image.device)))


def pyr_down(image: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown of an H x W float32 image: the 5-tap binomial, then every other pixel."""
    return _separable(image, _kernel(None, str(image.device)))[::2, ::2]


def erode(inside: torch.Tensor, side: int) -> torch.Tensor:
    """cv2.erode of a 0/255 uint8 mask with a side x side square; like OpenCV's default
    border, pixels beyond the edge never erode (max-pooling the complement pads with -inf)."""
    outside = 255.0 - inside.float()
    grown = F.max_pool2d(outside[None, None], side, stride=1, padding=side // 2)[0, 0]
    return (255.0 - grown).to(torch.uint8)


def _grey(canvas: torch.Tensor) -> torch.Tensor:
    rgb = canvas.to(torch.int32)
    r, g, b = (rgb[..., c] * w for c, w in enumerate(_GREY_WEIGHTS))
    return (r + g + b + (1 << (_GREY_SHIFT - 1))) >> _GREY_SHIFT


def _mean(values: torch.Tensor, inside: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (values.double() * inside).sum() / count


def _spread(a: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Standard deviation of a - b where `inside` (0/1 float64) is set, as cv2.meanStdDev:
    sums in double, sqrt(E[d^2] - E[d]^2)."""
    d = (a - b).double()
    n = inside.sum().clamp(min=1)
    mean = (d * inside).sum() / n
    return ((d * d * inside).sum() / n - mean * mean).clamp(min=0).sqrt()


def image_quality(rgb: torch.Tensor, fov: torch.Tensor, box: tuple[int, int, int, int],
                  made=None) -> torch.Tensor | None:
    """[qc_brightness, qc_contrast, qc_sharpness, pixels inside] (float64, on rgb's device)
    of an H x W x 3 uint8 photograph whose FOV is `fov` (H x W, nonzero inside) with
    bounding box `box`; None for an empty box. `made`: (canvas, source_box) as in
    qc.image_quality, reused when it is the 512 px grid of this crop."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = grid_canvas(made, box)
    if canvas is None:
        canvas = letterbox(rgb, box, GRID)[0]
    fov255 = (fov > 0).to(torch.uint8)[..., None] * 255
    inside = (letterbox(fov255, box, GRID)[0][..., 0] > 127).to(torch.uint8) * 255
    inside = erode(inside, 2 * INNER_MARGIN + 1)
    mask = (inside > 0).double()
    count = mask.sum()
    safe = count.clamp(min=1)
    green8 = canvas[..., 1]
    green_mean = _mean(green8, mask, safe)
    green = green8.float()
    half, half_mask = pyr_down(green), mask[::2, ::2]
    g4, g8 = (gaussian_blur(half, math.sqrt(s * s - 1) / 2) for s in (4.0, 8.0))
    brightness = _mean(_grey(canvas), mask, safe)
    contrast = _spread(half, g8, half_mask) / green_mean.clamp(min=1.0)
    finest = _spread(gaussian_blur(green, 0.5), gaussian_blur(green, 1.0), mask)
    sharpness = finest / _spread(half, g4, half_mask).clamp(min=1e-3)
    return torch.stack([brightness, contrast, sharpness, count])

