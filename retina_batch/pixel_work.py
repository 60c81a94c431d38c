"""Where `segment`'s per-pixel work runs: on the host, or on the backend's device.

Two implementations of the same steps between decoding and the mask (letterbox onto the
canvas, inference, resize back to the original size, threshold, zero outside the FOV), behind
one small interface the pipeline calls (`place`, `submit`, `masked`):

- HostPixels: the canvas is made on the host (preprocess, OpenCV), any backend turns canvases
  into canvas probabilities (`Backend.submit`), the host maps them back and thresholds.
- DevicePixels: the decoded photograph goes to the backend's device once and everything up to
  the uint8 mask runs there (`TorchBackend.segment_decoded`, preprocess_gpu), and so do the
  quality flags' statistics (qc_gpu: per-pixel work on the canvas that is there already).
  Where the backend decodes JPEGs on its device (`decodes_jpeg`: nvJPEG on a CUDA GPU), a
  JPEG goes there undecoded (io.EncodedJpeg) and the device decodes the batch; other files
  are decoded on the host. The host keeps reading files, the FOV decisions (from a
  thumbnail: cheap and branchy), measurements, PNG encoding and writing. Behind a GPU this
  takes decoding, the letterbox and the resize-back off the host cores that feed it
  (benchmarks/README.md, host cost per image).

Everything before (decode, FOV, the letterbox *plan*, batching by canvas side) and after
(measurements, QC flags from the statistics, scores, writes, ledger) is the pipeline's, shared
by both: the two give the same masks (Dice >= 0.999, tests/test_pixel_work.py), rows (the
quality statistics within float rounding) and ledger records.

`--pixel-work auto` (the default) picks the device where that is a CUDA GPU, the host
otherwise; `device` forces it (also on a CPU torch backend: how CI checks that code path).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from .preprocess import Masked, blank_outside, letterbox, plan_letterbox, threshold_in_fov
from .qc import image_quality

SETTINGS = ("auto", "host", "device")


class HostPixels:
    """Canvases made on the host, probabilities thresholded on the host (any backend)."""

    name = "host"
    takes_jpeg = False  # whether `place_jpeg` may be given undecoded JPEGs

    def __init__(self, backend, threshold: float, keep_prob):
        self.backend, self.threshold, self.keep_prob = backend, threshold, keep_prob

    def place(self, item, rgb: np.ndarray, fov, canvas: int, size: tuple[int, int]) -> None:
        """item.canvas: what the backend is given (here the letterboxed canvas, blank outside
        the FOV)."""
        item.canvas, item.letterbox = letterbox(rgb, fov.box, canvas, size)
        blank_outside(item.canvas, item.letterbox, fov.mask)

    def quality(self, item, rgb: np.ndarray, fov) -> dict:
        """The qc_* columns known after `place` (here all of them: qc.image_quality, which
        reuses the canvas when it is its grid)."""
        return image_quality(rgb, fov.mask, (item.canvas, item.letterbox.source_box))

    def submit(self, items: list, canvas: int) -> Future:
        """A Future of one result per item, in order (here canvas probabilities)."""
        return self.backend.submit(np.stack([it.canvas for it in items]))

    def masked(self, item, canvas_prob: np.ndarray) -> Masked:
        return threshold_in_fov(canvas_prob, item.letterbox, item.fov.mask, self.threshold,
                                keep_prob=self.keep_prob(item))


class DevicePixels(HostPixels):
    """Decoded photographs to the device, masks back (TorchBackend.segment_decoded)."""

    name = "device"

    def __init__(self, backend, threshold: float, keep_prob):
        super().__init__(backend, threshold, keep_prob)
        self.takes_jpeg = bool(getattr(backend, "decodes_jpeg", False))

    def place_jpeg(self, item, jpeg) -> None:
        """An undecoded JPEG (io.EncodedJpeg): the device decodes it, finds its FOV and plans
        its letterbox; `masked` takes both from the result."""
        item.canvas, item.letterbox, item.fov = jpeg, None, None

    def place(self, item, rgb: np.ndarray, fov, canvas: int, size: tuple[int, int]) -> None:
        # The plan only (no pixels): batching needs the canvas side, and the device applies
        # this same plan (preprocess.plan_letterbox) to the photograph itself.
        item.canvas = rgb
        item.letterbox = plan_letterbox(fov.box, (rgb.shape[1], rgb.shape[0]), canvas, size)

    def quality(self, item, rgb: np.ndarray, fov) -> dict:
        return {}  # computed on the device with the mask: `masked` hands them over

    def submit(self, items: list, canvas: int) -> Future:
        # One probability map per image is fetched for the whole batch when any image needs
        # it (--prob, --truth): segment_decoded takes one keep_prob per batch.
        return self.backend.segment_decoded(
            [it.canvas for it in items],
            [it.letterbox and it.letterbox.image_size for it in items],
            [it.fov for it in items], threshold=self.threshold,
            keep_prob=any(self.keep_prob(it) for it in items), canvas=canvas)

    def masked(self, item, result) -> Masked:
        item.fov, item.letterbox = result.fov, result.letterbox  # decided there for JPEGs
        prob = result.prob if self.keep_prob(item) else None
        return Masked(result.mask, result.fov_mask, result.fov_area, result.vessel_pixels, prob,
                      result.quality)


def offers_device(backend) -> bool:
    """Whether the backend can take decoded photographs. Looked up on the class: a wrapper
    that forwards attribute look-ups (FlipTTA) does not do its work on that path."""
    return callable(getattr(type(backend), "segment_decoded", None))


def choose(backend, setting: str, threshold: float, keep_prob) -> HostPixels:
    """The pixel work for `setting` (auto, host, device) with this opened backend; raises
    BackendUnavailable (a usage error) for `device` with a backend that cannot."""
    from .backends import BackendUnavailable

    if setting not in SETTINGS:
        raise BackendUnavailable(f"--pixel-work {setting}: choose from {', '.join(SETTINGS)}")
    offered = offers_device(backend)
    if setting == "device" and not offered:
        reason = "--tta runs on canvases" if getattr(backend, "tta", False) else \
            f"--backend {backend.name} takes canvases made on the host"
        raise BackendUnavailable(f"--pixel-work device needs --backend torch without --tta "
                                 f"({reason}): use --pixel-work host or auto")
    on_gpu = getattr(backend, "torch_device", None) == "cuda"
    use_device = setting == "device" or (setting == "auto" and offered and on_gpu)
    return (DevicePixels if use_device else HostPixels)(backend, threshold, keep_prob)
