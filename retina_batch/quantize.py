"""int8 for CPUs (and TensorRT): static quantisation of an exported fp32 graph, in QDQ format.

    model.onnx  --(calibrate on training photographs, insert QuantizeLinear/DequantizeLinear)-->
    model.int8.onnx + card (the fp32 card with an `export.int8` section: settings, calibration
    images, parity against fp32)

Why ONNX Runtime's static quantiser in QDQ form: QDQ is plain ONNX (QuantizeLinear /
DequantizeLinear around the float ops), so the same file runs on ONNX Runtime's CPU kernels
(which fuse DQ -> Conv -> Q into integer convolutions) and is TensorRT's explicit-quantisation
input. That second use fixes the number format: TensorRT takes only signed int8 Q/DQ with zero
point 0 and float biases, so activations and weights are symmetric int8 and biases stay float
(export checks the graph against retina_batch.graph_rules before writing it). The other
settings (calibration method, operators, per-channel weights, which convolutions stay float)
were chosen by measurement: benchmarks/int8_sweep.py, benchmarks/README.md.

Calibration images are prepared exactly as `segment` prepares photographs (preprocess.prepare:
field-of-view crop, letterbox onto the working canvas, uint8 RGB): normalisation is inside the
graph, so the ranges are those the network sees in use.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backends.base import BackendUnavailable
from .card import INT8_MIN_DICE, sha256, write_json_atomic
from .export import INPUT, ExportError, ParityError, compare, prepare_photographs, run_onnx

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")
# ConvTranspose stays float: ONNX Runtime's CPU provider has no int8 kernel for it, so its
# Q/DQ pair only adds a quantise and a dequantise pass over each upsampled tensor. Measured on
# the shipped model in one run (benchmarks/README.md#int8): without it int8 is 1.59x fp32
# instead of 1.49x (CPU time 1.67x instead of 1.60x), with the same or better mask parity.
DEFAULT_OPS = ("Conv", "MaxPool")


@dataclass(frozen=True)
class Settings:
    """How to quantise; the defaults are the measured choice (benchmarks/README.md)."""

    method: str = "entropy"  # minmax | entropy | percentile: how activation ranges are chosen
    ops: tuple[str, ...] = DEFAULT_OPS  # operator types that get Q/DQ (inside the U-Net only)
    per_channel: bool = True  # one weight scale per output channel
    # int8: symmetric, zero point 0, what TensorRT takes; uint8 (asymmetric) only for sweeps:
    # its graph breaks TensorRT's parser rules, so export refuses to write it
    activations: str = "int8"
    float_first: int = 3  # the first convolutions stay float (they see the finest detail)
    float_last: int = 1  # so do the last ones (the logits that are thresholded)
    # The attention gates stay float: their coefficients scale every skip connection, and in
    # symmetric int8 they cost the masks most (benchmarks/README.md#int8); they are 1x1
    # convolutions, a small share of the work.
    float_gates: bool = True
    calibration_images: int = 16
    percentile: float = 99.999  # percentile method only

    def __post_init__(self):
        if self.method not in METHODS:
            raise ExportError(f"quantisation method {self.method!r}: choose from "
                              f"{', '.join(METHODS)}")
        if self.activations not in ACTIVATIONS:
            raise ExportError(f"activations {self.activations!r}: choose int8 or uint8")

    def describe(self) -> dict:
        return {**asdict(self), "ops": list(self.ops), "format": "QDQ", "weights": "int8",
                "weights_symmetric": True,
                "activations_symmetric": self.activations == "int8"}


@dataclass
class Calibration:
    """Prepared uint8 canvases and where they came from (for the card)."""

    images: np.ndarray  # N x size x size x 3
    files: list[str] = field(default_factory=list)
    source: str = ""


# --- calibration data ------------------------------------------------------------------------
def calibration_set(card: dict, size: int, folder=None, count: int = 16) -> Calibration | None:
    """Calibration canvases from `folder`, else from the card's training photographs; None
    when neither is at hand (no int8 model can be made then)."""
    from .card import card_photographs
    from .io import list_images

    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ExportError(f"--calibration {folder}: not a folder")
        files = list_images(folder)
    else:
        files = card_photographs(card, "train")
    images, used = prepare_photographs(files, size, count)
    if not used:
        if folder is not None:
            raise ExportError(f"--calibration {folder}: no readable images there")
        return None
    source = str(folder) if folder is not None else "the card's training photographs"
    return Calibration(images, used, source)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared canvases, one per call;
    set_range lets the quantiser calibrate in slices (histograms of a 512 px U-Net's
    activations are ~1 GB per image)."""

    def __init__(self, images: np.ndarray):
        self.images, self.start, self.end, self.i = images, 0, len(images), 0

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = start_index, end_index, start_index

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return {INPUT: self.images[self.i - 1:self.i]}


