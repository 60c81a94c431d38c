"""ONNX Runtime backend: the default, on the CPU everywhere; CUDA / TensorRT execution
providers are used with `--device cuda` when onnxruntime-gpu provides them."""

from __future__ import annotations

import os

import numpy as np

from .base import BackendUnavailable, WorkerThreadBackend

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def session_options(ort, threads: int):
    """The SessionOptions segment runs with (benchmarks that time the model alone use them
    too, so their figures are the backend's)."""
    options = ort.SessionOptions()
    # One batch at a time uses every core; the other cores' worth of work (decode, write)
    # runs in the pipeline's threads while ONNX Runtime computes.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise busy-wait between batches and starve the
    # decode/write threads: measured +7% img/s and efficiency 0.88 -> 0.92 on 2 cores
    # (benchmarks/ort_spinning.py, results/2026-11-23-ort-spinning.json).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend(WorkerThreadBackend):
    name = "onnxruntime"

    def __init__(self, model, batch_size: int = 4, device: str = "auto", threads: int = 0):
        super().__init__(model, batch_size=batch_size, device=device)
        self.threads = threads or os.cpu_count() or 1

    def _providers(self, available: list[str]) -> list[str]:
        gpu = [p for p in GPU_PROVIDERS if p in available]
        if self.device == "cuda" and not gpu:
            raise BackendUnavailable(
                "--device cuda: this onnxruntime has no CUDA provider "
                "(pip uninstall onnxruntime && pip install onnxruntime-gpu), or use "
                "--backend tensorrt")
        if self.device == "cpu":
            gpu = []
        return gpu + ["CPUExecutionProvider"]

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") \
                from e
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), session_options(ort, self.threads),
                providers=self._providers(ort.get_available_providers()))
        except Exception as e:  # ORT raises its own exception types for bad model files
            raise BackendUnavailable(f"cannot load {self.model_path}: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()

    def accepts(self, size: int) -> bool:
        # N x H x W x 3: a graph exported with dynamic sizes names H and W instead of fixing them.
        height, width = self.session.get_inputs()[0].shape[1:3]
        dynamic = not isinstance(height, int) and not isinstance(width, int)
        return size == self.size or (dynamic and size % 32 == 0)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return out.astype(np.float32, copy=False)

    def _unload(self) -> None:
        del self.session

    def describe(self) -> dict:
        import onnxruntime as ort

        return {**super().describe(), "runtime": f"onnxruntime {ort.__version__}",
                "providers": getattr(self, "providers", None), "threads": self.threads}
