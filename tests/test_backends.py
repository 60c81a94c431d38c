"""Backends beyond ONNX Runtime: torch, TensorRT (what can be checked without a GPU), auto."""

from __future__ import annotations

import enum
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from retina_batch.backends import BackendUnavailable, auto, open_backend
from retina_batch.backends import tensorrt as trt_backend
from retina_batch.card import sha256, write_json_atomic

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None
H100 = {"tensorrt": "11.0.0.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def write_engine(folder, model_card: dict, platform: dict, name="m.sm90.engine"):
    """A fake engine file + sidecar for `model_card`'s weights, built 'on' `platform`."""
    engine = folder / name
    engine.write_bytes(b"not a real plan")
    sidecar = {**model_card, "weights": name, "sha256": sha256(engine),
               "tensorrt": {**platform, "profile": {"min": 1, "opt": 4, "max": 8},
                            "onnx_sha256": model_card["sha256"],
                            "rebuild": "retina-batch export runs/x/model.pt --out dist"}}
    write_json_atomic(folder / f"{name}.json", sidecar)
    return engine


# --- torch ---------------------------------------------------------------------------------
def test_torch_backend_matches_onnx_export_of_same_weights(tiny_onnx):
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with open_backend("torch", tiny_onnx.with_name("model.pt"), batch_size=4,
                      device="cpu") as torch_runner:
        future = torch_runner.submit(images)
        from_torch = future.result()
        assert future.compute_seconds > 0
        assert torch_runner.describe()["runtime"].startswith("torch")
    with open_backend("onnxruntime", tiny_onnx, batch_size=4) as ort_runner:
        from_onnx = ort_runner.infer(images)
    assert from_torch.shape == (3, 64, 64) and from_torch.dtype == np.float32
    assert np.abs(from_torch - from_onnx).max() < 1e-4


def test_torch_backend_cuda_without_gpu_is_a_clear_error(tiny_onnx):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BackendUnavailable, match="--device cuda"):
        open_backend("torch", tiny_onnx.with_name("model.pt"), device="cuda")


def test_torch_backend_rejects_a_file_that_is_not_a_checkpoint(tmp_path, tiny_onnx):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    (tmp_path / "model.json").write_text(tiny_onnx.with_name("model.json").read_text())
    with pytest.raises(BackendUnavailable, match="not a retina-batch checkpoint"):
        open_backend("torch", bad)


# --- TensorRT without TensorRT -------------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_install(tmp_path, tiny_onnx):
    engine = write_engine(tmp_path, json.loads(tiny_onnx.with_name("model.onnx.json")
                                               .read_text()), H100)
    with pytest.raises(BackendUnavailable, match=r"pip install 'retina-batch\[tensorrt\]'"):
        open_backend("tensorrt", engine)


def test_tensorrt_backend_refuses_cpu(tmp_path, tiny_onnx):
    engine = write_engine(tmp_path, json.loads(tiny_onnx.with_name("model.onnx.json")
                                               .read_text()), H100)
    with pytest.raises(BackendUnavailable, match="--backend onnxruntime"):
        open_backend("tensorrt", engine, device="cpu")


@pytest.mark.skipif(HAVE_CUDA_PYTHON, reason="cuda-python is installed here")
def test_missing_cuda_python_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="cuda-python is not installed"):
        trt_backend.import_cudart()


def test_cuda_check_returns_values_and_names_errors():
    status = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2})
    assert trt_backend.cuda_check((status.cudaSuccess, 1234)) == 1234
    assert trt_backend.cuda_check((status.cudaSuccess, 1, 2)) == (1, 2)
    assert trt_backend.cuda_check((status.cudaSuccess,)) is None
    with pytest.raises(trt_backend.CudaError, match="cudaErrorMemoryAllocation"):
        trt_backend.cuda_check((status.cudaErrorMemoryAllocation, 0))


@pytest.mark.parametrize("running, problem", [
    (H100, None),
    ({**H100, "tensorrt": "10.13.0.35"}, "tensorrt 11.0.0.1 (engine) != 10.13.0.35 (here)"),
    ({**H100, "gpu": "NVIDIA L4", "compute_capability": "8.9"}, "gpu NVIDIA H100"),
])
def test_sidecar_check_against_running_platform(running, problem):
    sidecar = {"tensorrt": {**H100, "rebuild": "retina-batch export a/model.pt --out b"}}
    if problem is None:
        trt_backend.check_sidecar(sidecar, running, "x.engine")
        return
    with pytest.raises(BackendUnavailable) as info:
        trt_backend.check_sidecar(sidecar, running, "x.engine")
    assert problem in str(info.value)
    assert "rebuild it here with `retina-batch export a/model.pt --out b`" in str(info.value)


def test_sidecar_without_tensorrt_section_is_refused():
    with pytest.raises(BackendUnavailable, match="no 'tensorrt' section"):
        trt_backend.check_sidecar({"name": "x"}, H100, "x.engine")


