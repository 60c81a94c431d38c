"""Fake `tensorrt` and `cuda.bindings.runtime` modules: enough of their Python APIs (TensorRT
11.4, cuda-bindings) to run export's engine build and the TensorRT backend on a CPU, with
failures injected where the real ones fail. Host and "device" memory are real ctypes buffers,
copies are synchronous memmoves, and the fake engine computes the mean of the three channels
/ 255, so results can be checked.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import types

import numpy as np

SUCCESS = 0


class Status(enum.IntEnum):  # cudaError_t
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorLaunchFailure = 719


class FakeCudart(types.SimpleNamespace):
    """cuda.bindings.runtime: calls return (status, *values); `fail[name] = Status` makes the
    next calls of `name` fail. `log` holds (thread name, call name, args) of every call."""

    cudaEventDefault, cudaEventBlockingSync, cudaEventDisableTiming = 0, 1, 2

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, str, tuple]] = []
        self.fail: dict[str, Status] = {}
        self.memory: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []
        self.event_flags: dict[int, int] = {}
        self._next = 1000
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1,
                                                    cudaMemcpyDeviceToHost=2)

    def _call(self, name: str, *args, values=()):
        self.log.append((threading.current_thread().name, name, args))
        if name in self.fail:
            return (self.fail[name], *[0 for _ in values])
        return (Status.cudaSuccess, *values)

    def _handle(self) -> int:
        self._next += 1
        return self._next

    def calls(self, name: str) -> list[tuple[str, tuple]]:
        return [(thread, args) for thread, call, args in self.log if call == name]

    # --- devices ---
    def cudaGetDeviceCount(self):
        return self._call("cudaGetDeviceCount", values=(1,))

    def cudaGetDeviceProperties(self, device):
        props = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0", major=9, minor=0)
        return self._call("cudaGetDeviceProperties", device, values=(props,))

    def cudaSetDevice(self, device):
        return self._call("cudaSetDevice", device)

    # --- memory ---
    def _alloc(self, name, nbytes):
        buffer = ctypes.create_string_buffer(int(nbytes))
        pointer = ctypes.addressof(buffer)
        self.memory[pointer] = buffer
        return self._call(name, nbytes, values=(pointer,))

    def cudaMallocHost(self, nbytes):
        return self._alloc("cudaMallocHost", nbytes)

    def cudaMalloc(self, nbytes):
        return self._alloc("cudaMalloc", nbytes)

    def _free(self, name, pointer):
        self.freed.append(pointer)
        return self._call(name, pointer)

    def cudaFree(self, pointer):
        return self._free("cudaFree", pointer)

    def cudaFreeHost(self, pointer):
        return self._free("cudaFreeHost", pointer)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        result = self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)
        if result[0] == Status.cudaSuccess:
            ctypes.memmove(dst, src, nbytes)
        return result

    # --- streams and events ---
    def cudaStreamCreate(self):
        handle = self._handle()
        self.memory[handle] = None
        return self._call("cudaStreamCreate", values=(handle,))

    def cudaStreamDestroy(self, stream):
        return self._free("cudaStreamDestroy", stream)

    def cudaStreamSynchronize(self, stream):
        return self._call("cudaStreamSynchronize", stream)

    def cudaStreamWaitEvent(self, stream, event, flags):
        return self._call("cudaStreamWaitEvent", stream, event, flags)

    def cudaEventCreateWithFlags(self, flags):
        handle = self._handle()
        self.memory[handle] = None
        self.event_flags[handle] = flags
        return self._call("cudaEventCreateWithFlags", flags, values=(handle,))

    def cudaEventDestroy(self, event):
        return self._free("cudaEventDestroy", event)

    def cudaEventRecord(self, event, stream):
        return self._call("cudaEventRecord", event, stream)

    def cudaEventSynchronize(self, event):
        return self._call("cudaEventSynchronize", event)

    def cudaEventElapsedTime(self, start, end):
        return self._call("cudaEventElapsedTime", start, end, values=(1.5,))

    def leaked(self) -> set[int]:
        return set(self.memory) - set(self.freed)


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeTensorRT(types.ModuleType):
    """tensorrt: builder side (Builder, OnnxParser, IBuilderConfig, ITimingCache) and runtime
    side (Runtime, ICudaEngine, IExecutionContext), with knobs for the failures under test."""

    def __init__(self, cudart: FakeCudart | None = None):
        super().__init__("tensorrt")
        self.__version__ = "11.4.0.1"
        self.cudart = cudart
        # knobs
        self.parser_errors: list[tuple[str, str, str]] = []  # (operator, node, description)
        self.build_error: str | None = None  # the builder logs it and returns None
        self.refuse_caches: set[bytes] = set()  # set_timing_cache returns False for these
        self.serialize_fails = False
        self.context_is_none = False
        self.execute_fails = False
        # what happened
        self.profile_shapes: dict = {}
        self.attached_caches: list[bytes] = []
        self.contexts: list = []
        fake = self

        class ILogger:
            Severity = _Severity

            def __init__(self):
                pass

        class Logger(ILogger):
            WARNING = _Severity.WARNING

            def __init__(self, severity=_Severity.WARNING):
                super().__init__()

            def log(self, severity, msg):
                pass

        self.ILogger, self.Logger = ILogger, Logger
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        self.DataType = types.SimpleNamespace(UINT8="uint8", FLOAT="float")

        class Cache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                if fake.serialize_fails:
                    raise RuntimeError("serialize failed")
                return b"CACHE:" + self.blob

        class Config:
            def __init__(self):
                self.cache = None

            def set_memory_pool_limit(self, pool, size):
                pass

            def add_optimization_profile(self, profile):
                return 0

            def create_timing_cache(self, blob):
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.blob in fake.refuse_caches:
                    return False
                self.cache = cache
                fake.attached_caches.append(cache.blob)
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.profile_shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return types.SimpleNamespace(flags=flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if fake.build_error:
                    self.logger.log(_Severity.ERROR, fake.build_error)
                    return None
                return b"PLAN"

        class ParserError:
            def __init__(self, op, node, desc):
                self._op, self._node, self._desc = op, node, desc

            def node_operator(self):
                return self._op

            def node_name(self):
                return self._node

            def desc(self):
                return self._desc

        class OnnxParser:
            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                return not fake.parser_errors

            @property
            def num_errors(self):
                return len(fake.parser_errors)

            def get_error(self, i):
                return ParserError(*fake.parser_errors[i])

        self.Builder, self.OnnxParser = Builder, OnnxParser

        class Context:
            def __init__(self):
                self.shape, self.addresses = None, {}

            def set_input_shape(self, name, shape):
                self.shape = tuple(shape)
                return True

            def set_tensor_address(self, name, pointer):
                self.addresses[name] = pointer

            def execute_async_v3(self, stream):
                fake.cudart.log.append((threading.current_thread().name,
                                        "execute_async_v3", (stream,)))
                if fake.execute_fails:
                    return False
                n, h, w, c = self.shape
                images = np.ctypeslib.as_array(
                    (ctypes.c_uint8 * (n * h * w * c)).from_address(self.addresses["images"]))
                probs = np.ctypeslib.as_array(
                    (ctypes.c_float * (n * h * w)).from_address(
                        self.addresses["probabilities"]))
                probs[:] = images.reshape(n, h, w, c).mean(axis=3).ravel() / 255.0
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, i):
                return ("images", "probabilities")[i]

            def get_tensor_mode(self, name):
                return "input" if name == "images" else "output"

            def get_tensor_dtype(self, name):
                return "uint8" if name == "images" else "float"

            def create_execution_context(self):
                if fake.context_is_none:
                    return None
                context = Context()
                fake.contexts.append(context)
                return context

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return Engine()

        self.Runtime = Runtime


H100 = {"tensorrt": "11.4.0.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def install(monkeypatch, trt: FakeTensorRT | None = None, cudart: FakeCudart | None = None,
            platform: dict | None = None):
    """Make `import tensorrt` and `from cuda.bindings import runtime` give the fakes, and
    running_platform return `platform` (an H100 by default)."""
    import sys

    from retina_batch.backends import tensorrt as backend

    cudart = cudart or FakeCudart()
    trt = trt or FakeTensorRT(cudart)
    trt.cudart = cudart
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(backend, "running_platform", lambda device=0: dict(platform or H100))
    return trt, cudart
