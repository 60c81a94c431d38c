"""The backend interface: uint8 N x H x W x 3 RGB batches in, N x H x W probabilities out.

Modelled on Polygraphy's runners: a backend is opened and closed as a context manager and has
the same verbs everywhere. `submit` returns a Future so the pipeline can keep several batches
in flight; `infer` is the synchronous form. Backends know nothing about files or letterboxing.
"""

from __future__ import annotations

import abc
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..card import load_card


@dataclass
class DecodedResult:
    """One photograph through segment_decoded: what the pipeline's writer needs."""

    mask: np.ndarray  # uint8 0/1 at the original size, zero outside the FOV
    prob: np.ndarray | None  # float32 at the original size (keep_prob), zero outside the FOV
    fov: object  # preprocess.FieldOfView (box, found; `small` at thumbnail size)
    letterbox: object  # preprocess.Letterbox
    fov_area: int
    vessel_pixels: int
    # uint8 0/1 FOV at the original size, as the host path's threshold_in_fov makes it: the
    # measurements and scores need it, and fetching it is cheaper than a full-size resize here
    fov_mask: np.ndarray | None = None
    quality: dict | None = None  # the qc_* columns, computed on the device (qc_gpu)


class BackendUnavailable(RuntimeError):
    """The runtime, device or model a backend needs is missing; the message says how to fix it."""


def default_model() -> Path:
    """The ONNX model shipped inside the package."""
    return Path(str(resources.files("retina_batch") / "default_model" / "model.onnx"))


class Backend(abc.ABC):
    """Base class: subclasses implement `_open`, `submit` and `_close`."""

    name: str = "?"
    # Why this model file (and so this precision) runs; set by open_backend's precision choice.
    precision_reason: str = ""
    # Whether segment_decoded decodes JPEGs on its device (io.EncodedJpeg in, nvJPEG there):
    # the GPU-resident flow then hands such files over undecoded (pixel_work.DevicePixels).
    decodes_jpeg: bool = False

    def __init__(self, model: str | Path, batch_size: int = 4, device: str = "auto"):
        from .precision import model_precision

        self.model_path = Path(model)
        self.card = load_card(self.model_path)
        self.precision = model_precision(self.card)
        self.size = int(self.card["working_size"])
        self.threshold = float(self.card["threshold"])
        self.batch_size = batch_size
        self.device = device
        self._opened = False

    # --- the three verbs -------------------------------------------------------------
    def open(self) -> Backend:
        if not self._opened:
            self._open()
            self._opened = True
        return self

    @abc.abstractmethod
    def submit(self, batch: np.ndarray) -> Future:
        """Start inference on a uint8 batch; the Future gives float32 N x H x W in [0, 1]."""

    def close(self) -> None:
        if self._opened:
            self._close()
            self._opened = False

    # --- conveniences ----------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch).result()

    @staticmethod
    def run_timed(executor: Executor, fn, *args) -> Future:
        """Run fn(*args) on `executor`; the returned Future carries `compute_seconds`.

        The pipeline reports per-image inference cost from it: the time the runtime spent on
        the batch, without the time the batch waited in the queue behind another one.
        """
        future: Future = Future()

        def work():
            start = time.perf_counter()
            try:
                result = fn(*args)
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)
                return
            future.compute_seconds = time.perf_counter() - start
            future.set_result(result)

        executor.submit(work)
        return future

    def describe(self) -> dict:
        """What ran, for summaries and benchmark records."""
        return {"backend": self.name, "model": str(self.model_path),
                "model_sha256": self.card.get("sha256"), "device": self.device,
                "precision": self.precision, "precision_reason": self.precision_reason}

    def accepts(self, size: int) -> bool:
        """Whether the model takes a size x size canvas: a fixed-size graph takes one size,
        subclasses with dynamic graphs say which others."""
        return size == self.size

    def check_batch(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 \
                or batch.shape[1] != batch.shape[2] or not self.accepts(batch.shape[1]):
            raise ValueError(f"{self.name}: expected uint8 N x S x S x 3 with S = {self.size}"
                             f" or another side the model accepts, got {batch.dtype} "
                             f"{batch.shape}")
        if len(batch) > self.batch_size:
            raise ValueError(f"{self.name}: batch of {len(batch)} > batch size {self.batch_size}")

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def __enter__(self) -> Backend:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerThreadBackend(Backend):
    """A runtime with one blocking call (ONNX Runtime, eager PyTorch), run on a worker thread
    so that `submit` returns at once and the pipeline decodes and writes meanwhile.

    Subclasses implement `_load` (on open), `_run(batch)` -> probabilities, and `_unload`.
    `worker_threads` > 1 runs that many batches at once (a GPU runtime with one stream per
    thread keeps uploads, compute and downloads of different batches overlapping).
    """

    worker_threads = 1

    def _open(self) -> None:
        self._load()
        self._worker = ThreadPoolExecutor(self.worker_threads, thread_name_prefix=self.name)

    def submit(self, batch: np.ndarray) -> Future:
        self.check_batch(batch)
        return self.run_timed(self._worker, self._run, np.ascontiguousarray(batch))

    def _close(self) -> None:
        self._worker.shutdown(wait=True)
        self._unload()

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _unload(self) -> None: ...


def resolve_model(model: str | Path | None, backend: str) -> Path:
    """The model file to use: the given path, or the shipped ONNX model."""
    if model is None:
        if backend in ("onnxruntime", "auto", "none"):
            return default_model()
        raise BackendUnavailable(f"--backend {backend} needs --model (a "
                                 f"{'.engine' if backend == 'tensorrt' else '.pt'} file)")
    path = Path(model)
    if not path.is_file():
        raise BackendUnavailable(f"model file not found: {path}")
    return path
