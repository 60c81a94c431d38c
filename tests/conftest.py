"""Shared fixtures: the tiny ONNX model (built once per session) and the real-data folder.

pytest's default import mode puts this folder on sys.path (no __init__.py here), so test modules
and this file can `from tiny import ...`; the insert below keeps that true under
`--import-mode=importlib` too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# The project's data lives beside the checkout (../shared/data), never inside it.
SHARED_DATA = TESTS.parents[1] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A width-4 Attention U-Net on a 64-pixel canvas, exported to ONNX, with its card."""
    pytest.importorskip("torch", reason="building the tiny test model needs PyTorch")
    from tiny import write_tiny_onnx

    return write_tiny_onnx(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data relative to the repository, or skip (a fresh clone has no shared/)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_pair(tiny_onnx, tmp_path_factory) -> Path:
    """A folder with the tiny model.onnx and the model.int8.onnx export made from it; returns
    the fp32 file."""
    pytest.importorskip("onnx", reason="quantising needs onnx")
    import shutil

    from tiny import write_tiny_int8

    folder = tmp_path_factory.mktemp("tiny-pair")
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy(tiny_onnx.with_name(name), folder / name)
    write_tiny_int8(folder / "model.onnx")
    return folder / "model.onnx"
