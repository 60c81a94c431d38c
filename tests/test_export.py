"""`retina-batch export` on a tiny checkpoint: ONNX files, cards, parity, engine fallback."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402
from tiny import TINY_SIZE, fundus_like, write_tiny_checkpoint  # noqa: E402

from retina_batch import export as ex  # noqa: E402
from retina_batch.card import sha256  # noqa: E402
from retina_batch.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One CLI export of a tiny checkpoint, shared by the tests below (~3 s)."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = write_tiny_checkpoint(root / "run")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(root / "out"),
                                       "--engine-dir", str(root / "engines"), "--json"])
    assert result.exit_code == 0, result.output
    return checkpoint, root / "out", json.loads(result.stdout), result.stderr


def test_export_writes_both_onnx_files_with_cards(exported):
    checkpoint, out, summary, _ = exported
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16")):
        path = out / name
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        card = json.loads((out / f"{name}.json").read_text())
        assert card["sha256"] == card["export"]["onnx_sha256"] == sha256(path)
        assert card["export"]["source"] == {"checkpoint": str(checkpoint),
                                            "sha256": sha256(checkpoint)}
        assert card["export"]["opset"] == ex.OPSET
        assert card["export"]["precision"].startswith(precision)
        assert card["working_size"] == TINY_SIZE and card["name"] == "tiny"
        parity = card["export"]["parity"]
        assert {"max_abs_diff", "mask_dice", "mask_agreement", "images"} <= parity.keys()
    assert summary["parity_fp32"]["max_abs_diff"] < 1e-4
    assert summary["parity_fp16"]["mask_dice_min"] >= ex.FP16_MIN_DICE


def test_graph_interface_and_fp16_body(exported):
    _, out, _, _ = exported
    elem = onnx.TensorProto
    for name in ("model.onnx", "model.fp16.onnx"):
        graph = onnx.load(str(out / name)).graph
        (inp,), (outp,) = graph.input, graph.output
        assert (inp.name, inp.type.tensor_type.elem_type) == ("images", elem.UINT8)
        assert (outp.name, outp.type.tensor_type.elem_type) == ("probabilities", elem.FLOAT)
        # batch, height and width dynamic (one graph for every canvas of the profile)
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[:3]] == ["batch", "height", "width"]
        assert dims[3].dim_value == 3
        assert [d.dim_param for d in outp.type.tensor_type.shape.dim] == ["batch", "height",
                                                                          "width"]
    graph = onnx.load(str(out / "model.fp16.onnx")).graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    types = {i.name: i.data_type for i in graph.initializer}
    assert conv_weights and all(types[w] == elem.FLOAT16 for w in conv_weights)
    reduce_in = [n for n in graph.node if n.op_type == "ReduceMean"]
    assert reduce_in  # the standardisation stays in the graph, before the cast to fp16


def test_fp16_matches_fp32_in_true_fp16_arithmetic(exported):
    """onnx.reference computes fp16 ops in fp16 (ONNX Runtime's CPU may upcast)."""
    from onnx.reference import ReferenceEvaluator

    _, out, _, _ = exported
    image = ex.synthetic_fundus(TINY_SIZE, 3)[None]
    fp32 = ex.run_onnx(out / "model.onnx", image)
    fp16 = ReferenceEvaluator(str(out / "model.fp16.onnx")).run(None, {"images": image})[0]
    assert fp16.dtype == np.float32
    # The random tiny model's output spans only ~0.004, so mask Dice at any threshold inside
    # that range would measure the model's flatness; compare against the spread instead.
    spread = float(fp32.max() - fp32.min())
    assert spread > 0 and np.abs(fp32 - fp16).max() < 0.02 * spread
    fp16_ort = ex.run_onnx(out / "model.fp16.onnx", image)
    assert np.abs(fp16_ort - fp16).max() < 0.02 * spread


def test_no_tensorrt_means_one_clear_line_and_exit_0(exported):
    _, _, summary, stderr = exported
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    assert summary["engine"] is None
    lines = [ln for ln in stderr.splitlines() if "no TensorRT engine built" in ln]
    assert len(lines) == 1
    assert "pip install 'retina-batch[tensorrt]'" in lines[0] and "NVIDIA" in lines[0]


def test_require_engine_fails_after_writing_onnx(tmp_path, monkeypatch):
    from retina_batch.backends import tensorrt as trt_backend
    from retina_batch.backends.base import BackendUnavailable

    def no_gpu():
        raise BackendUnavailable("no CUDA GPU found")

    monkeypatch.setattr(trt_backend, "running_platform", no_gpu)
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "o"),
                                       "--require-engine", "--parity-count", "1"])
    assert result.exit_code == 1
    assert "no TensorRT engine built: no CUDA GPU found" in result.stderr
    assert (tmp_path / "o" / "model.fp16.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    (["missing.pt"], "checkpoint not found"),
    (["{ckpt}", "--batch", "4,2,8"], "MIN <= OPT <= MAX"),
    (["{ckpt}", "--batch", "1,x,8"], "expected MIN,OPT,MAX"),
    (["{ckpt}", "--size", "64x32"], "square"),
    (["{ckpt}", "--size", "72"], "not a multiple of 16"),
    (["{ckpt}", "--size", "128,64,256"], "MIN <= OPT <= MAX"),
])
def test_user_mistakes_are_one_red_line(tmp_path, args, message):
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    args = [a.format(ckpt=checkpoint) for a in args]
    result = CliRunner().invoke(main, ["export", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) <= 2  # one message (rich may wrap it)


def test_dynamic_canvas_matches_pytorch_at_every_side_of_the_profile(exported):
    """The card records parity at the profile's other canvases (default W..2W: 96 and 128 px
    for the 64 px tiny model), and ONNX Runtime runs each of those sides like PyTorch."""
    from retina_batch.backends.torch import load_network
    from retina_batch.model import InferenceModel

    checkpoint, out, summary, _ = exported
    assert summary["canvas"] == {"min": 64, "opt": 64, "max": 128}
    card = json.loads((out / "model.onnx.json").read_text())
    assert card["export"]["shapes"] == {"batch": {"min": 1, "opt": 4, "max": 16},
                                        "canvas": {"min": 64, "opt": 64, "max": 128}}
    assert set(card["export"]["parity"]["canvases"]) == {"96", "128"}
    module = InferenceModel(load_network(checkpoint)).eval()
    for side in (64, 96, 128):
        image = ex.synthetic_fundus(side, 5)[None]
        got, want = ex.run_onnx(out / "model.onnx", image), ex.run_torch(module, image)
        assert got.shape == (1, side, side)
        assert np.abs(got - want).max() < 1e-4


def test_a_locally_normalised_model_exports_and_runs_like_pytorch_at_every_side(tmp_path):
    """--norm local puts Pad, AveragePool and Resize before the network: the exported graph
    must follow the dynamic canvas (sides that are not multiples of the 8 px cells included)
    and give PyTorch's probabilities."""
    from retina_batch.backends.torch import load_network
    from retina_batch.model import InferenceModel

    checkpoint = write_tiny_checkpoint(tmp_path / "run", norm="local")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "out"),
                                       "--no-engine", "--json"])
    assert result.exit_code == 0, result.output
    module = InferenceModel(load_network(checkpoint)).eval()
    assert module.net.config.norm == "local"
    for side in (64, 80, 128):
        image = ex.synthetic_fundus(side, 5)[None]
        got = ex.run_onnx(tmp_path / "out" / "model.onnx", image)
        assert np.abs(got - ex.run_torch(module, image)).max() < 1e-4, side