# --- the graph ---------------------------------------------------------------------------------
CONVOLUTIONS = ("Conv", "ConvTranspose")


def float_convolutions(model, settings: Settings) -> set[str]:
    """The first `float_first` and last `float_last` convolutions, in the exported graph's
    order (the order of the forward pass), which stay float.

    The first ones see the full-resolution image, where a thin vessel is a few quantisation
    steps of contrast; the last one makes the logits that are thresholded. Together they are
    ~9 % of the network's multiply-adds (benchmarks/README.md measures the trade-off)."""
    convs = [n.name for n in model.graph.node if n.op_type in CONVOLUTIONS]
    if len(convs) <= settings.float_first + settings.float_last:
        raise ExportError(f"the graph has {len(convs)} convolutions: none left to quantise")
    return set(convs[:settings.float_first] + convs[len(convs) - settings.float_last:])


def attention_gates(model) -> set[str]:
    """Names of the attention gates' nodes, found by structure: a Sigmoid whose output scales
    a tensor (Mul) is a gate's; with it go its 1x1 convolution (psi), the Relu, the Add and the
    two convolutions that feed the Add (W_x on the skip, W_g on the gating signal)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    muls = {i for n in model.graph.node if n.op_type == "Mul" for i in n.input}
    gates = set()
    for sigmoid in (n for n in model.graph.node if n.op_type == "Sigmoid"):
        if sigmoid.output[0] not in muls:
            continue  # the network's output
        chain = [producers.get(sigmoid.input[0])]  # psi
        while chain[-1] is not None and chain[-1].op_type in ("Conv", "Relu"):
            chain.append(producers.get(chain[-1].input[0]))
        if chain[-1] is not None and chain[-1].op_type == "Add":
            chain += [producers.get(i) for i in chain[-1].input]
        gates |= {n.name for n in chain if n is not None and n.op_type != "Sigmoid"}
    return gates


def nodes_to_quantize(model, keep_float: set[str]) -> list[str]:
    """Names of the nodes that may get Q/DQ: the U-Net from its first to its last
    convolution, less `keep_float`. The input scaling and per-image standardisation before
    it and the final sigmoid after it stay float: quantising them costs accuracy and buys no
    time. Found by graph structure, not by node names, so it holds for any exporter."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type in CONVOLUTIONS]
    for i, node in enumerate(nodes):
        if not node.name:  # the quantiser addresses nodes by name
            node.name = f"{node.op_type}_{i}"
    return [n.name for n in nodes[convs[0]:convs[-1] + 1] if n.name not in keep_float]


