"""`--backend none`: no inference at all, a zero probability map for every image.

For measuring what the host costs per image (decode, FOV, letterbox, resize back, threshold,
PNG encode, write) with everything else exactly as in `segment`: behind a fast GPU that host
cost, not the model, decides the throughput (`bench --backend none`, host_ms_per_image). The
model's card still decides the canvas size and threshold (the shipped model's by default).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from .base import Backend


class NoInferenceBackend(Backend):
    name = "none"

    def _open(self) -> None:
        pass

    def submit(self, batch: np.ndarray) -> Future:
        self.check_batch(batch)
        future: Future = Future()
        future.compute_seconds = 0.0
        future.set_result(np.zeros(batch.shape[:3], np.float32))
        return future

    def _close(self) -> None:
        pass

    def describe(self) -> dict:
        return {**super().describe(), "runtime": "none (no inference: zero maps)"}
