"""The TensorRT engine build around TensorRT itself (fake tensorrt module, tests/fake_gpu.py):
names per GPU, the timing cache TensorRT refuses, the order files are written in, and what a
failed parse or build reports."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402
from fake_gpu import H100, FakeTensorRT, install  # noqa: E402
from tiny import write_tiny_checkpoint  # noqa: E402

from retina_batch import engine_build  # noqa: E402
from retina_batch.cli import main  # noqa: E402
from retina_batch.shapes import Range  # noqa: E402

BATCH, CANVAS = Range(1, 4, 16), Range(64, 64, 128)


@pytest.fixture(scope="module")
def fp16_graph(tmp_path_factory):
    from retina_batch.export import export

    root = tmp_path_factory.mktemp("build")
    checkpoint = write_tiny_checkpoint(root / "run")
    summary = export(checkpoint, root / "out", engine=False, parity_count=1,
                     log=lambda *a: None)
    return root, summary


def build(tmp_path, fp16_graph, monkeypatch, trt=None, cache=None):
    root, summary = fp16_graph
    trt, _ = install(monkeypatch, trt)
    messages: list[str] = []
    sidecar = engine_build.build_engine(
        root / "out" / "model.fp16.onnx", tmp_path / "m.engine", BATCH, CANVAS,
        summary["fp16_card"], "retina-batch export ...", timing_cache=cache,
        log=messages.append)
    return trt, sidecar, messages


def test_engine_and_cache_names_key_the_gpu_model_not_only_its_architecture(tmp_path):
    h200 = {**H100, "gpu": "NVIDIA H200"}  # same sm90 as the H100
    engine, cache = engine_build.engine_names(tmp_path / "runs" / "default" / "model.pt", H100,
                                              tmp_path)
    assert engine.name == "default.h100-80gb-hbm3.sm90.trt11.4.0.1.engine"
    assert cache.name == "timing.h100-80gb-hbm3.sm90.trt11.4.0.1.cache"
    other = engine_build.engine_names(tmp_path / "runs" / "default" / "model.pt", h200, tmp_path)
    assert other[0] != engine and other[1] != cache
    assert "h200.sm90" in other[0].name


def test_build_writes_card_engine_and_cache_with_the_profile(tmp_path, fp16_graph, monkeypatch):
    order = []
    real_json, real_atomic = engine_build.write_json_atomic, engine_build.write_atomic
    monkeypatch.setattr(engine_build, "write_json_atomic",
                        lambda p, d: (order.append(p.name), real_json(p, d)))
    monkeypatch.setattr(engine_build, "write_atomic",
                        lambda p, d: (order.append(p.name), real_atomic(p, d)))
    cache = tmp_path / "timing.cache"
    trt, sidecar, messages = build(tmp_path, fp16_graph, monkeypatch, cache=cache)
    # the card first: an engine never lies on disk without its card
    assert order == ["m.engine.json", "m.engine", "timing.cache"]
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN"
    assert json.loads((tmp_path / "m.engine.json").read_text()) == sidecar
    assert sidecar["tensorrt"]["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert sidecar["tensorrt"]["canvas"] == {"min": 64, "opt": 64, "max": 128}
    assert trt.profile_shapes["images"] == ((1, 64, 64, 3), (4, 64, 64, 3), (16, 128, 128, 3))
    assert cache.read_bytes() == b"CACHE:" and messages == []


def test_a_timing_cache_from_another_gpu_starts_a_fresh_one(tmp_path, fp16_graph, monkeypatch):
    """set_timing_cache returns False for it: a fresh cache is built and replaces it, with a
    warning (before: get_timing_cache() was None and serialize() raised after the engine was
    written and before its card)."""
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from an L4")
    trt = FakeTensorRT()
    trt.refuse_caches = {b"from an L4"}
    trt, sidecar, messages = build(tmp_path, fp16_graph, monkeypatch, trt, cache)
    assert trt.attached_caches == [b""]
    assert any("refused the timing cache" in m and "starting a fresh one" in m
               for m in messages), messages
    assert cache.read_bytes() == b"CACHE:"
    assert (tmp_path / "m.engine").is_file() and (tmp_path / "m.engine.json").is_file()
    assert sidecar["tensorrt"]["timing_cache"] == str(cache)


def test_a_cache_that_cannot_be_saved_costs_only_a_warning(tmp_path, fp16_graph, monkeypatch):
    trt = FakeTensorRT()
    trt.serialize_fails = True
    _, _, messages = build(tmp_path, fp16_graph, monkeypatch, trt, tmp_path / "timing.cache")
    assert (tmp_path / "m.engine").is_file() and (tmp_path / "m.engine.json").is_file()
    assert not (tmp_path / "timing.cache").exists()
    assert any("timing cache not saved" in m for m in messages), messages


def test_a_refused_empty_cache_builds_without_one(tmp_path, fp16_graph, monkeypatch):
    trt = FakeTensorRT()
    trt.refuse_caches = {b""}
    _, sidecar, messages = build(tmp_path, fp16_graph, monkeypatch, trt, tmp_path / "t.cache")
    assert sidecar["tensorrt"]["timing_cache"] is None
    assert any("building without one" in m for m in messages)
    assert not (tmp_path / "t.cache").exists()


def test_a_build_failure_reports_what_tensorrt_logged(tmp_path, fp16_graph, monkeypatch):
    trt = FakeTensorRT()
    trt.build_error = "Error Code 2: OutOfMemory (no memory for tactic)"
    with pytest.raises(engine_build.EngineBuildError,
                       match="engine could not be built.*OutOfMemory"):
        build(tmp_path, fp16_graph, monkeypatch, trt)
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()


def test_export_with_a_graph_tensorrt_cannot_parse_exits_1_with_the_parser_messages(
        tmp_path, monkeypatch):
    trt = FakeTensorRT()
    trt.parser_errors = [("Transpose", "/Transpose", "TensorRT does not support UINT8 types "
                          "for intermediate tensors!"), ("Cast", "/Cast", "second error")]
    install(monkeypatch, trt)
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "o"),
                                       "--engine-dir", str(tmp_path / "e"),
                                       "--parity-count", "1"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "engine could not be built" in text
    assert "Transpose /Transpose: TensorRT does not support UINT8" in text
    assert "Cast /Cast: second error" in text and "Traceback" not in result.output
    assert (tmp_path / "o" / "model.onnx").is_file()
    assert (tmp_path / "o" / "model.fp16.onnx").is_file()
    assert not list((tmp_path / "e").glob("*.engine"))
