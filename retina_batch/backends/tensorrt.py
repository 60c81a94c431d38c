"""TensorRT backend: a serialized engine (`X.engine` + its sidecar card `X.engine.json`).

Memory and streams come from cuda-python (`cuda.bindings.runtime`). Each in-flight batch owns a
slot: pinned host buffers (so copies are truly asynchronous) and device buffers sized for the
engine's largest batch. Three streams (upload, compute, download) chained by events let the
upload of batch k+1, the compute of batch k and the download of batch k-1 overlap. One
execution context serves every slot: its enqueues are ordered on the compute stream.

Written against cuda-bindings' `cuda.bindings.runtime` (every call returns `(status, *values)`;
each status is checked) and the TensorRT 11.4 Python runtime (IExecutionContext.set_input_shape
/ set_tensor_address / execute_async_v3), following NVIDIA's samples/python/common_runtime.py.

tensorrt and cuda-python are imported only when used, so this module imports (and the helpers
below can be tested) on machines without them.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import numpy as np

from .base import Backend, BackendUnavailable

INSTALL_HINT = ("pip install 'retina-batch[tensorrt]' (TensorRT + cuda-python), on a machine with "
                "an NVIDIA GPU and a driver recent enough for that TensorRT's CUDA version")
# What an engine is tied to: TensorRT refuses (or silently mis-runs) plans from another version
# or another GPU model, so the sidecar records these and we compare before deserializing.
PLATFORM_KEYS = ("tensorrt", "gpu", "compute_capability")


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error status."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from e
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendUnavailable(f"cuda-python is not installed: {INSTALL_HINT}") from e
    return cudart


def cuda_check(result):
    """cuda-python returns `(status, *values)`: raise CudaError naming the status unless it is
    cudaSuccess (0 in every CUDA version), else return the value (or tuple of values)."""
    status, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(status) != 0:
        raise CudaError(f"CUDA error {getattr(status, 'name', status)}")
    return values[0] if len(values) == 1 else (values or None)


def running_platform(device: int = 0) -> dict:
    """TensorRT version, GPU name and compute capability of this machine (the sidecar keys)."""
    trt = import_tensorrt()
    cudart = import_cudart()
    try:
        count = cuda_check(cudart.cudaGetDeviceCount())
        props = cuda_check(cudart.cudaGetDeviceProperties(device)) if count else None
    except CudaError as e:  # no driver, driver too old, no device
        raise BackendUnavailable(f"no usable CUDA GPU ({e}): TensorRT needs an NVIDIA GPU and "
                                 "driver; use --backend onnxruntime") from e
    if props is None:
        raise BackendUnavailable("no CUDA GPU found: use --backend onnxruntime")
    name = props.name
    name = name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)
    return {"tensorrt": trt.__version__, "gpu": name.strip(),
            "compute_capability": f"{props.major}.{props.minor}"}


def platform_mismatches(sidecar: dict, running: dict) -> list[str]:
    """Human-readable differences between what an engine was built on and this machine."""
    built = sidecar.get("tensorrt", {})
    return [f"{key.replace('_', ' ')} {built.get(key)!s} (engine) != {running[key]} (here)"
            for key in PLATFORM_KEYS if str(built.get(key)) != str(running[key])]


def check_sidecar(sidecar: dict, running: dict, engine_path) -> None:
    """Refuse an engine built for another GPU or TensorRT, saying how to rebuild it here."""
    if "tensorrt" not in sidecar:
        raise BackendUnavailable(f"{engine_path}: its card has no 'tensorrt' section (not an "
                                 "engine sidecar); rebuild it with `retina-batch export`")
    problems = platform_mismatches(sidecar, running)
    if problems:
        rebuild = sidecar["tensorrt"].get("rebuild", "retina-batch export CHECKPOINT.pt --out DIR")
        raise BackendUnavailable(f"{engine_path} was built for another GPU/TensorRT "
                                 f"({'; '.join(problems)}): rebuild it here with `{rebuild}`")


# Events the host waits on block the waiting thread instead of spinning (cudaEventBlockingSync):
# a spinning cudaEventSynchronize burns a whole core for the GPU time of every batch, the core
# the decoders need. Events used only for ordering or waiting need no timestamps
# (cudaEventDisableTiming, the cheapest kind for cudaStreamWaitEvent); only the pair that
# measures compute time keeps timing. (CUDA runtime API, cudaEventCreateWithFlags.)
def event_flags(cudart) -> dict[str, int]:
    quiet = int(cudart.cudaEventDisableTiming)
    return {"uploaded": quiet, "started": int(cudart.cudaEventDefault),
            "computed": int(cudart.cudaEventDefault),
            "done": int(cudart.cudaEventBlockingSync) | quiet}


@dataclass
class _Slot:
    """Buffers and events of one in-flight batch."""

    host_in: int
    host_out: int
    dev_in: int
    dev_out: int
    images: np.ndarray  # uint8 view of host_in
    probs: np.ndarray  # float32 view of host_out
    uploaded: object
    started: object
    computed: object
    done: object
    pending: Future | None = None


def _pinned_view(pointer: int, shape: tuple, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_uint8 * nbytes).from_address(pointer)
    return np.frombuffer(raw, np.uint8).view(dtype).reshape(shape)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, model, batch_size: int = 4, device: str = "auto", slots: int = 3,
                 gpu: int = 0):
        super().__init__(model, batch_size=batch_size, device=device)
        if device == "cpu":
            raise BackendUnavailable("--backend tensorrt runs on a GPU; for --device cpu use "
                                     "--backend onnxruntime")
        self.slot_count, self.gpu = max(2, slots), gpu
        self._owned: list[tuple[str, object]] = []  # (cuda free function, handle), for close
        self._streams: list = []
        self._bound = threading.local()  # which threads have called cudaSetDevice
        self._broken: BaseException | None = None
        section = self.card.get("tensorrt", {})
        profile = section.get("profile", {})
        self.min_batch = int(profile.get("min", 1))
        self.max_batch = int(profile.get("max", batch_size))
        self.canvas = section.get("canvas")  # {min, opt, max}; absent in older sidecars

    # --- open: check, deserialize, allocate ---------------------------------------------
    def _open(self) -> None:
        trt = import_tensorrt()
        self.cudart = import_cudart()
        self.platform = running_platform(self.gpu)
        check_sidecar(self.card, self.platform, self.model_path)
        self._check_profile()
        self._bind_device()
        try:
            self._load(trt)
            self._allocate()
        except BaseException:
            self._close()
            raise
        self._lock = threading.Lock()
        self._next = 0
        # Waits for downloads off the caller's thread, so submit() never blocks on the GPU
        # unless every slot is busy.
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="trt-collect")

    def _check_profile(self) -> None:
        if self.batch_size > self.max_batch:
            raise BackendUnavailable(
                f"--batch-size {self.batch_size} is larger than this engine's profile allows "
                f"({self.max_batch}): use a smaller batch or rebuild with --batch "
                f"{self.min_batch},{self.batch_size},{self.batch_size}")
        if self.canvas and not self.canvas["min"] <= self.size <= self.canvas["max"]:
            raise BackendUnavailable(
                f"{self.model_path} accepts canvases {self.canvas['min']}..{self.canvas['max']}"
                f", not the working size {self.size}: rebuild with `{self._rebuild()}`")

    def _bind_device(self) -> None:
        """cudaSetDevice on this thread, once: the runtime's current device is per host thread,
        and submit (the caller's thread), the collector and close each make CUDA calls."""
        if getattr(self._bound, "device", None) != self.gpu:
            cuda_check(self.cudart.cudaSetDevice(self.gpu))
            self._bound.device = self.gpu

    def _load(self, trt) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(f"TensorRT could not load {self.model_path} (see its log "
                                     f"above); rebuild with `{self._rebuild()}`")
        self._context = self._engine.create_execution_context()
        if self._context is None:  # documented: None when the device memory cannot be had
            raise BackendUnavailable(f"TensorRT could not create an execution context for "
                                     f"{self.model_path} (not enough free GPU memory?); free "
                                     "the GPU or use a smaller --batch-size")
        self.input, self.output = self._io_names(trt)

    def _rebuild(self) -> str:
        return self.card.get("tensorrt", {}).get("rebuild", "retina-batch export ...")

    def _io_names(self, trt) -> tuple[str, str]:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names
                  if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"{self.model_path}: expected one input and one output, "
                                     f"got {inputs} -> {outputs}")
        expected = {inputs[0]: trt.DataType.UINT8, outputs[0]: trt.DataType.FLOAT}
        for name, dtype in expected.items():
            if self._engine.get_tensor_dtype(name) != dtype:
                raise BackendUnavailable(f"{self.model_path}: tensor {name} is "
                                         f"{self._engine.get_tensor_dtype(name)}, expected "
                                         f"{dtype}; rebuild with `{self._rebuild()}`")
        return inputs[0], outputs[0]

    def _own(self, free: str, result):
        handle = cuda_check(result)
        self._owned.append((free, handle))
        return handle

    def _allocate(self) -> None:
        c, n, s = self.cudart, self.max_batch, self.size
        in_shape, out_shape = (n, s, s, 3), (n, s, s)
        in_bytes, out_bytes = n * s * s * 3, n * s * s * 4
        self._streams = [self._own("cudaStreamDestroy", c.cudaStreamCreate()) for _ in range(3)]
        self._slots = []
        for _ in range(self.slot_count):
            host_in = self._own("cudaFreeHost", c.cudaMallocHost(in_bytes))
            host_out = self._own("cudaFreeHost", c.cudaMallocHost(out_bytes))
            events = {name: self._own("cudaEventDestroy", c.cudaEventCreateWithFlags(flags))
                      for name, flags in event_flags(c).items()}
            self._slots.append(_Slot(
                host_in, host_out, self._own("cudaFree", c.cudaMalloc(in_bytes)),
                self._own("cudaFree", c.cudaMalloc(out_bytes)),
                _pinned_view(host_in, in_shape, np.uint8),
                _pinned_view(host_out, out_shape, np.float32), **events))

    # --- submit: enqueue on the GPU now, resolve the future when the download is done ---
    def submit(self, batch: np.ndarray) -> Future:
        self.check_batch(batch)
        n = len(batch)
        rows = max(n, self.min_batch)  # a short last batch is padded up to the profile minimum
        future: Future = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(RuntimeError(f"the TensorRT backend stopped after a CUDA "
                                                  f"failure: {self._broken}"))
                return future
            self._bind_device()
            slot = self._slots[self._next]
            self._next = (self._next + 1) % len(self._slots)
            if slot.pending is not None:  # the slot's previous batch must be fully downloaded
                wait_for([slot.pending])
            slot.images[:n] = batch
            slot.images[n:rows] = 0
            slot.pending = future
            try:
                self._enqueue(slot, rows)
            except Exception as e:
                self._quiesce()
                future.set_exception(e)
                return future
        self._collector.submit(self._collect, slot, n, future)
        return future

    def _quiesce(self) -> None:
        """After a failed enqueue, wait until the GPU can no longer touch the slot: its upload
        may already be reading the pinned input, which the next batch given this slot would
        overwrite. If even that fails the context is unusable: refuse further batches."""
        try:
            for stream in self._streams:
                cuda_check(self.cudart.cudaStreamSynchronize(stream))
        except CudaError as e:
            self._broken = e

    def _enqueue(self, slot: _Slot, rows: int) -> None:
        c, (upload, compute, download) = self.cudart, self._streams
        s = self.size
        kind = c.cudaMemcpyKind
        # Host-side settings first: a rejected shape then fails before any copy is enqueued.
        if not self._context.set_input_shape(self.input, (rows, s, s, 3)):
            raise RuntimeError(f"TensorRT rejected input shape {(rows, s, s, 3)}")
        self._context.set_tensor_address(self.input, slot.dev_in)
        self._context.set_tensor_address(self.output, slot.dev_out)
        cuda_check(c.cudaMemcpyAsync(slot.dev_in, slot.host_in, rows * s * s * 3,
                                     kind.cudaMemcpyHostToDevice, upload))
        cuda_check(c.cudaEventRecord(slot.uploaded, upload))
        cuda_check(c.cudaStreamWaitEvent(compute, slot.uploaded, 0))
        cuda_check(c.cudaEventRecord(slot.started, compute))
        if not self._context.execute_async_v3(int(compute)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        cuda_check(c.cudaEventRecord(slot.computed, compute))
        cuda_check(c.cudaStreamWaitEvent(download, slot.computed, 0))
        cuda_check(c.cudaMemcpyAsync(slot.host_out, slot.dev_out, rows * s * s * 4,
                                     kind.cudaMemcpyDeviceToHost, download))
        cuda_check(c.cudaEventRecord(slot.done, download))

    def _collect(self, slot: _Slot, n: int, future: Future) -> None:
        try:
            self._bind_device()
            cuda_check(self.cudart.cudaEventSynchronize(slot.done))  # blocking, not spinning
            probs = slot.probs[:n].copy()  # the pinned buffer is reused by a later batch
            ms = cuda_check(self.cudart.cudaEventElapsedTime(slot.started, slot.computed))
            future.compute_seconds = float(ms) / 1000.0  # GPU time, not queueing time
            future.set_result(probs)
        except BaseException as e:
            future.set_exception(e)

    # --- close: finish what is in flight, release everything ----------------------------
    def _close(self) -> None:
        if getattr(self, "_collector", None) is not None:
            self._collector.shutdown(wait=True)
            self._collector = None
        errors = []
        try:
            self._bind_device()
        except CudaError as e:
            errors.append(e)
        for stream in getattr(self, "_streams", []):
            try:
                cuda_check(self.cudart.cudaStreamSynchronize(stream))
            except CudaError as e:
                errors.append(e)
        # TensorRT objects go before the memory they may reference, context before engine.
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
        while self._owned:
            free, handle = self._owned.pop()
            try:
                cuda_check(getattr(self.cudart, free)(handle))
            except CudaError as e:
                errors.append(e)
        self._streams, self._slots = [], []
        if errors:
            raise errors[0]

    def describe(self) -> dict:
        info = self.card.get("tensorrt", {})
        return {**super().describe(), "runtime": f"tensorrt {info.get('tensorrt')}",
                "gpu": getattr(self, "platform", {}).get("gpu", info.get("gpu")),
                "profile": info.get("profile"), "canvas": info.get("canvas"),
                "slots": self.slot_count, "streams": 3}
