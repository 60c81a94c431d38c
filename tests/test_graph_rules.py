"""graph_rules: every exported graph follows the ONNX-TensorRT parser's rules, and each rule
catches the graphs that break it (TensorRT itself cannot run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from retina_batch.graph_rules import check_tensorrt_parsable  # noqa: E402

DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "retina_batch" / "default_model"
F, U8 = TensorProto.FLOAT, TensorProto.UINT8


def model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def check(*args, shapes=None, **kwargs) -> list[str]:
    return check_tensorrt_parsable(model(*args, **kwargs), {} if shapes is None else shapes)


def one(problems: list[str], text: str) -> None:
    """Exactly one problem, and it says `text`."""
    assert len(problems) == 1 and text in problems[0], problems


# --- the graphs we ship ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["image", "local"])
def exported_tiny(tmp_path_factory, request):
    """Both input normalisations (model.UNetConfig.norm): the local one adds Pad, pooling and
    Resize nodes that the parser must accept too."""
    pytest.importorskip("torch")
    from tiny import write_tiny_checkpoint

    from retina_batch.export import export

    root = tmp_path_factory.mktemp("rules")
    checkpoint = write_tiny_checkpoint(root / "run", norm=request.param)
    export(checkpoint, root / "out", engine=False, parity_count=1, log=lambda *a: None)
    return root / "out"


def test_every_exported_graph_follows_the_parser_rules(exported_tiny):
    """fp32, fp16 and any other graph export writes (an int8 QDQ one when present), with the
    profile recorded in each card."""
    graphs = sorted(exported_tiny.glob("*.onnx"))
    assert {p.name for p in graphs} >= {"model.onnx", "model.fp16.onnx"}
    for path in graphs:
        assert check_tensorrt_parsable(path) == [], path.name


def test_the_shipped_default_models_follow_the_parser_rules():
    graphs = sorted(DEFAULT_MODELS.glob("*.onnx"))
    assert "model.onnx" in {p.name for p in graphs}
    for path in graphs:
        assert check_tensorrt_parsable(path) == [], path.name


def test_the_old_export_transposing_before_the_cast_is_rejected(tmp_path):
    """What the shipped graph looked like before: permute, then cast (every build failed)."""
    torch = pytest.importorskip("torch")
    from retina_batch.model import AttentionUNet, InferenceModel, UNetConfig, standardise

    class TransposeFirst(InferenceModel):
        def forward(self, images):
            x = images.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
            return torch.sigmoid(self.net(standardise(x)))[:, 0]

    path = tmp_path / "old.onnx"
    torch.onnx.export(TransposeFirst(AttentionUNet(UNetConfig(width=4))).eval(),
                      (torch.zeros(1, 64, 64, 3, dtype=torch.uint8),), str(path),
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_axes={"images": {0: "n", 1: "h", 2: "w"}}, dynamo=False,
                      opset_version=17)
    shapes = {"images": ((1, 64, 64, 3), (2, 64, 64, 3), (4, 128, 128, 3))}
    problems = check_tensorrt_parsable(path, shapes)
    assert any("uint8 input 'images' feeds Transpose" in p for p in problems), problems
    assert any("uint8 tensor" in p and "inside the graph" in p for p in problems), problems


# --- rule 1 and 2: uint8 -------------------------------------------------------------------
def test_uint8_input_must_feed_only_casts():
    cast = helper.make_node("Cast", ["x"], ["y"], to=F)
    assert check([cast], [tensor("x", U8, [1, 4])], [tensor("y", F, [1, 4])]) == []
    transpose = helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0])
    after = helper.make_node("Cast", ["t"], ["y"], to=F)
    problems = check([transpose, after], [tensor("x", U8, [1, 4])], [tensor("y", F, [4, 1])])
    assert "uint8 input 'x' feeds Transpose" in problems[0]
    assert any("uint8 tensor 't' inside the graph" in p for p in problems)


def test_no_uint8_tensor_inside_the_graph():
    down = helper.make_node("Cast", ["x"], ["q"], to=U8)
    up = helper.make_node("Cast", ["q"], ["y"], to=F)
    one(check([down, up], [tensor("x", F, [2])], [tensor("y", F, [2])]),
        "uint8 tensor 'q' inside the graph")
    # the same uint8 tensor as a graph output, made by a Cast, is what TensorRT allows
    assert check([down], [tensor("x", F, [2])], [tensor("q", U8, [2])]) == []


def test_uint8_output_must_come_from_a_cast():
    transpose = helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])
    problems = check([transpose], [tensor("x", U8, [1, 4])], [tensor("y", U8, [4, 1])])
    assert any("uint8 output 'y' comes from Transpose" in p for p in problems), problems


# --- rule 3: operators ---------------------------------------------------------------------
def test_operators_outside_the_support_matrix():
    det = helper.make_node("Det", ["x"], ["y"])
    one(check([det], [tensor("x", F, [3, 3])], [tensor("y", F, [])]),
        "operator Det is not in the ONNX-TensorRT support matrix")
    custom = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    proto = model([custom], [tensor("x", F, [3])], [tensor("y", F, [3])])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    one(check_tensorrt_parsable(proto, {}), "domain 'com.microsoft'")
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert check([relu], [tensor("x", F, [3])], [tensor("y", F, [3])]) == []


def test_operator_input_types_outside_the_support_matrix():
    sigmoid = helper.make_node("Sigmoid", ["x"], ["y"])
    one(check([sigmoid], [tensor("x", TensorProto.DOUBLE, [3])],
              [tensor("y", TensorProto.DOUBLE, [3])]), "Sigmoid on DOUBLE input")


def test_opset_outside_the_matrix_range():
    relu = helper.make_node("Relu", ["x"], ["y"])
    one(check([relu], [tensor("x", F, [3])], [tensor("y", F, [3])], opset=21),
        "opset 21 outside 9..20")


def test_axes_inputs_must_be_constant():
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    mean = helper.make_node("ReduceMean", ["x", "axes"], ["y"])
    x, y = tensor("x", F, [2, 3]), tensor("y", F, [2, 1])
    assert check([mean], [x], [y], [axes], opset=18) == []
    one(check([mean], [x, tensor("axes", TensorProto.INT64, [1])], [y], opset=18),
        "its `axes` input must be an initializer or a constant")


def test_quantization_must_be_symmetric_int8():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    x, y = tensor("x", F, [4]), tensor("y", F, [4])
    for dtype, zero, expected in ((np.int8, 0, 0), (np.uint8, 128, 4)):
        zp = numpy_helper.from_array(np.array(zero, dtype), "z")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        problems = check(nodes, [x], [y], [scale, zp], opset=13)
        assert len(problems) == expected, problems
        if expected:
            text = " ".join(problems)
            assert "zero point of 0" in text and "uint8 tensor 'q'" in text
            assert "DequantizeLinear on UINT8" in text


def test_max_pool_restrictions():
    x, y = tensor("x", F, [1, 1, 8, 8]), tensor("y", F, [1, 1, 4, 4])
    plain = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert check([plain], [x], [y]) == []
    dilated = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                               dilations=[2, 2])
    one(check([dilated], [x], [tensor("y", F, None)]), "only without dilation")
    indices = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2],
                               strides=[2, 2])
    one(check([indices], [x], [y, tensor("i", TensorProto.INT64, [1, 1, 4, 4])]),
        "no MaxPool Indices output")


# --- rule 4: the profile -------------------------------------------------------------------
@pytest.mark.parametrize("shapes, text", [
    ({"x": ((1, 64, 3), (2, 64, 3), (4, 128, 3))}, None),
    ({}, "has dynamic axes but no profile shapes"),
    ({"x": ((1, 64, 4), (2, 64, 4), (4, 128, 4))}, "axis 2 is fixed at 3"),
    ({"x": ((1, 64), (2, 64), (4, 128))}, "has rank 3"),
    ({"x": ((4, 64, 3), (2, 64, 3), (1, 128, 3))}, "not MIN <= OPT <= MAX"),
    ({"x": ((1, 64, 3),) * 3, "y": ((1,),) * 3}, "names 'y', which is not an input"),
])
def test_profile_must_cover_the_inputs(shapes, text):
    relu = helper.make_node("Relu", ["x"], ["y"])
    problems = check([relu], [tensor("x", F, ["n", "side", 3])], [tensor("y", F, None)],
                     shapes=shapes)
    if text is None:
        assert problems == []
    else:
        one(problems, text)


def test_a_fixed_size_graph_fails_a_profile_over_several_canvases():
    relu = helper.make_node("Relu", ["x"], ["y"])
    problems = check([relu], [tensor("x", F, ["n", 64, 64, 3])], [tensor("y", F, None)],
                     shapes={"x": ((1, 64, 64, 3), (2, 64, 64, 3), (4, 128, 128, 3))})
    assert [p.split(" is fixed")[0] for p in problems] == ["input 'x' axis 1", "input 'x' axis 2"]
    assert "fixed at 64 but the profile asks 64..128" in problems[0]


def test_export_refuses_a_graph_that_breaks_the_rules(tmp_path, monkeypatch):
    """Wired into export: a violation ends the export with exit 1 and the rule's words, after
    the ONNX files are written (for inspection)."""
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from tiny import write_tiny_checkpoint

    from retina_batch import graph_rules
    from retina_batch.cli import main

    monkeypatch.setattr(graph_rules, "check_tensorrt_parsable",
                        lambda path, shapes=None: ["uint8 input 'images' feeds Transpose"])
    checkpoint = write_tiny_checkpoint(tmp_path / "run")
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(tmp_path / "o"),
                                       "--no-engine", "--parity-count", "1"])
    assert result.exit_code == 1
    assert "breaks the ONNX-TensorRT parser's rules: uint8 input 'images' feeds Transpose" \
        in " ".join(result.stderr.split())
    assert (tmp_path / "o" / "model.onnx").is_file()
