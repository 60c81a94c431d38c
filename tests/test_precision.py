"""`--precision auto|fp32|int8`: which file ONNX Runtime runs, why, and where it is recorded."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import pytest
from click.testing import CliRunner
from tiny import fundus_like

from retina_batch.backends import BackendUnavailable, open_backend
from retina_batch.backends import precision as pr
from retina_batch.card import load_card, write_json_atomic
from retina_batch.cli import main

VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def pair(tiny_pair):
    return tiny_pair


@pytest.fixture
def cpu(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) VNNI."""
    def set_cpu(fast: bool):
        monkeypatch.setattr(pr, "cpu_int8_support",
                            lambda: (fast, "CPU has avx512_vnni" if fast else "no VNNI"))
    return set_cpu


def test_cpu_support_is_read_from_the_flags():
    assert pr.cpu_int8_support(VNNI, "x86_64") == (True, "CPU has avx512_vnni")
    assert pr.cpu_int8_support(VNNI.replace("avx512_vnni", "avx_vnni amx_int8"), "x86_64")[0]
    fast, why = pr.cpu_int8_support(AVX2, "x86_64")
    assert not fast and "VNNI" in why
    assert not pr.cpu_int8_support("", "x86_64")[0]  # unknown: fp32
    assert not pr.cpu_int8_support(VNNI, "aarch64")[0]  # not measured there: fp32


@pytest.mark.parametrize("requested, fast, expected", [
    ("auto", True, "int8"), ("auto", False, "fp32"), ("fp32", True, "fp32"),
    ("int8", False, "int8")])
def test_choice_of_file(pair, cpu, requested, fast, expected):
    cpu(fast)
    choice = pr.choose(pair, requested, "onnxruntime", "cpu")
    assert choice.precision == expected
    assert choice.path == (pair.with_name("model.int8.onnx") if expected == "int8" else pair)
    if requested == "auto":
        assert choice.reason.startswith("auto: ") and ("VNNI" in choice.reason) != fast


def test_auto_ignores_a_stale_or_failing_int8_file(pair, cpu, tmp_path):
    cpu(True)
    for name in ("model.onnx", "model.onnx.json", "model.int8.onnx", "model.int8.onnx.json"):
        shutil.copy(pair.with_name(name), tmp_path / name)
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx.json"
    card = json.loads(int8.read_text())
    stale = json.loads(json.dumps(card))
    stale["export"]["int8"]["source"]["sha256"] = "0" * 64  # made from other weights
    write_json_atomic(int8, stale)
    choice = pr.choose(fp32, "auto", "onnxruntime", "cpu")
    assert choice.precision == "fp32" and "not made from this model.onnx" in choice.reason
    with pytest.raises(BackendUnavailable, match="not made from this"):
        pr.choose(fp32, "int8", "onnxruntime", "cpu")
    failing = json.loads(json.dumps(card))
    failing["export"]["int8"]["parity"]["mask_dice_min"] = 0.95
    write_json_atomic(int8, failing)
    assert pr.choose(fp32, "auto", "onnxruntime", "cpu").precision == "fp32"
    write_json_atomic(int8, card)
    assert pr.choose(fp32, "auto", "onnxruntime", "cpu").precision == "int8"


def test_int8_needs_the_file_the_runtime_and_the_cpu(pair, tiny_onnx, cpu):
    cpu(True)
    with pytest.raises(BackendUnavailable, match="no model.int8.onnx beside model.onnx"):
        pr.choose(tiny_onnx, "int8", "onnxruntime", "cpu")
    assert pr.choose(tiny_onnx, "auto", "onnxruntime", "cpu").precision == "fp32"
    with pytest.raises(BackendUnavailable, match="int8 runs on --backend onnxruntime"):
        pr.choose(pair.with_name("model.pt"), "int8", "torch", "cpu")
    with pytest.raises(BackendUnavailable, match="--device cpu"):
        pr.choose(pair, "int8", "onnxruntime", "cuda")
    assert pr.choose(pair, "auto", "onnxruntime", "cuda").precision == "fp32"
    # an int8 file given with --model runs as int8; asking it for fp32 is a mistake
    int8 = pair.with_name("model.int8.onnx")
    assert pr.choose(int8, "auto", "onnxruntime", "cpu").precision == "int8"
    with pytest.raises(BackendUnavailable, match="model.int8.onnx is int8"):
        pr.choose(int8, "fp32", "onnxruntime", "cpu")


def test_open_backend_runs_the_chosen_file_and_says_so(pair, cpu):
    cpu(True)
    with open_backend("onnxruntime", pair, batch_size=1, device="cpu") as runner:
        info = runner.describe()
    assert info["model"] == str(pair.with_name("model.int8.onnx"))
    assert info["precision"] == "int8" and info["precision_reason"].startswith("auto:")
    with open_backend("onnxruntime", pair, batch_size=1, precision="fp32") as runner:
        assert runner.describe()["precision"] == "fp32"
        assert runner.model_path == pair


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_segment_records_the_precision_in_summary_and_rows(pair, tmp_path, precision):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), fundus_like(80, 70, seed=i))
    result = CliRunner().invoke(main, ["segment", str(images), "--out", str(tmp_path / "out"),
                                       "--model", str(pair), "--precision", precision,
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"]["precision"] == precision
    name = "model.int8.onnx" if precision == "int8" else "model.onnx"
    assert summary["backend"]["model"] == str(pair.with_name(name))
    assert summary["model_sha256"] == load_card(pair.with_name(name))["sha256"]
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["precision"] for r in rows] == [precision] * 2


def test_segment_int8_without_an_int8_file_is_one_line(tiny_onnx, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), fundus_like(80, 70))
    result = CliRunner().invoke(main, ["segment", str(images), "--out", str(tmp_path / "out"),
                                       "--model", str(tiny_onnx), "--precision", "int8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "retina-batch export" in " ".join(result.stderr.split())
