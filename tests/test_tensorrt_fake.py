"""The TensorRT backend's host-side logic on a CPU, with fake `tensorrt` and `cuda` modules.

The fakes follow the TensorRT 11 Python API (Runtime, ICudaEngine, IExecutionContext with
set_input_shape / set_tensor_address / execute_async_v3) and cuda-python's
`cuda.bindings.runtime` ((status, value) tuples). Host buffers are real memory (the backend
views pinned memory through ctypes); "device" memory is real memory too, and the fake engine
computes red / 255 of each image, so every result can be checked. The fake GPU does its work
when it is enqueued, but completion (cudaEventSynchronize) waits for a gate the test opens:
that is how a slot reused before its batch was collected shows up as a wrong result.

Only the backend's public interface is used: open (via open_backend), submit, infer, close,
describe.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import types

import numpy as np
import pytest

from retina_batch.backends import BackendUnavailable, open_backend
from retina_batch.card import sha256, write_json_atomic

SIZE = 8
GPU = {"tensorrt": "11.0.0.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


class FakeCuda:
    """cuda.bindings.runtime, enough of it for the backend; records what happens."""

    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0,
                                                "cudaErrorMemoryAllocation": 2})
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1,
                                                      "cudaMemcpyDeviceToHost": 2})

    def __init__(self, log: list, fail_malloc_at: int | None = None):
        self.log, self.fail_malloc_at = log, fail_malloc_at
        self.memory: dict[int, ctypes.Array] = {}  # live allocations by address
        self.handles: set[int] = set()  # live streams and events
        self.freed: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.mallocs = 0
        self._next = 1

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _alloc(self, nbytes: int):
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        buf = (ctypes.c_uint8 * nbytes)()
        self.memory[ctypes.addressof(buf)] = buf
        return self._ok(ctypes.addressof(buf))

    def _free(self, kind: str, address: int):
        assert address in self.memory, f"{kind} of unknown or freed memory {address}"
        del self.memory[address]
        self.freed.append((kind, address))
        self.log.append(kind)
        return self._ok()

    def _handle(self):
        self._next += 1
        self.handles.add(self._next)
        return self._ok(self._next)

    def _destroy(self, kind: str, handle: int):
        assert handle in self.handles, f"{kind} of unknown or destroyed handle {handle}"
        self.handles.remove(handle)
        self.log.append(kind)
        return self._ok()

    # devices
    def cudaGetDeviceCount(self):
        return self._ok(1)

    def cudaGetDeviceProperties(self, device):
        return self._ok(types.SimpleNamespace(name=GPU["gpu"].encode() + b"\0\0", major=9,
                                              minor=0))

    def cudaSetDevice(self, device):
        return self._ok()

    # memory
    def cudaMallocHost(self, nbytes):
        return self._alloc(nbytes)

    def cudaMalloc(self, nbytes):
        return self._alloc(nbytes)

    def cudaFreeHost(self, address):
        return self._free("cudaFreeHost", address)

    def cudaFree(self, address):
        return self._free("cudaFree", address)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert int(dst) in self.memory and int(src) in self.memory and stream in self.handles
        assert nbytes <= len(self.memory[int(dst)]) and nbytes <= len(self.memory[int(src)])
        ctypes.memmove(int(dst), int(src), nbytes)
        return self._ok()

    # streams and events
    def cudaStreamCreate(self):
        return self._handle()

    def cudaStreamDestroy(self, stream):
        return self._destroy("cudaStreamDestroy", stream)

    def cudaStreamSynchronize(self, stream):
        self.log.append("cudaStreamSynchronize")
        return self._ok()

    def cudaStreamWaitEvent(self, stream, event, flags):
        return self._ok()

    # Event flags as in the CUDA runtime (cudaEventDefault, BlockingSync, DisableTiming); the
    # fake records which flags each event was made with.
    cudaEventDefault, cudaEventBlockingSync, cudaEventDisableTiming = 0, 1, 2

    def cudaEventCreateWithFlags(self, flags):
        self.event_flags = [*getattr(self, "event_flags", []), int(flags)]
        return self.cudaEventCreate()

    def cudaEventCreate(self):
        return self._handle()

    def cudaEventDestroy(self, event):
        return self._destroy("cudaEventDestroy", event)

    def cudaEventRecord(self, event, stream):
        return self._ok()

    def cudaEventSynchronize(self, event):
        assert self.gate.wait(5), "the test never opened the gate"
        return self._ok()

    def cudaEventElapsedTime(self, start, end):
        return self._ok(1.5)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape):
        low, high = self.engine.profile
        if name != "images" or not low <= shape[0] <= high or tuple(shape[1:]) != (
                SIZE, SIZE, 3):
            return False  # what TensorRT does with a shape outside the profile
        self.shape = tuple(shape)
        self.engine.shapes.append(self.shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)

    def execute_async_v3(self, stream):
        n = self.shape[0]
        images = np.ctypeslib.as_array(
            (ctypes.c_uint8 * (n * SIZE * SIZE * 3)).from_address(self.addresses["images"]))
        out = np.ctypeslib.as_array((ctypes.c_float * (n * SIZE * SIZE)).from_address(
            self.addresses["probabilities"]))
        out[:] = (images.reshape(n, SIZE, SIZE, 3)[..., 0] / np.float32(255)).ravel()
        return True

    def __del__(self):
        self.engine.log.append("del context")


class FakeEngine:
    def __init__(self, trt, log, profile):
        self.trt, self.log, self.profile, self.shapes = trt, log, profile, []
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return ("images", "probabilities")[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.UINT8 if name == "images" else self.trt.DataType.FLOAT

    def create_execution_context(self):
        return FakeContext(self)

    def __del__(self):
        self.log.append("del engine")


def fake_tensorrt(log: list, profile: tuple[int, int], plan_ok: bool = True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = GPU["tensorrt"]
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "UINT8 FLOAT HALF")
    trt.engines = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            if not plan_ok:
                return None
            engine = FakeEngine(trt, log, profile)
            trt.engines.append(engine.shapes)
            return engine

        def __del__(self):
            log.append("del runtime")

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def gpu(monkeypatch):
    """Install fake tensorrt + cuda-python; returns a function that sets them up."""
    def install(profile=(1, 4), fail_malloc_at=None, plan_ok=True):
        log: list[str] = []
        cuda = FakeCuda(log, fail_malloc_at)
        trt = fake_tensorrt(log, profile, plan_ok)
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cuda
        package = types.ModuleType("cuda")
        package.bindings = bindings
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "cuda", package)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
        return types.SimpleNamespace(cuda=cuda, trt=trt, log=log)
    return install


def engine_file(folder, profile=(1, 4), platform=None):
    """A fake plan with a sidecar card built 'on' `platform` (this fake H100 by default)."""
    path = folder / "m.sm90.engine"
    path.write_bytes(b"fake plan")
    low, high = profile
    write_json_atomic(folder / "m.sm90.engine.json", {
        "card_version": 1, "name": "fake", "working_size": SIZE, "threshold": 0.5,
        "weights": path.name, "sha256": sha256(path),
        "tensorrt": {**(platform or GPU), "profile": {"min": low, "opt": high, "max": high},
                     "rebuild": "retina-batch export runs/x/model.pt --out dist"}})
    return path


def batches(count: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def expected(batch: np.ndarray) -> np.ndarray:
    return batch[..., 0] / np.float32(255)


# --- opening: the checks that refuse an engine -------------------------------------------

def test_engine_built_for_another_gpu_is_refused_with_the_rebuild_command(gpu, tmp_path):
    fake = gpu()
    path = engine_file(tmp_path, platform={**GPU, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(BackendUnavailable, match="retina-batch export runs/x/model.pt"):
        open_backend("tensorrt", path, batch_size=2)
    assert not fake.cuda.memory  # refused before allocating anything


def test_batch_size_beyond_the_profile_is_refused(gpu, tmp_path):
    fake = gpu(profile=(1, 4))
    with pytest.raises(BackendUnavailable, match=r"--batch-size 8 .*\(4\)"):
        open_backend("tensorrt", engine_file(tmp_path, profile=(1, 4)), batch_size=8)
    assert not fake.cuda.memory


def test_a_plan_tensorrt_cannot_load_is_refused(gpu, tmp_path):
    gpu(plan_ok=False)
    with pytest.raises(BackendUnavailable, match="could not load"):
        open_backend("tensorrt", engine_file(tmp_path), batch_size=2)


def test_failed_allocation_frees_what_was_allocated(gpu, tmp_path):
    fake = gpu(fail_malloc_at=5)  # part-way through the slots' buffers
    with pytest.raises((BackendUnavailable, RuntimeError)):
        open_backend("tensorrt", engine_file(tmp_path), batch_size=4)
    assert fake.cuda.mallocs == 5
    assert not fake.cuda.memory and not fake.cuda.handles  # nothing leaked


# --- running ----------------------------------------------------------------------------

def test_results_match_each_batch_through_rotating_slots(gpu, tmp_path):
    """More batches in flight than slots: each slot is reused, and every future still gets
    its own batch's probabilities (the fake writes a reused slot's output at once, so a slot
    taken before its previous batch was collected would hand that batch the wrong result)."""
    fake = gpu()
    inputs = batches(8, 4)
    with open_backend("tensorrt", engine_file(tmp_path), batch_size=4) as runner:
        fake.cuda.gate.clear()
        futures = []
        submitter = threading.Thread(target=lambda: futures.extend(
            runner.submit(b) for b in inputs))
        submitter.start()
        try:
            submitter.join(0.5)
            assert submitter.is_alive()  # every slot busy: submit waits for the GPU
        finally:
            fake.cuda.gate.set()  # a failure must not leave the collector waiting
        submitter.join(10)
        results = [f.result(10) for f in futures]
        assert all(f.compute_seconds == pytest.approx(1.5e-3) for f in futures)
    for batch, result in zip(inputs, results, strict=True):
        assert result.shape == (4, SIZE, SIZE) and result.dtype == np.float32
        np.testing.assert_allclose(result, expected(batch), atol=1e-6)


def test_submit_returns_at_once_while_a_slot_is_free(gpu, tmp_path):
    fake = gpu()
    with open_backend("tensorrt", engine_file(tmp_path), batch_size=2) as runner:
        slots = runner.describe()["slots"]
        fake.cuda.gate.clear()  # nothing completes
        try:
            futures = [runner.submit(b) for b in batches(slots, 2)]  # hangs if it waited
            assert not any(f.done() for f in futures)
        finally:
            fake.cuda.gate.set()
        assert all(f.result(10).shape == (2, SIZE, SIZE) for f in futures)


def test_short_batch_is_padded_to_the_profile_minimum(gpu, tmp_path):
    """An engine whose profile starts at 4 still serves a last batch of 1 or 3: the shape
    given to TensorRT is inside the profile, and only the real images come back."""
    fake = gpu(profile=(4, 8))
    with open_backend("tensorrt", engine_file(tmp_path, profile=(4, 8)),
                      batch_size=8) as runner:
        for n in (1, 3, 8):
            (batch,) = batches(1, n, seed=n)
            result = runner.infer(batch)
            assert result.shape == (n, SIZE, SIZE)
            np.testing.assert_allclose(result, expected(batch), atol=1e-6)
    assert [shape[0] for shape in fake.trt.engines[0]] == [4, 4, 8]


def test_wrong_batch_is_refused_before_the_gpu(gpu, tmp_path):
    gpu()
    with open_backend("tensorrt", engine_file(tmp_path), batch_size=2) as runner:
        with pytest.raises(ValueError, match="batch of 3 > batch size 2"):
            runner.submit(batches(1, 3)[0])
        with pytest.raises(ValueError, match="expected uint8"):
            runner.submit(np.zeros((1, SIZE, SIZE, 3), np.float32))


# --- closing ------------------------------------------------------------------------------

def test_close_finishes_in_flight_work_then_frees_everything_once_in_order(gpu, tmp_path):
    fake = gpu()
    runner = open_backend("tensorrt", engine_file(tmp_path), batch_size=2)
    allocated = len(fake.cuda.memory) + len(fake.cuda.handles)
    inputs = batches(2, 2)
    futures = [runner.submit(b) for b in inputs]
    runner.close()
    for batch, future in zip(inputs, futures, strict=True):  # finished, not cancelled
        np.testing.assert_allclose(future.result(0), expected(batch), atol=1e-6)
    assert not fake.cuda.memory and not fake.cuda.handles
    log = fake.log
    releases = [i for i, e in enumerate(log) if e.startswith(("cudaFree", "cudaStreamDestroy",
                                                               "cudaEventDestroy"))]
    assert len(releases) == allocated  # each once (the fake refuses a second free)
    # The GPU is idle before anything is released; TensorRT objects go before the memory they
    # may reference, the context before its engine, the engine before the runtime.
    assert log.index("cudaStreamSynchronize") < log.index("del context") \
        < log.index("del engine") < log.index("del runtime") < min(releases)
    runner.close()  # a second close is harmless
    assert len(fake.log) == len(log)