def test_canvas_sides_checked_besides_the_working_one():
    from retina_batch.shapes import Range

    assert ex.canvas_sides(Range(512, 512, 1024), 16) == [768, 1024]
    assert ex.canvas_sides(Range(384, 512, 1024), 16) == [384, 704, 1024]
    assert ex.canvas_sides(Range(512, 512, 512), 16) == []


def test_segment_with_exported_onnx_gives_the_source_masks(exported, tmp_path):
    """segment --model exported.onnx and --backend torch on the checkpoint write equal masks."""
    from retina_batch.backends import open_backend
    from retina_batch.pipeline import segment

    checkpoint, out, _, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), fundus_like(96, 80, seed=i))
    with open_backend("torch", checkpoint, batch_size=1) as runner:  # a threshold that splits
        probs = runner.infer(np.stack([ex.synthetic_fundus(TINY_SIZE, 0)]))
    threshold = float(np.median(probs))
    for name, backend, model in (("onnx", "onnxruntime", out / "model.onnx"),
                                 ("torch", "torch", checkpoint)):
        segment(images, tmp_path / name, backend=backend, model=model, threshold=threshold,
                workers=1, batch_size=2)
    for i in range(3):
        a = cv2.imread(str(tmp_path / "onnx" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        b = cv2.imread(str(tmp_path / "torch" / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        assert a.shape == (80, 96) and 0 < np.count_nonzero(a) < a.size
        assert (a == b).mean() > 0.999


def test_export_without_pytorch_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from retina_batch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model.pt"), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "pip install 'retina-batch[train]'" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def _figures(max_diff: float, mean_diff: float, dice: float) -> dict:
    return {"max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "mask_dice": dice,
            "mask_dice_min": dice}


@pytest.mark.parametrize("at_1024, broken", [
    # the final two-camera model's worst parity photograph: a few noisy pixels, masks agree
    (_figures(0.0687, 1.6e-4, 0.999098), False),
    # a dynamic axis computing something else: off everywhere, masks disagree
    (_figures(0.4, 0.08, 0.7), True),
    (_figures(0.02, 2e-3, 0.9995), True),  # off on average though the worst pixel is small
    (_figures(0.02, 1e-4, 0.95), True),  # the masks disagree
])
def test_parity_at_other_canvases_judges_the_whole_map_not_one_pixel(at_1024, broken, tmp_path):
    parity32 = {**_figures(3e-3, 1e-5, 0.9999), "canvases": {
        "768": _figures(6e-3, 3e-5, 0.9998), "1024": at_1024}}
    parity16 = {**_figures(9e-3, 1e-4, 0.9997), "canvases": {}}
    if broken:
        with pytest.raises(ex.ParityError, match="1024 px canvas"):
            ex._check_parity(parity32, parity16, tmp_path / "model.fp16.onnx")
    else:
        ex._check_parity(parity32, parity16, tmp_path / "model.fp16.onnx")
    with pytest.raises(ex.ParityError, match="working canvas"):
        ex._check_parity({**parity32, "max_abs_diff": 0.05}, parity16, tmp_path / "f.onnx")
