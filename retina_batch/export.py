"""Export a trained checkpoint for deployment (run after every retraining):

    model.onnx        fp32, for ONNX Runtime anywhere
    model.fp16.onnx   mixed precision, for GPUs (the source of TensorRT engines)
    engines/*.engine  TensorRT, when tensorrt and a CUDA GPU are present

Both graphs take uint8 N x H x W x 3 RGB (normalisation inside) and give float32 N x H x W
probabilities, with dynamic batch, height and width axes (the network is fully convolutional;
sides must be multiples of 2**depth). Each file gets a card (`X.onnx.json`, `X.engine.json`):
the checkpoint's card plus an `export` (or `tensorrt`) section with provenance, the accepted
shapes and parity figures measured here, on the CPU, at the working canvas and at the smallest,
middle and largest canvas of the profile. The graphs are checked against the ONNX-TensorRT
parser's rules (graph_rules) before anything is built from them.
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .backends.base import BackendUnavailable
from .card import load_card, sha256, write_json_atomic
from .metrics import Confusion, scores
from .shapes import DEFAULT_BATCH, Range, ShapeError, parse_batch, parse_canvas, profile_record

OPSET = 17
INPUT, OUTPUT = "images", "probabilities"
ENGINE_DIR = Path("engines")
# ONNX fp32 vs PyTorch. Summation order differs between the runtimes; through 20+ convolutions
# and a sigmoid that reaches ~1e-3 on a few pixels of a 512 px photograph (mean ~1e-5), while a
# broken export (wrong normalisation, a traced constant) is off by 0.1 or more.
FP32_MAX_DIFF = 1e-2
# The same check at the other canvases of the profile (one image resized to each), on the mean
# difference and the masks rather than the worst pixel: a 512 px photograph blown up to 1024 is
# far from anything the model was trained on, and there a few pixels' summation-order noise
# reaches 0.01-0.07 (two-camera models, 6 photographs each: r2 shipped before 0.006-0.035,
# the final run 0.010-0.069) while the mean stays at 1e-5 to 2e-4 and the masks agree to Dice
# >= 0.999. A dynamic axis that does not compute the same function is off everywhere: its
# mean difference is ~0.1 and its masks disagree.
FP32_CANVAS_MAX_MEAN_DIFF = 1e-3
FP32_CANVAS_MIN_DICE = 0.99
FP16_MIN_DICE = 0.99  # fp16 vs fp32 masks, worst image


class ExportError(ValueError):
    """A user mistake or a failed check; the message says what to do."""


class ParityError(ExportError):
    """An exported graph does not compute what the checkpoint computes."""


class EngineUnavailable(ExportError):
    """No engine could be built here (only raised with require_engine)."""


class GraphRuleError(ExportError):
    """An exported graph breaks a rule of the ONNX-TensorRT parser (graph_rules)."""


# --- graphs ----------------------------------------------------------------------------------
def fold_batchnorm(net):
    """A copy of `net` with every Conv2d -> BatchNorm2d pair fused into one Conv2d.

    Done in fp32 before casting to fp16: folding afterwards would round the weights twice, and
    small running variances make the folded scale large."""
    import torch
    from torch import nn

    net = copy.deepcopy(net).eval()
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return net


def mixed_precision_model(net):
    """InferenceModel with the convolutional body in fp16 and both ends in fp32.

    Why this rather than converting the fp32 ONNX (onnxconverter-common, not installed here):
    the casts come from the model code, so it is explicit which ops are fp32: the uint8 -> float
    scaling, the per-image mean/variance reductions over H x W (fp16 sums of 262k pixels lose
    precision) and the final sigmoid (fp32 output keeps thresholds near 0.5 exact). TensorRT 11
    builds strongly typed networks, so these graph types are exactly what runs on the GPU.
    """
    import torch
    from torch import nn

    from .model import normalise, unit_nchw

    class MixedPrecision(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = fold_batchnorm(net).half()

        def forward(self, images):
            x = normalise(unit_nchw(images), net.config)
            logits = self.net(x.half())
            return torch.sigmoid(logits.float())[:, 0]

    return MixedPrecision().eval()


# Batch, height and width are dynamic: one graph (and one engine) serves every canvas of the
# profile. Traced at a multiple of 2**depth, so the padding branch of the network is not in the
# graph: canvases must be multiples of 2**depth (shapes.parse_canvas enforces it).
DYNAMIC_AXES = {INPUT: {0: "batch", 1: "height", 2: "width"},
                OUTPUT: {0: "batch", 1: "height", 2: "width"}}


def export_onnx(module, path: Path, size: int) -> None:
    """torch.onnx.export (TorchScript exporter; the dynamo one was unreliable for this model),
    then the full ONNX checker (including shape inference)."""
    import warnings

    import onnx
    import torch

    with warnings.catch_warnings():  # tracer warnings about the padding branch
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
                          str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=DYNAMIC_AXES, dynamo=False, opset_version=OPSET,
                          do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_graph_rules(path: Path, batch: Range, canvas: Range) -> None:
    """Refuse to ship a graph the ONNX-TensorRT parser would reject (an exported graph is the
    source of every engine, and engines are built on machines where a failure costs most)."""
    from .graph_rules import check_tensorrt_parsable
    from .shapes import input_shapes

    problems = check_tensorrt_parsable(path, {INPUT: input_shapes(batch, canvas)})
    if problems:
        raise GraphRuleError(f"{path.name} breaks the ONNX-TensorRT parser's rules: "
                             + "; ".join(problems) + " (please report it)")


# --- parity ----------------------------------------------------------------------------------
def synthetic_fundus(size: int, seed: int) -> np.ndarray:
    """A synthetic photograph (retina_batch.synth) on the working canvas, prepared as the
    pipeline prepares real ones: for parity checks when no real photographs are at hand."""
    from .preprocess import prepare, to_rgb8
    from .synth import synthesize

    return prepare(to_rgb8(synthesize(size, size, seed)[0]), size)[0]


def _card_images(card: dict) -> list[Path]:
    """The validation photographs named in the checkpoint's card if they are on this disk, else
    its training ones (either card form: card.card_pairs)."""
    from .card import card_photographs

    return card_photographs(card, "val") or card_photographs(card, "train")


def spread(files: list, count: int) -> list:
    """`files` reordered so that the first `count` are evenly spaced over the whole list (every
    data folder of a multi-camera card is sampled; neighbours are often copies), then the rest
    in order as stand-ins for unreadable ones."""
    if len(files) <= count:
        return list(files)
    picked = dict.fromkeys(np.linspace(0, len(files) - 1, count).round().astype(int).tolist())
    return [files[i] for i in picked] + [f for i, f in enumerate(files) if i not in picked]


def prepare_photographs(files: list[Path], size: int, count: int) -> tuple[np.ndarray, list]:
    """Up to `count` photographs spread over `files`, prepared as segment prepares them:
    (uint8 canvases, the paths used). Unreadable files are skipped: this is a sample."""
    from .io import read_image
    from .preprocess import prepare, to_rgb8

    canvases, used = [], []
    for path in spread(files, count):
        try:
            canvases.append(prepare(to_rgb8(read_image(path)), size)[0])
        except ValueError:
            continue
        used.append(str(path))
        if len(canvases) == count:
            break
    return (np.stack(canvases) if canvases else np.zeros((0, size, size, 3), np.uint8)), used


def parity_images(size: int, card: dict, folder=None, count: int = 4):
    """(uint8 count x size x size x 3 canvases, description): real photographs prepared as the
    pipeline does (from `folder`, else the card's validation images), else synthetic ones."""
    from .io import list_images

    files = list_images(folder) if folder is not None else _card_images(card)
    canvases, used = prepare_photographs(files, size, count)
    if used:
        folders = sorted({str(Path(u).parent) for u in used})
        return canvases, f"{len(used)} photographs from {', '.join(folders)}"
    if folder is not None:
        raise ExportError(f"--parity-images {folder}: no readable images there")
    return (np.stack([synthetic_fundus(size, seed) for seed in range(count)]),
            f"{count} synthetic fundus-like images")


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # One image per call: peak memory stays small for the 512 px model.
    return np.concatenate([session.run([OUTPUT], {INPUT: images[i:i + 1]})[0]
                           for i in range(len(images))]).astype(np.float32)


def run_torch(module, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(images[i:i + 1])).float().numpy()
                               for i in range(len(images))])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return scores(Confusion.of(a, b))["dice"]


