"""A model whose answer is known in advance: the vessel probability is one colour channel of the
canvas (red by default) divided by 255.

Written as a plain ONNX graph (no PyTorch), with a card, so tests run it through the real
`segment` path (card, ONNX Runtime backend, pipeline) and still know every output pixel: the
mask is where the photograph's red channel is >= threshold x 255, inside its field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retina_batch.card import sha256, write_json_atomic


def write_channel_onnx(folder: Path, size: int = 64, threshold: float = 0.5,
                       channel: int = 0, bias: float = 0.0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(values, np.int64), name)

    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["f", "start", "stop", "axis"], ["one"]),
        helper.make_node("Squeeze", ["one", "axis"], ["plane"]),
        helper.make_node("Mul", ["plane", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["probabilities"]),
    ]
    inits = [const("start", [channel]), const("stop", [channel + 1]), const("axis", [3]),
             numpy_helper.from_array(np.asarray(1 / 255, np.float32), "scale"),
             numpy_helper.from_array(np.asarray(bias, np.float32), "bias")]
    graph = helper.make_graph(
        nodes, "channel", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                         ["n", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", size, size])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime the project supports
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    write_json_atomic(folder / "model.onnx.json", {
        "card_version": 1, "name": "channel", "architecture": "test: colour channel / 255",
        "working_size": size, "threshold": threshold, "weights": path.name,
        "sha256": sha256(path)})
    return path
