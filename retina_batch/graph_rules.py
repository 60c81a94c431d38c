"""Will TensorRT's ONNX parser accept this graph? The rules we know, checked on the CPU.

TensorRT cannot be installed where the tests run, and a graph it rejects is found out only on
the GPU machine, at build time, after everything else worked. So every exported graph (fp32,
fp16, int8 QDQ) is checked here against the importer's known rules:

1. A uint8 graph input feeds only Cast nodes: "All UINT8 inputs must directly feed into a cast
   layer" (NVIDIA/TensorRT#3985); even a Transpose before the Cast fails the parse.
2. No uint8 tensor inside the graph (types from ONNX shape inference): the importer refuses
   any node output of type UINT8 that is not a graph output ("TensorRT does not support UINT8
   types for intermediate tensors!", onnx-tensorrt ModelImporter.cpp; operators.md: "UINT8 is
   only supported as network input or output tensor types"), and a uint8 graph output must
   come from a Cast or Identity (NVIDIA/TensorRT#4278). This also catches asymmetric uint8
   activations in a QDQ graph, which TensorRT's explicit quantization does not support.
3. Only operators of the importer's support matrix (tensorrt_onnx_ops: onnx-tensorrt
   docs/operators.md), for the data types listed there, in the default ONNX domain, within
   its opset range; plus the matrix's restrictions that a CPU can check: inputs that must be
   initializers (`axes` of Reduce*/Slice/Squeeze/Unsqueeze/Pad, `axis` of CumSum), Q/DQ zero
   points of zero, pooling without dilation, MaxPool without its Indices output.
4. The optimisation profile covers the graph: every input with a dynamic axis has profile
   shapes, ranks agree, and fixed axes have the profile's value at MIN, OPT and MAX (TensorRT
   rejects a profile that contradicts a fixed dimension).

`check_tensorrt_parsable(model_path_or_proto, shapes=None) -> list[str]` returns the
violations, empty when the graph passes. It cannot prove that a build succeeds (tactics, memory,
rules TensorRT does not document): it makes the failures we know about impossible to ship.
"""

from __future__ import annotations

from .shapes import DEFAULT_BATCH, Range, from_record, input_shapes, parse_batch
from .tensorrt_onnx_ops import OPSET_RANGE, SOURCE, SUPPORTED

# ONNX TensorProto element types -> the names used in the support matrix.
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL",
               10: "FP16", 11: "DOUBLE", 16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8",
               20: "FP8", 22: "INT4"}
_UINT8 = 2
# (operator, input index) that the support matrix says must be an initializer or constant.
_CONSTANT_INPUTS = {("Slice", 3): "axes", ("Squeeze", 1): "axes", ("Unsqueeze", 1): "axes",
                    ("Pad", 3): "axes", ("CumSum", 1): "axis",
                    **{(op, 1): "axes" for op in SUPPORTED if op.startswith("Reduce")}}
_ZERO_POINTS = {"QuantizeLinear": 2, "DequantizeLinear": 2}
_POOLS = ("MaxPool", "AveragePool", "LpPool")
DEFAULT_CANVAS = Range(512, 512, 1024)  # export's default for the shipped 512 px model


def check_tensorrt_parsable(model, shapes: dict | None = None) -> list[str]:
    """Violations of the ONNX-TensorRT parser rules above by `model` (a path or an
    onnx.ModelProto); [] when it follows them all.

    `shapes`: {input name: (min, opt, max) shapes} of the TensorRT profile. Default: the shapes
    recorded in the model's card (export section), else export's defaults (batch 1,4,16,
    canvas 512..1024) for a graph with one input."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = _tensor_types(graph)
    if shapes is None:
        shapes = default_shapes(graph, None if isinstance(model, onnx.ModelProto) else model)
    problems = (_uint8_rules(graph, types) + _operator_rules(proto, graph, types)
                + _restriction_rules(graph, types) + _profile_rules(graph, shapes))
    return list(dict.fromkeys(problems))  # one line per distinct problem, in graph order


def default_shapes(graph, path) -> dict:
    """The profile a graph's engine would be built with (see check_tensorrt_parsable)."""
    from .card import load_card

    inputs = _real_inputs(graph)
    batch, canvas = parse_batch(DEFAULT_BATCH), DEFAULT_CANVAS
    if path is not None:
        try:
            batch, canvas = from_record(load_card(path)["export"]["shapes"])
        except (OSError, KeyError, TypeError, ValueError):  # no card, or an older one
            pass
    return {inputs[0].name: input_shapes(batch, canvas)} if len(inputs) == 1 else {}


