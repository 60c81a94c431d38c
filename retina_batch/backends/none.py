"""`--backend none`: no inference at all, a zero probability map for every image.

For measuring what the host costs per image (decode, FOV, letterbox, resize back, threshold,
PNG encode, write) with everything else exactly as in `segment`: behind a fast GPU that host
cost, not the model, decides the throughput (`bench --backend none`, host_ms_per_image). The
model's card still decides the canvas size and threshold (the shipped model's by default).

With `--pixel-work device` it stands for an infinitely fast device in the GPU-resident flow
(pixel_work.DevicePixels): the photographs are handed over decoded and what comes back is what
a device returns (an empty mask, the FOV mask at the original size, the quality columns), so
the figure is the host's share of that flow: decoding, FOV decisions, measurements, PNG
encoding, writing, bookkeeping. JPEGs it takes undecoded, as a GPU with nvJPEG does
(io.EncodedJpeg): the host then reads the file and its headers, and still makes the FOV
decisions from a thumbnail the device would send (here a stand-in of the same size, a bright
disc: the same calls on as many pixels), without decoding.
"""

from __future__ import annotations

from concurrent.futures import Future
from functools import lru_cache

import cv2
import numpy as np

from .base import Backend, DecodedResult


class NoInferenceBackend(Backend):
    name = "none"
    decodes_jpeg = True  # an instant device decodes them too

    def _open(self) -> None:
        pass

    def submit(self, batch: np.ndarray) -> Future:
        self.check_batch(batch)
        return _done(np.zeros(batch.shape[:3], np.float32))

    def segment_decoded(self, images: list, sizes: list | None = None, fovs: list | None = None,
                        threshold: float | None = None, keep_prob: bool = False,
                        canvas: int | None = None) -> Future:
        """TorchBackend.segment_decoded's results with no device work: per image an empty
        mask and the FOV mask at the original size (what a device sends back; made here
        from the host's FOV, as cheaply as a download), no quality statistics (a device
        makes them; None here, which flags nothing)."""
        from ..io import EncodedJpeg
        from ..preprocess import detect_fov, fov_from_thumbnail, fov_mask_at, plan_letterbox
        from ..qc import COLUMNS

        canvas = self.size if canvas is None else int(canvas)
        results = []
        for image, size, fov in zip(images, sizes or [None] * len(images),
                                    fovs or [None] * len(images), strict=True):
            if isinstance(image, EncodedJpeg):
                decoded = image.size
                fov = fov or fov_from_thumbnail(_thumbnail_stand_in(decoded), decoded,
                                                full_mask=False)
            else:
                decoded = (image.shape[1], image.shape[0])
                fov = fov or detect_fov(image)
            lb = plan_letterbox(fov.box, decoded, canvas, size)
            w, h = lb.image_size
            fov_mask = fov_mask_at(fov.small if fov.mask is None else fov.mask, (w, h))
            results.append(DecodedResult(
                np.zeros((h, w), np.uint8), np.zeros((h, w), np.float32) if keep_prob else None,
                fov, lb, int(np.count_nonzero(fov_mask)), 0, fov_mask,
                dict.fromkeys(COLUMNS[:3])))
        return _done(results)

    def _close(self) -> None:
        pass

    def describe(self) -> dict:
        return {**super().describe(), "runtime": "none (no inference: zero maps)"}


@lru_cache(maxsize=64)
def _thumbnail_stand_in(size: tuple[int, int]) -> np.ndarray:
    """What a device would send for the FOV decisions of a `size` photograph: its brightest
    channel at thumbnail size (preprocess.fov_thumbnail), here a bright disc on black."""
    from ..preprocess import FOV_THUMB

    w, h = size
    scale = min(1.0, FOV_THUMB / max(w, h))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    thumb = np.zeros((th, tw), np.uint8)
    cv2.circle(thumb, (tw // 2, th // 2), int(0.45 * min(tw, th)), 150, -1)
    thumb.flags.writeable = False  # shared between calls
    return thumb


def _done(result) -> Future:
    """A finished Future, as a backend's submit returns one, with no compute time."""
    future: Future = Future()
    future.compute_seconds = 0.0
    future.set_result(result)
    return future