# --- auto ----------------------------------------------------------------------------------
@pytest.fixture
def fake_h100(monkeypatch):
    monkeypatch.setattr(trt_backend, "running_platform", lambda device=0: dict(H100))


def test_auto_by_file_type(tmp_path):
    assert auto.choose(tmp_path / "model.pt", "auto") == ("torch", tmp_path / "model.pt")
    assert auto.choose(tmp_path / "a.engine", "auto") == ("tensorrt", tmp_path / "a.engine")


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_auto_without_tensorrt_is_onnxruntime(tiny_onnx):
    assert auto.choose(tiny_onnx, "auto") == ("onnxruntime", tiny_onnx)


def test_auto_picks_a_matching_engine(tmp_path, tiny_onnx, fake_h100):
    card = json.loads(tiny_onnx.with_name("model.onnx.json").read_text())
    engine = write_engine(tmp_path, card, H100)
    assert auto.choose(tiny_onnx, "auto", engine_dir=tmp_path) == ("tensorrt", engine)
    assert auto.choose(tiny_onnx, "cpu", engine_dir=tmp_path) == ("onnxruntime", tiny_onnx)


def test_auto_ignores_engines_for_other_gpus_or_weights(tmp_path, tiny_onnx, fake_h100):
    card = json.loads(tiny_onnx.with_name("model.onnx.json").read_text())
    write_engine(tmp_path, card, {**H100, "gpu": "NVIDIA L4", "compute_capability": "8.9"},
                 name="m.sm89.engine")
    write_engine(tmp_path, {**card, "sha256": "0" * 64}, H100, name="other.sm90.engine")
    (tmp_path / "nosidecar.engine").write_bytes(b"x")
    assert auto.choose(tiny_onnx, "auto", engine_dir=tmp_path) == ("onnxruntime", tiny_onnx)


def test_auto_matches_engine_by_source_checkpoint(tmp_path, tiny_onnx, fake_h100):
    """An fp32 model.onnx and an engine built from model.fp16.onnx share the checkpoint."""
    card = json.loads(tiny_onnx.with_name("model.onnx.json").read_text())
    model_card = {**card, "export": {"source": {"sha256": "c" * 64}}}
    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(tiny_onnx.read_bytes())
    write_json_atomic(tmp_path / "m" / "model.onnx.json", model_card)
    engine_card = {**card, "sha256": "f" * 64, "export": {"source": {"sha256": "c" * 64}}}
    engine = write_engine(tmp_path, engine_card, H100)
    assert auto.choose(model, "auto", engine_dir=tmp_path) == ("tensorrt", engine)


# --- on a GPU ------------------------------------------------------------------------------
CHECKPOINT = Path(__file__).resolve().parents[1] / "train" / "default" / "model.pt"


def gpu_photographs(count: int = 8) -> np.ndarray:
    """Canvases of real photographs (../shared/data) prepared as segment prepares them, else
    synthetic fundus photographs."""
    from conftest import SHARED_DATA

    from retina_batch.export import parity_images

    folder = SHARED_DATA / "retina-blood-vessel" / "train" / "image"
    return parity_images(512, {}, folder if folder.is_dir() else None, count)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and HAVE_CUDA_PYTHON), reason="needs tensorrt, cuda-python "
                    "and an NVIDIA GPU (pip install 'retina-batch[tensorrt]')")
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    """The shipped checkpoint's engine against ONNX Runtime fp32 on photographs. The trained
    model's probabilities span 0..1, so a wrong engine (wrong input layout, normalisation,
    precision) shows as masks that disagree; the tiny random model's outputs span ~4e-3,
    which no tolerance can judge."""
    pytest.importorskip("torch")
    from retina_batch.export import export
    from retina_batch.metrics import Confusion, scores

    try:
        trt_backend.running_platform()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    summary = export(CHECKPOINT, tmp_path / "out", batch="1,4,8", size="512",
                     engine_dir=tmp_path / "eng", require_engine=True, parity_count=2,
                     log=lambda *a: None)
    images = gpu_photographs()
    with open_backend("onnxruntime", summary["onnx"], batch_size=4) as ort_runner:
        expected = np.concatenate([ort_runner.infer(images[i:i + 4]) for i in (0, 4)])
        threshold = ort_runner.threshold
    with open_backend("tensorrt", summary["engine"], batch_size=4) as runner:
        # three batches in flight, two of them short (padded to the profile's minimum)
        futures = [runner.submit(images[a:b]) for a, b in ((0, 4), (4, 7), (7, 8))]
        got = np.concatenate([f.result() for f in futures])
        assert all(f.compute_seconds > 0 for f in futures)
    span = float(np.percentile(expected, 99.9) - np.percentile(expected, 0.1))
    assert span > 0.5  # a trained model: the comparison below means something
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 0.05 * span  # fp16 engine vs fp32: ~1e-2 expected
    for want, have in zip(expected >= threshold, got >= threshold, strict=True):
        assert scores(Confusion.of(want, have))["dice"] >= 0.99
    assert auto.choose(summary["onnx"], "auto", engine_dir=tmp_path / "eng")[0] == "tensorrt"