def compare(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> dict:
    """How far `candidate` probabilities are from `reference`, and how their masks agree."""
    ref, cand = reference >= threshold, candidate >= threshold
    per_image = [dice(r, c) for r, c in zip(ref, cand, strict=True)]
    diff = np.abs(reference.astype(np.float64) - candidate)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mask_dice": round(dice(ref, cand), 6), "mask_dice_min": round(min(per_image), 6),
            "mask_agreement": round(float((ref == cand).mean()), 6), "threshold": threshold}


def maybe_simplify(path: Path, images: np.ndarray) -> str:
    """Replace `path` by its onnxslim-simplified graph only if ONNX Runtime measurably runs it
    faster (>= 5 %) with the same output; ORT already fuses most of what simplifiers do."""
    import importlib.util

    if importlib.util.find_spec("onnxslim") is None:
        return "skipped: onnxslim not installed"
    import onnxslim

    slim = path.with_name(path.stem + ".slim.onnx")
    onnxslim.slim(str(path), str(slim))

    def timed(p):
        run_onnx(p, images[:1])  # warm-up
        start = time.perf_counter()
        return run_onnx(p, images), time.perf_counter() - start

    (before, t0), (after, t1) = timed(path), timed(slim)
    if t1 < 0.95 * t0 and np.abs(before - after).max() < 1e-5:
        slim.replace(path)
        return f"onnxslim: {t0:.3f}s -> {t1:.3f}s"
    slim.unlink()
    return f"onnxslim did not help ({t0:.3f}s -> {t1:.3f}s): kept the exported graph"