def quantize_graph(fp32_path: Path, out_path: Path, images: np.ndarray,
                   settings: Settings = Settings(), cache: Path | None = None) -> None:
    """Write the QDQ model of `fp32_path` to `out_path`, calibrated on `images`.

    `cache` (a JSON file of tensor ranges, read if present, else written) lets a sweep
    calibrate once per method and try every other setting on the same ranges."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    symmetric = settings.activations == "int8"
    extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True,
             # Biases stay float: an int32 bias needs a DequantizeLinear on INT32, which
             # TensorRT's parser does not take (graph_rules); ONNX Runtime's int8 convolution
             # adds a float bias after it at no measurable cost.
             "QuantizeBias": False,
             # one image per calibration pass: histogram methods hold every activation
             "CalibStridedMinMax": 1, "CalibPercentile": settings.percentile}
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()
    cache = Path(cache).resolve() if cache is not None else None
    # The quantiser's helpers write scratch files into the current directory (ONNX Runtime's
    # symbolic shape inference leaves sym_shape_infer_temp.onnx and <uuid>.data behind when it
    # gives up): run it from a temporary directory, so nothing lands where the user works.
    with tempfile.TemporaryDirectory(prefix="retina-int8-") as tmp, contextlib.chdir(tmp):
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX Runtime's recommended preparation: its basic graph optimisations (constant
        # folding, Identity removal: the quantiser needs every conv bias as an initializer)
        # and ONNX shape inference (the quantiser skips tensors of unknown type). Not the
        # symbolic one: it fails on graphs with a dynamic height and width, and a CNN needs
        # only the types. The result is plain ONNX; unused opset imports are dropped.
        quant_pre_process(str(fp32_path), str(prepared), skip_optimization=False,
                          skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
        kept = [o for o in model.opset_import if o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(kept)
        keep_float = float_convolutions(onnx.load(str(fp32_path)), settings)
        nodes = nodes_to_quantize(model, keep_float)  # names every node
        if settings.float_gates:
            nodes = [n for n in nodes if n not in attention_gates(model)]
        onnx.save(model, str(prepared))
        with _quiet():
            quantize_static(
                str(prepared), str(out_path), _Reader(images), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.ops), per_channel=settings.per_channel,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=method,
                extra_options=extra, calibration_cache_path=cache)


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantiser prints progress to stdout (which `export --json` owns) and
    logs warnings on the root logger; what matters is in the card."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


# --- the export step --------------------------------------------------------------------------
def int8_card(fp32_card: dict, int8_path: Path, section: dict) -> dict:
    """The fp32 card with the int8 file's name and hash, and an `export.int8` section."""
    card = copy.deepcopy(fp32_card)
    card["weights"], card["sha256"] = int8_path.name, sha256(int8_path)
    card["export"] = {**card.get("export", {}), "precision": "int8 (QDQ)",
                      "onnx_sha256": card["sha256"], "parity": section["parity"],
                      "int8": section}
    card["export"].pop("simplified", None)
    write_json_atomic(int8_path.with_name(int8_path.name + ".json"), card)
    return card


def graph_rule_problems(path: Path, fp32_card: dict) -> list[str]:
    """TensorRT parser rule violations (graph_rules) of an int8 graph, checked against the
    profile recorded in the fp32 card it was made from (export's defaults if none)."""
    from .graph_rules import check_tensorrt_parsable
    from .shapes import DEFAULT_BATCH, Range, from_record, input_shapes, parse_batch

    try:
        batch, canvas = from_record(fp32_card["export"]["shapes"])
    except (KeyError, TypeError):  # a card from before dynamic shapes: its working canvas
        side = int(fp32_card.get("working_size", 512))
        batch, canvas = parse_batch(DEFAULT_BATCH), Range(side, side, side)
    return check_tensorrt_parsable(path, {INPUT: input_shapes(batch, canvas)})


def export_int8(fp32_path: Path, fp32_card: dict, parity_images: np.ndarray, described: str,
                calibration: Calibration, settings: Settings = Settings(), log=print) -> dict:
    """Quantise `fp32_path` into model.int8.onnx beside it, check it against fp32 on the
    parity images and against TensorRT's parser rules, and write its card. Returns
    {"onnx_int8", "parity_int8", "int8_card"}.

    Raises ParityError when the masks agree with fp32 below INT8_MIN_DICE on any parity image,
    GraphRuleError when the graph breaks a parser rule (asymmetric uint8 activations do); in
    both cases no int8 file is left (`segment --precision auto` would pick it up)."""
    from .export import GraphRuleError

    fp32_path = Path(fp32_path)
    out = fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    threshold = float(fp32_card.get("threshold", 0.5))
    log(f"quantising to int8 (calibration: {len(calibration.files)} images from "
        f"{calibration.source}; {settings.method}, {'+'.join(settings.ops)}, "
        f"{settings.activations} activations)")
    try:
        quantize_graph(fp32_path, tmp, calibration.images, settings)
        problems = graph_rule_problems(tmp, fp32_card)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise GraphRuleError(f"the int8 graph breaks the ONNX-TensorRT parser's rules: "
                                 f"{'; '.join(problems[:3])}{more}; no {out.name} written")
        parity = {"reference": f"{fp32_path.name} (fp32)", "runtime": "onnxruntime CPU",
                  "images": described, "min_dice": INT8_MIN_DICE,
                  **compare(run_onnx(fp32_path, parity_images), run_onnx(tmp, parity_images),
                            threshold)}
        if parity["mask_dice_min"] < INT8_MIN_DICE:
            raise ParityError(f"int8 masks agree with fp32 only to Dice "
                              f"{parity['mask_dice_min']:.4f} (< {INT8_MIN_DICE}): no "
                              f"{out.name} written; calibrate on other photographs "
                              "(--calibration DIR) or use model.onnx")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    section = {"settings": settings.describe(),
               "source": {"onnx": fp32_path.name, "sha256": sha256(fp32_path)},
               "calibration": {"source": calibration.source, "images": calibration.files},
               "parity": parity, "tensorrt_parser_rules": "passed (retina_batch.graph_rules)"}
    return {"onnx_int8": str(out), "parity_int8": parity,
            "int8_card": int8_card(fp32_card, out, section)}