# --- helpers ---------------------------------------------------------------------------------
def _real_inputs(graph) -> list:
    initializers = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _tensor_types(graph) -> dict[str, int]:
    types = {i.name: i.data_type for i in graph.initializer}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _constants(graph) -> dict[str, object]:
    """Initializers and Constant-node outputs, as numpy arrays."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _type_name(types: dict, name: str) -> str:
    code = types.get(name)
    return _TYPE_NAMES.get(code, f"type {code}") if code else "unknown type"


def _describe(node) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


# --- the rules -------------------------------------------------------------------------------
def _uint8_rules(graph, types) -> list[str]:
    problems = []
    graph_outputs = {o.name for o in graph.output}
    for inp in _real_inputs(graph):
        if types.get(inp.name) != _UINT8:
            continue
        for node in graph.node:
            if inp.name in node.input and node.op_type != "Cast":
                problems.append(f"uint8 input '{inp.name}' feeds {_describe(node)}: TensorRT "
                                "accepts a uint8 input only into a Cast (cast it first)")
    for node in graph.node:
        for out in node.output:
            if out not in types:
                problems.append(f"type of '{out}' ({_describe(node)}) unknown after shape "
                                "inference: cannot check it")
            elif types[out] == _UINT8 and out not in graph_outputs:
                problems.append(f"uint8 tensor '{out}' inside the graph ({_describe(node)}): "
                                "TensorRT allows uint8 only for network inputs and outputs")
            elif types[out] == _UINT8 and node.op_type not in ("Cast", "Identity"):
                problems.append(f"uint8 output '{out}' comes from {_describe(node)}: TensorRT "
                                "needs a Cast (or Identity) to produce a uint8 output")
    return problems


def _operator_rules(proto, graph, types) -> list[str]:
    problems = []
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= opset.version \
                <= OPSET_RANGE[1]:
            problems.append(f"opset {opset.version} outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}, "
                            f"the range of the ONNX-TensorRT support matrix ({SOURCE})")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} of domain '{node.domain}': the ONNX-TensorRT "
                            "importer supports only the default ONNX domain (no plugins here)")
        elif node.op_type not in SUPPORTED:
            problems.append(f"operator {node.op_type} is not in the ONNX-TensorRT support "
                            f"matrix ({SOURCE})")
        elif node.input and node.input[0]:
            name = _type_name(types, node.input[0])
            if name not in SUPPORTED[node.op_type]:
                problems.append(f"{node.op_type} on {name} input: the ONNX-TensorRT support "
                                f"matrix lists only {', '.join(SUPPORTED[node.op_type])}")
    return problems


def _restriction_rules(graph, types) -> list[str]:
    problems = []
    constants = _constants(graph)
    for node in graph.node:
        for index, name in enumerate(node.input):
            what = _CONSTANT_INPUTS.get((node.op_type, index))
            if what and name and name not in constants:
                problems.append(f"{_describe(node)}: its `{what}` input must be an initializer "
                                "or a constant for TensorRT")
        zero_point = _ZERO_POINTS.get(node.op_type)
        if zero_point is not None and len(node.input) > zero_point and node.input[zero_point]:
            value = constants.get(node.input[zero_point])
            if value is None or value.any():
                problems.append(f"{_describe(node)}: TensorRT needs a zero point of 0 "
                                "(symmetric quantization)")
        if node.op_type in _POOLS:
            dilations = [a.ints for a in node.attribute if a.name == "dilations"]
            if dilations and any(d != 1 for d in dilations[0]):
                problems.append(f"{_describe(node)}: TensorRT pools only without dilation")
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(f"{_describe(node)}: TensorRT has no MaxPool Indices output")
    return problems


def _profile_rules(graph, shapes: dict) -> list[str]:
    problems = []
    inputs = {i.name: i for i in _real_inputs(graph)}
    for name in shapes:
        if name not in inputs:
            problems.append(f"the profile names '{name}', which is not an input of the graph")
    for name, inp in inputs.items():
        dims = list(inp.type.tensor_type.shape.dim)
        dynamic = [d for d in dims if not d.HasField("dim_value")]
        if name not in shapes:
            if dynamic:
                problems.append(f"input '{name}' has dynamic axes but no profile shapes: "
                                "TensorRT needs MIN/OPT/MAX for every dynamic input")
            continue
        profile = [tuple(s) for s in shapes[name]]
        if len(profile) != 3 or any(len(s) != len(dims) for s in profile):
            problems.append(f"input '{name}' has rank {len(dims)}; the profile gives {profile}")
            continue
        for axis, dim in enumerate(dims):
            low, opt, high = (s[axis] for s in profile)
            if not 1 <= low <= opt <= high:
                problems.append(f"input '{name}' axis {axis}: profile {low},{opt},{high} is "
                                "not MIN <= OPT <= MAX")
            elif dim.HasField("dim_value") and {low, opt, high} != {dim.dim_value}:
                problems.append(f"input '{name}' axis {axis} is fixed at {dim.dim_value} but "
                                f"the profile asks {low}..{high}: export it as a dynamic axis")
    return problems