# --- parity across canvases ------------------------------------------------------------------
def canvas_sides(canvas: Range, multiple: int) -> list[int]:
    """The smallest, a middle and the largest canvas of the profile, besides the working one
    (which every parity image checks)."""
    middle = max(canvas.min, (canvas.min + canvas.max) // 2 // multiple * multiple)
    return sorted({canvas.min, middle, canvas.max} - {canvas.opt})


def parity_across_canvases(reference, candidate, image: np.ndarray, sides, threshold) -> dict:
    """compare() of two runtimes on `image` resized to each side: the dynamic height and width
    axes compute the same function at every canvas of the profile, not only the traced one."""
    import cv2

    figures = {}
    for side in sides:
        x = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)[None]
        figures[str(side)] = compare(reference(x), candidate(x), threshold)
    return figures


def _worst(parity: dict, key: str, pick) -> float:
    return pick([parity[key]] + [c[key] for c in parity.get("canvases", {}).values()])


# --- cards -----------------------------------------------------------------------------------
def export_card(source: dict, path: Path, canvas: Range, multiple: int, section: dict) -> dict:
    card = {**copy.deepcopy(source), "weights": path.name, "sha256": sha256(path),
            "working_size": canvas.opt,
            "input": f"uint8 N x H x W x 3 RGB ({INPUT}); H = W = {canvas.min}..{canvas.max}, "
                     f"a multiple of {multiple}; working canvas {canvas.opt}",
            "output": f"float32 N x H x W vessel probability ({OUTPUT})"}
    card.pop("tensorrt", None)
    card["export"] = {**section, "onnx_sha256": card["sha256"]}
    write_json_atomic(path.with_name(path.name + ".json"), card)
    return card


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


# --- the whole export ------------------------------------------------------------------------
def _shapes(batch, size, card: dict) -> tuple[Range, Range, int]:
    multiple = 2 ** int(card.get("model", {}).get("depth", 4))
    try:
        batch = batch if isinstance(batch, Range) else parse_batch(batch)
        canvas = size if isinstance(size, Range) else parse_canvas(
            size, int(card.get("working_size", 512)), multiple)
    except ShapeError as e:
        raise ExportError(str(e)) from e
    return batch, canvas, multiple


