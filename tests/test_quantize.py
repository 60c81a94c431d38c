"""int8: static QDQ quantisation (retina_batch.quantize) and `export --int8`, on tiny models;
the shipped int8 model's card, and its parity on the real validation photographs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402
from tiny import TINY_SIZE, fundus_like, synthetic_canvases, write_tiny_checkpoint  # noqa: E402

from retina_batch import export as ex  # noqa: E402
from retina_batch.backends.base import default_model  # noqa: E402
from retina_batch.card import (  # noqa: E402
    INT8_MIN_DICE,
    load_card,
    sha256,
    write_json_atomic,
)
from retina_batch.cli import main  # noqa: E402
from retina_batch.quantize import Settings, quantize_graph  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    quantize_graph(tiny_onnx, path, synthetic_canvases(range(100, 108)), Settings())
    return path


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def test_quantized_graph_is_qdq_with_float_ends_and_untouched_input(tiny_onnx, quantized):
    onnx.checker.check_model(onnx.load(str(quantized)), full_check=True)
    fp32, graph = onnx.load(str(tiny_onnx)).graph, onnx.load(str(quantized)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # The uint8 input goes to the same (unquantised) node as in the fp32 graph: a Cast or
    # the layout Transpose, never a Q/DQ node (TensorRT's parser rule for uint8 inputs).
    (inp,) = graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    consumers = [n.op_type for n in graph.node if inp.name in n.input]
    assert consumers == [n.op_type for n in fp32.node if inp.name in n.input]
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(consumers)
    # Weights: int8 behind DequantizeLinear, except the first 3 and the last convolution
    # of the forward pass (the fp32 graph's order) and those of the attention gates (named
    # for their module by the exporter; the code finds them by structure).
    producers, inits = _producers(graph), {i.name: i for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    convs = [by_name[n.name] for n in fp32.node if n.op_type in ("Conv", "ConvTranspose")]
    dequantized = [producers.get(c.input[1]) is not None
                   and producers[c.input[1]].op_type == "DequantizeLinear" for c in convs]
    gate = ["/gate/" in c.name for c in convs]
    assert sum(gate) >= 6  # 3 convolutions per gate, one gate per decoder level
    # ConvTranspose is not among the quantised operators (ONNX Runtime has no int8 kernel)
    assert dequantized == [i >= 3 and i < len(convs) - 1 and not gate[i]
                           and convs[i].op_type == "Conv" for i in range(len(convs))]
    assert any(c.op_type == "ConvTranspose" for c in convs[3:-1])  # so the last rule matters
    for conv in [c for c, q in zip(convs, dequantized, strict=True) if q]:  # per-channel
        weight, scale = (inits[name] for name in producers[conv.input[1]].input[:2])
        assert weight.data_type == onnx.TensorProto.INT8
        assert scale.dims == [weight.dims[0 if conv.op_type == "Conv" else 1]]
    # From the (float) head convolution to the output, float all the way: no Q/DQ.
    node, path = producers[graph.output[0].name], []
    while node.op_type not in ("Conv", "ConvTranspose"):
        path.append(node.op_type)
        node = producers[node.input[0]]
    assert node is convs[-1] and "Sigmoid" in path and not {"QuantizeLinear"} & set(path)


def test_default_int8_graph_passes_the_tensorrt_parser_rules(tiny_onnx, quantized, tmp_path):
    """Signed int8 Q/DQ with zero points 0, no uint8 tensor, no int32 bias DequantizeLinear:
    what TensorRT's explicit quantisation takes. The asymmetric uint8 form, ONNX Runtime's own
    default, breaks those rules (so the check is not vacuous)."""
    from dataclasses import replace

    from retina_batch.graph_rules import check_tensorrt_parsable

    shapes = {"images": [(1, TINY_SIZE, TINY_SIZE, 3), (4, TINY_SIZE, TINY_SIZE, 3),
                         (16, TINY_SIZE, TINY_SIZE, 3)]}
    assert check_tensorrt_parsable(quantized, shapes) == []
    asymmetric = tmp_path / "uint8.onnx"
    quantize_graph(tiny_onnx, asymmetric, synthetic_canvases(range(100, 104)),
                   replace(Settings(), activations="uint8"))
    problems = " ".join(check_tensorrt_parsable(asymmetric, shapes))
    assert "uint8 tensor" in problems and "zero point of 0" in problems


def test_export_refuses_an_int8_graph_that_breaks_the_rules(tiny_onnx, tmp_path):
    """No model.int8.onnx is left when the graph breaks a parser rule (GraphRuleError)."""
    import shutil
    from dataclasses import replace

    from retina_batch.quantize import Calibration, export_int8

    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy(tiny_onnx.with_name(name), tmp_path / name)
    fp32 = tmp_path / "model.onnx"
    calibration = Calibration(synthetic_canvases(range(100, 104)), ["synthetic"], "synthetic")
    images = synthetic_canvases(range(2))
    with pytest.raises(ex.GraphRuleError, match="parser's rules"):
        export_int8(fp32, {**load_card(fp32), "threshold": float(np.median(
            ex.run_onnx(fp32, images)))}, images, "2 synthetic", calibration,
            replace(Settings(), activations="uint8"), log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_int8_probabilities_and_masks_follow_fp32(tiny_onnx, quantized):
    """The random tiny model's output spans only ~3e-3 around 0.52, so errors are judged
    against that spread and masks at its median (calibrating on grey images instead
    gives errors of half the spread and 50 % agreement: a coin toss)."""
    images = synthetic_canvases(range(4))  # not the calibration images
    fp32, int8 = ex.run_onnx(tiny_onnx, images), ex.run_onnx(quantized, images)
    spread = float(fp32.max() - fp32.min())
    assert spread > 0 and np.abs(fp32 - int8).max() < 0.1 * spread
    # at the median every pixel is on the edge: a wrong calibration gives 0.5 (a coin toss);
    # symmetric int8 (7 bits for the non-negative ReLU outputs) measured 0.76, uint8 0.85+
    assert ex.compare(fp32, int8, float(np.median(fp32)))["mask_agreement"] > 0.7


def _export(tmp_path, *args, threshold=None, no_engine=True):
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    if threshold is not None:  # a threshold that splits the tiny model's flat output
        card = json.loads((tmp_path / "run" / "model.json").read_text())
        write_json_atomic(tmp_path / "run" / "model.json", {**card, "threshold": threshold})
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "out"),
                                       "--parity-count", "2", "--engine-dir",
                                       str(tmp_path / "engines"), *args]
                                + (["--no-engine"] if no_engine else []))
    assert "Traceback" not in result.output, result.output
    return result


def _photographs(folder, value=None, count=5):
    folder.mkdir(parents=True)
    for i in range(count):
        image = fundus_like(90, 80, seed=i) if value is None else np.full((80, 90, 3), value,
                                                                           np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), image)
    return folder


def test_export_int8_writes_the_model_and_a_card_with_parity(tmp_path):
    calibration = _photographs(tmp_path / "calib")
    result = _export(tmp_path, "--int8", "--calibration", str(calibration), "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    int8, fp32 = out / "model.int8.onnx", out / "model.onnx"
    card, fp32_card = load_card(int8), load_card(fp32)
    assert card["sha256"] == card["export"]["onnx_sha256"] == sha256(int8)
    assert card["weights"] == "model.int8.onnx" and card["export"]["precision"].startswith("int8")
    assert {k: v for k, v in card.items() if k not in ("weights", "sha256", "export")} == \
        {k: v for k, v in fp32_card.items() if k not in ("weights", "sha256", "export")}
    section = card["export"]["int8"]
    assert section["source"] == {"onnx": "model.onnx", "sha256": sha256(fp32)}
    assert section["settings"] == Settings().describe()
    assert section["calibration"]["images"] == [str(calibration / f"{i}.png") for i in range(5)]
    parity = section["parity"]
    assert card["export"]["parity"] == parity and parity["reference"] == "model.onnx (fp32)"
    assert parity["min_dice"] == INT8_MIN_DICE and parity["mask_dice_min"] >= INT8_MIN_DICE
    assert {"max_abs_diff", "mask_dice", "mask_agreement", "images"} <= parity.keys()
    assert json.loads(result.stdout)["parity_int8"] == parity


def test_int8_gate_fails_on_an_absurd_calibration_and_leaves_no_int8_file(tmp_path,
                                                                            monkeypatch):
    """Grey calibration photographs standardise to all zeros: every range is wrong. (At a
    threshold that splits the tiny model's flat output, fp16 would fail its own gate first:
    that one is not what this test is about.)"""
    monkeypatch.setattr(ex, "FP16_MIN_DICE", 0.0)
    images = synthetic_canvases(range(2))  # the parity images export uses here
    checkpoint = write_tiny_checkpoint(tmp_path / "probe")
    from retina_batch.backends.torch import load_network
    from retina_batch.model import InferenceModel

    threshold = float(np.median(ex.run_torch(InferenceModel(load_network(checkpoint)).eval(),
                                             images)))
    result = _export(tmp_path, "--calibration", str(_photographs(tmp_path / "grey", 128)),
                     threshold=threshold)
    assert result.exit_code == 1
    assert "int8 masks agree with fp32 only to Dice" in " ".join(result.stderr.split())
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.onnx" in out and not any("int8" in name for name in out)


def test_no_calibration_photographs_means_no_int8_and_one_line(tmp_path):
    result = _export(tmp_path)  # the tiny card names no training data
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "model.int8.onnx").exists()
    lines = [ln for ln in result.stderr.splitlines() if "no int8 model" in ln]
    assert len(lines) == 1 and "--calibration" in " ".join(result.stderr.split())
    required = _export(tmp_path / "again", "--int8")
    assert required.exit_code == 2 and "no calibration photographs" in required.stderr


def test_calibration_defaults_to_the_cards_training_photographs(tmp_path):
    from retina_batch.quantize import calibration_set

    folder = _photographs(tmp_path / "data" / "image", count=6)
    card = {"training": {"data": str(tmp_path / "data"), "images_train": ["0", "2", "3", "5"],
                         "images_val": ["1", "4"]}}
    made = calibration_set(card, TINY_SIZE, count=16)
    assert made.files == [str(folder / f"{i}.png") for i in (0, 2, 3, 5)]
    assert made.images.shape == (4, TINY_SIZE, TINY_SIZE, 3) and made.images.dtype == np.uint8
    assert calibration_set({"training": {"data": str(tmp_path / "nowhere")}}, TINY_SIZE) is None
    assert len(calibration_set(card, TINY_SIZE, count=2).files) == 2


# --- the shipped model -------------------------------------------------------------------------
def test_shipped_int8_model_matches_its_card_and_the_shipped_fp32():
    fp32 = default_model()
    int8 = fp32.with_name("model.int8.onnx")
    card = load_card(int8)
    assert card["sha256"] == sha256(int8) == card["export"]["onnx_sha256"]
    section = card["export"]["int8"]
    assert section["source"]["sha256"] == sha256(fp32) == load_card(fp32)["sha256"]
    assert section["parity"]["mask_dice_min"] >= INT8_MIN_DICE
    # made with the settings this code uses by default (re-run the documented command after
    # changing them: train/default/README.md)
    assert section["settings"] == Settings().describe()


def test_shipped_int8_model_passes_the_tensorrt_parser_rules():
    """The shipped file is also TensorRT's explicit-quantisation input: signed int8 Q/DQ
    (re-quantising it with uint8 activations, ONNX Runtime's default, fails here), checked
    against the profile its card records, dynamic height and width included."""
    from retina_batch.graph_rules import check_tensorrt_parsable

    int8 = default_model().with_name("model.int8.onnx")
    card = load_card(int8)
    assert card["export"]["int8"]["settings"]["activations"] == "int8"
    assert card["export"]["shapes"]["canvas"]["max"] > card["working_size"]
    assert check_tensorrt_parsable(int8) == []  # the profile: the card's export.shapes


@pytest.mark.parametrize("side", [512, 768])
def test_shipped_int8_model_runs_on_the_canvases_segment_chooses(side):
    """`--size auto` puts large photographs on a 768 canvas: the int8 graph keeps dynamic
    height and width, and its masks still follow fp32's there (synthetic photographs)."""
    fp32 = default_model()
    images = synthetic_canvases(range(2), side)
    a, b = ex.run_onnx(fp32, images), ex.run_onnx(fp32.with_name("model.int8.onnx"), images)
    assert b.shape == (2, side, side)
    assert ex.compare(a, b, load_card(fp32)["threshold"])["mask_dice_min"] > 0.97


@pytest.mark.slow
def test_shipped_int8_masks_match_fp32_on_the_cards_photographs(shared_data):
    """The card's claim, re-measured on 4 of the photographs export checks it on (validation
    ones, or training ones for a model that held none out, as the shipped final run)."""
    from retina_batch.export import _card_images, prepare_photographs

    fp32 = default_model()
    card = load_card(fp32)
    files = _card_images(card)
    if not files:
        pytest.skip(f"the card's photographs are not in {card['training']['data']}")
    images, _ = prepare_photographs(files, card["working_size"], 4)
    parity = ex.compare(ex.run_onnx(fp32, images),
                        ex.run_onnx(fp32.with_name("model.int8.onnx"), images),
                        card["threshold"])
    assert parity["mask_dice_min"] >= INT8_MIN_DICE


def test_a_graph_with_dynamic_height_and_width_quantises(tmp_path, monkeypatch):
    """export may make H and W dynamic (issue 10): quantise whatever graph it produces."""
    import warnings

    from retina_batch.backends.torch import load_network
    from retina_batch.model import InferenceModel

    net = load_network(write_tiny_checkpoint(tmp_path / "run"))
    fp32 = tmp_path / "model.onnx"
    axes = {0: "n", 1: "h", 2: "w"}
    with warnings.catch_warnings():  # tracer warnings about the padding branch
        warnings.simplefilter("ignore")
        torch.onnx.export(InferenceModel(net).eval(),
                          (torch.zeros(1, TINY_SIZE, TINY_SIZE, 3, dtype=torch.uint8),),
                          str(fp32), input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": axes, "probabilities": axes}, dynamo=False,
                          opset_version=ex.OPSET)
    int8 = tmp_path / "model.int8.onnx"
    # ONNX Runtime's symbolic shape inference gives up on such graphs and leaves scratch files
    # in the current directory: quantisation must run elsewhere and leave the cwd alone.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    quantize_graph(fp32, int8, synthetic_canvases(range(100, 104)), Settings())
    assert list(cwd.iterdir()) == []
    images = synthetic_canvases(range(2), 96)  # another size than the calibration's
    a, b = ex.run_onnx(fp32, images), ex.run_onnx(int8, images)
    assert b.shape == (2, 96, 96) and np.abs(a - b).max() < 0.1 * float(a.max() - a.min())


def test_int8_engine_step_builds_from_the_int8_file_itself(tmp_path, monkeypatch):
    """The TensorRT INT8 path with TensorRT itself faked (it cannot be installed here): the
    engine is built from model.int8.onnx (symmetric int8, zero points 0, as TensorRT's
    explicit quantisation requires) and its sidecar is the int8 card."""
    from retina_batch import engine_build
    from retina_batch.backends import tensorrt as trt_backend
    from retina_batch.backends.precision import model_precision

    platform = {"tensorrt": "11.0.0.1", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    built = []

    def fake_build(onnx_path, engine_path, batch, canvas, card, rebuild, **options):
        built.append((onnx_path, batch.as_dict(), canvas.as_dict()))
        write_json_atomic(engine_path.with_name(engine_path.name + ".json"), card)
        engine_path.write_bytes(b"plan")
        return card

    monkeypatch.setattr(trt_backend, "running_platform", lambda: platform)
    monkeypatch.setattr(engine_build, "build_engine", fake_build)
    monkeypatch.setattr(ex, "_engine_step", lambda *a: {"engine": "fp16.engine",
                                                        "engine_skipped": None})
    calibration = _photographs(tmp_path / "calib")
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    summary = ex.export(checkpoint, tmp_path / "out", calibration=calibration, parity_count=2,
                        size=str(TINY_SIZE), engine_dir=tmp_path / "engines",
                        log=lambda *a: None)
    int8 = tmp_path / "out" / "model.int8.onnx"
    assert built == [(int8, {"min": 1, "opt": 4, "max": 16},
                      {"min": TINY_SIZE, "opt": TINY_SIZE, "max": TINY_SIZE})]
    engine = tmp_path / "engines" / "run.h100.sm90.trt11.0.0.1.int8.engine"
    assert summary["int8_engine"] == str(engine) and summary["int8_engine_skipped"] is None
    sidecar = load_card(engine)
    assert model_precision(sidecar) == "int8"
    assert sidecar["export"]["int8"]["settings"]["activations"] == "int8"
    assert sidecar["export"]["onnx_sha256"] == sha256(int8)


def test_no_tensorrt_means_no_int8_engine_and_no_extra_line(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    result = _export(tmp_path, "--calibration", str(_photographs(tmp_path / "calib")),
                     "--json", no_engine=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["onnx_int8"] and summary["int8_engine"] is None
    assert "no INT8 TensorRT engine" in summary["int8_engine_skipped"]
    assert "INT8" not in result.stderr  # the fp16 line already says why no engine