def int8_step(fp32_path: Path, fp32_card: dict, parity_images: np.ndarray, described: str,
              folder=None, required: bool = False, settings: Settings = Settings(),
              log=print) -> dict:
    """export's int8 step: model.int8.onnx when calibration photographs are at hand (the
    --calibration folder, else the card's training photographs); otherwise one line that
    says why not (an ExportError when `required`, i.e. --int8)."""
    calibration = calibration_set(fp32_card, int(fp32_card["working_size"]), folder,
                                  settings.calibration_images)
    if calibration is None:
        why = ("no int8 model: no calibration photographs (the card's training data "
               f"{fp32_card.get('training', {}).get('data')!r} is not on this disk; "
               "give --calibration DIR)")
        if required:
            raise ExportError(why)
        return {"onnx_int8": None, "int8_skipped": why}
    return {**export_int8(fp32_path, fp32_card, parity_images, described, calibration,
                          settings, log), "int8_skipped": None}


# --- TensorRT ----------------------------------------------------------------------------------
def int8_engine_step(checkpoint: Path, out: Path, int8_path: Path, int8_card: dict, batch,
                     canvas, engine_dir: Path, workspace_mib, timing_cache, log=print) -> dict:
    """An INT8 TensorRT engine, <run>.<gpu>.sm<XY>.trt<version>.int8.engine + sidecar, built
    from model.int8.onnx itself where TensorRT and a GPU are present. UNTESTED on a GPU: no
    TensorRT on the machines this was written on (tests fake it).

    The same file serves both runtimes because its Q/DQ are what TensorRT's explicit
    quantisation takes (signed int8, zero point 0: export_int8 checks the parser rules).
    TensorRT 11 has no INT8 builder flag: the network is strongly typed and the Q/DQ nodes
    decide where int8 runs; the rest of the graph is fp32."""
    from .backends.tensorrt import running_platform
    from .engine_build import build_engine, engine_names

    try:
        platform = running_platform()
    except BackendUnavailable as e:
        return {"int8_engine": None, "int8_engine_skipped": f"no INT8 TensorRT engine: {e}"}
    engine, default_cache = engine_names(checkpoint, platform, Path(engine_dir))
    engine = engine.with_name(engine.name.removesuffix(".engine") + ".int8.engine")
    engine.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the INT8 TensorRT engine for {platform['gpu']}")
    rebuild = (f"retina-batch export {checkpoint} --out {out} --int8 --batch "
               f"{batch.min},{batch.opt},{batch.max} --size "
               f"{canvas.min},{canvas.opt},{canvas.max}")
    try:
        build_engine(Path(int8_path), engine, batch, canvas, copy.deepcopy(int8_card), rebuild,
                     workspace_mib=workspace_mib,
                     timing_cache=Path(timing_cache) if timing_cache else default_cache,
                     log=log)
    except ExportError as e:  # a failed parse or build: the other files and engine stand
        return {"int8_engine": None, "int8_engine_skipped": f"no INT8 TensorRT engine: {e}"}
    return {"int8_engine": str(engine), "int8_engine_skipped": None}