def _source(checkpoint: Path) -> tuple[dict, object]:
    from .backends.torch import load_network

    if not checkpoint.is_file():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    try:
        return load_card(checkpoint), load_network(checkpoint)
    except (FileNotFoundError, BackendUnavailable) as e:
        raise ExportError(str(e)) from e


def export(checkpoint, out, *, batch: str | Range = DEFAULT_BATCH, size=None,
           engine_dir=ENGINE_DIR, engine: bool = True, require_engine: bool = False,
           workspace_mib: int | None = None, timing_cache=None, parity_folder=None,
           parity_count: int = 4, int8: bool | None = None, calibration=None,
           log=print) -> dict:
    """Export `checkpoint` (with its model.json card) to `out`; returns a summary dict.

    `batch` and `size` are the TensorRT profile's MIN,OPT,MAX batch and canvas (shapes.py;
    size None: the card's working size up to twice it). Raises ExportError for user mistakes,
    and its subclasses ParityError / GraphRuleError for failed checks, EngineBuildError when
    TensorRT cannot build the engine, EngineUnavailable when `require_engine` and no engine
    could be built (in these four cases the ONNX files are written first).
    int8: None = model.int8.onnx when calibration photographs are at hand (`calibration`, a
    folder, else the card's training data), True = required, False = not (quantize.py)."""
    from .model import InferenceModel

    checkpoint, out = Path(checkpoint), Path(out)
    source_card, net = _source(checkpoint)
    batch, canvas, multiple = _shapes(batch, size, source_card)
    size, threshold = canvas.opt, float(source_card.get("threshold", 0.5))
    out.mkdir(parents=True, exist_ok=True)
    images, described = parity_images(size, source_card, parity_folder, parity_count)
    sides = canvas_sides(canvas, multiple)
    provenance = {"source": {"checkpoint": str(checkpoint), "sha256": sha256(checkpoint)},
                  "opset": OPSET, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions(), "shapes": profile_record(batch, canvas)}

    log(f"exporting {checkpoint} for canvases {canvas.min}..{canvas.max} (working {size}); "
        f"parity on {described}, and at {', '.join(map(str, sides)) or 'no other'} px")
    module = InferenceModel(net).eval()
    fp32_path = out / "model.onnx"
    export_onnx(module, fp32_path, size)
    simplified = maybe_simplify(fp32_path, images)
    fp32 = run_onnx(fp32_path, images)
    parity32 = {"reference": "PyTorch fp32 (CPU)", "runtime": "onnxruntime CPU",
                "images": described, **compare(run_torch(module, images), fp32, threshold),
                "canvases": parity_across_canvases(lambda x: run_torch(module, x),
                                                   lambda x: run_onnx(fp32_path, x),
                                                   images[0], sides, threshold)}
    fp32_card = export_card(source_card, fp32_path, canvas, multiple,
                            {**provenance, "precision": "fp32", "simplified": simplified,
                             "parity": parity32})

    fp16_path = out / "model.fp16.onnx"
    export_onnx(mixed_precision_model(net), fp16_path, size)
    parity16 = {"reference": "model.onnx (fp32)", "runtime": "onnxruntime CPU",
                "images": described, "min_dice": FP16_MIN_DICE,
                **compare(fp32, run_onnx(fp16_path, images), threshold),
                "canvases": parity_across_canvases(lambda x: run_onnx(fp32_path, x),
                                                   lambda x: run_onnx(fp16_path, x),
                                                   images[0], sides, threshold)}
    fp16_card = export_card(source_card, fp16_path, canvas, multiple, {
        **provenance, "precision": "fp16 (mixed: uint8 input, fp32 scaling, standardisation "
        "and sigmoid; BatchNorm folded in fp32)", "parity": parity16})

    summary = {"onnx": str(fp32_path), "onnx_fp16": str(fp16_path), "size": size,
               "canvas": canvas.as_dict(), "profile": batch.as_dict(),
               "parity_fp32": parity32, "parity_fp16": parity16,
               "engine": None, "engine_skipped": None}
    _check_parity(parity32, parity16, fp16_path)
    for path in (fp32_path, fp16_path):
        check_graph_rules(path, batch, canvas)
    if engine:
        summary.update(_engine_step(checkpoint, out, fp16_path, fp16_card, batch, canvas,
                                    Path(engine_dir), workspace_mib, timing_cache, log))
    else:
        summary["engine_skipped"] = "no TensorRT engine built: --no-engine"
    if int8 is not False:  # after the fp16 engine: a failed int8 gate (exit 1) keeps it
        from .quantize import int8_engine_step, int8_step

        summary.update(int8_step(fp32_path, fp32_card, images, described, calibration,
                                 required=bool(int8), log=log))
        if engine and summary["onnx_int8"]:
            summary.update(int8_engine_step(checkpoint, out, Path(summary["onnx_int8"]),
                                            summary["int8_card"], batch, canvas,
                                            Path(engine_dir), workspace_mib, timing_cache,
                                            log))
    if require_engine and summary["engine"] is None:
        raise EngineUnavailable(summary["engine_skipped"])
    summary["fp32_card"], summary["fp16_card"] = fp32_card, fp16_card
    return summary


