"""Backends: one small runner per runtime behind one interface (see base.Backend).

Each module imports its runtime lazily, so `import retina_batch.backends` works with only the
base install; asking for a backend whose runtime is missing raises BackendUnavailable with
the command that installs it.
"""

from __future__ import annotations

from .base import Backend, BackendUnavailable, open_backend, resolve_model

__all__ = ["Backend", "BackendUnavailable", "open_backend", "resolve_model"]
