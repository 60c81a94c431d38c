"""Backends: one small runner per runtime behind one interface (see base.Backend), and the
registry that opens them by name.

The registry lives here, not in base.py, so the interface module knows no runtime: each
runtime's module is imported only when its backend is asked for, so `import
retina_batch.backends` works with only the base install, and asking for a backend whose
runtime is missing raises BackendUnavailable with the command that installs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import Backend, BackendUnavailable, resolve_model

# name -> (module, class). "none" runs no model: zero maps, for measuring the host's cost.
REGISTRY = {
    "onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": ("tensorrt", "TensorRTBackend"),
    "torch": ("torch", "TorchBackend"),
    "none": ("none", "NoInferenceBackend"),
}
BACKENDS = tuple(REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r} (choose from auto, "
                                 f"{', '.join(BACKENDS)})")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def open_backend(name: str, model: str | Path | None = None, batch_size: int = 4,
                 device: str = "auto", precision: str = "auto", **options) -> Backend:
    """Construct and open a backend by name ('auto' picks one, see auto.choose); `precision`
    picks the fp32 or int8 file of an ONNX model (see precision.choose)."""
    from .precision import choose as choose_precision

    if name == "auto":
        from .auto import choose

        name, model = choose(model, device)
    cls = backend_class(name)
    choice = choose_precision(resolve_model(model, name), precision, name, device)
    runner = cls(choice.path, batch_size=batch_size, device=device, **options)
    runner.precision_reason = choice.reason
    return runner.open()


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "backend_class", "open_backend",
           "resolve_model"]