def _check_parity(parity32: dict, parity16: dict, fp16_path: Path) -> None:
    if parity32["max_abs_diff"] > FP32_MAX_DIFF:
        raise ParityError(f"ONNX fp32 differs from PyTorch by {parity32['max_abs_diff']:.2g} "
                          f"(> {FP32_MAX_DIFF:g}) at the working canvas: the export is broken, "
                          f"please report it")
    for side, c in parity32.get("canvases", {}).items():
        if c["mean_abs_diff"] > FP32_CANVAS_MAX_MEAN_DIFF or \
                c["mask_dice_min"] < FP32_CANVAS_MIN_DICE:
            raise ParityError(
                f"ONNX fp32 differs from PyTorch at the {side} px canvas (mean difference "
                f"{c['mean_abs_diff']:.2g}, mask Dice {c['mask_dice_min']:.4f}): its dynamic "
                f"height and width do not compute the same function; please report it")
    worst_dice = _worst(parity16, "mask_dice_min", min)
    if worst_dice < FP16_MIN_DICE:
        raise ParityError(f"fp16 masks agree with fp32 only to Dice {worst_dice:.4f} "
                          f"(< {FP16_MIN_DICE}): do not deploy {fp16_path}; use model.onnx")


def _engine_step(checkpoint, out, fp16_path, fp16_card, batch: Range, canvas: Range,
                 engine_dir: Path, workspace_mib, timing_cache, log) -> dict:
    from .backends.tensorrt import running_platform
    from .engine_build import build_engine, engine_names

    try:
        platform = running_platform()
    except BackendUnavailable as e:
        return {"engine": None, "engine_skipped": f"no TensorRT engine built: {e}"}
    engine_path, default_cache = engine_names(checkpoint, platform, engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    log(f"building TensorRT engine for {platform['gpu']} (batch {batch.min}..{batch.max}, "
        f"canvas {canvas.min}..{canvas.max}, tuned for {batch.opt} x {canvas.opt}); this takes "
        "minutes the first time")
    rebuild = (f"retina-batch export {checkpoint} --out {out} --batch "
               f"{batch.min},{batch.opt},{batch.max} --size "
               f"{canvas.min},{canvas.opt},{canvas.max}"
               + ("" if engine_dir == ENGINE_DIR else f" --engine-dir {engine_dir}"))
    sidecar = build_engine(fp16_path, engine_path, batch, canvas, copy.deepcopy(fp16_card),
                           rebuild, workspace_mib=workspace_mib,
                           timing_cache=Path(timing_cache) if timing_cache else default_cache,
                           log=log)
    return {"engine": str(engine_path), "engine_card": sidecar}
