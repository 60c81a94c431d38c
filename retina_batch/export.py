"""Export a trained checkpoint for deployment (run after every retraining):

    model.onnx        fp32, for ONNX Runtime anywhere
    model.fp16.onnx   mixed precision, for GPUs (the source of TensorRT engines)
    engines/*.engine  TensorRT, when tensorrt and a CUDA GPU are present

Both graphs take uint8 N x H x W x 3 RGB (normalisation inside) and give float32 N x H x W
probabilities, with a dynamic batch axis and the spatial size fixed at the working size. Each
file gets a card (`X.onnx.json`, `X.engine.json`): the checkpoint's card plus an `export` (or
`tensorrt`) section with provenance and parity figures measured here, on the CPU.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .backends.base import BackendUnavailable
from .card import load_card, sha256, write_json_atomic
from .metrics import Confusion, scores

OPSET = 17
INPUT, OUTPUT = "images", "probabilities"
DEFAULT_PROFILE = "1,4,16"
ENGINE_DIR = Path("engines")
# ONNX fp32 vs PyTorch. Summation order differs between the runtimes; through 20+ convolutions
# and a sigmoid that reaches ~1e-3 on a few pixels of a 512 px photograph (mean ~1e-5), while a
# broken export (wrong normalisation, a traced constant) is off by 0.1 or more.
FP32_MAX_DIFF = 1e-2
FP16_MIN_DICE = 0.99  # fp16 vs fp32 masks, worst image


class ExportError(ValueError):
    """A user mistake or a failed check; the message says what to do."""


class ParityError(ExportError):
    """An exported graph does not compute what the checkpoint computes."""


class EngineUnavailable(ExportError):
    """No engine could be built here (only raised with require_engine)."""


# --- options ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """TensorRT optimisation profile: the batch sizes an engine accepts (min..max) and the one
    it is tuned for (opt)."""

    min: int
    opt: int
    max: int

    def shapes(self, size: int) -> list[tuple[int, int, int, int]]:
        return [(n, size, size, 3) for n in (self.min, self.opt, self.max)]


def parse_profile(text: str) -> Profile:
    """'min,opt,max' (e.g. '1,4,16'), or one N meaning '1,N,N'."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (1, 3):
        raise ExportError(f"--batch {text!r}: expected MIN,OPT,MAX such as 1,4,16 (or one N)")
    values = [int(p) for p in parts]
    profile = Profile(1, values[0], values[0]) if len(values) == 1 else Profile(*values)
    if not 1 <= profile.min <= profile.opt <= profile.max:
        raise ExportError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
    return profile


def parse_size(text, default: int) -> int:
    """'512', '512x512' or None (the card's working size). Square only: the pipeline letterboxes
    every photograph onto a square canvas."""
    if text is None or text == "":
        return int(default)
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not match:
        raise ExportError(f"--size {text!r}: expected HxW such as 512x512")
    h, w = int(match[1]), int(match[2] or match[1])
    if h != w:
        raise ExportError(f"--size {text}: the working canvas is square (the pipeline "
                          "letterboxes onto it); use e.g. 512x512")
    if not 32 <= h <= 4096:
        raise ExportError(f"--size {text}: choose a side between 32 and 4096")
    return h


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

    from .model import standardise

    class MixedPrecision(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = fold_batchnorm(net).half()

        def forward(self, images):
            x = standardise(images.permute(0, 3, 1, 2).float() * (1.0 / 255.0))
            logits = self.net(x.half())
            return torch.sigmoid(logits.float())[:, 0]

    return MixedPrecision().eval()


def export_onnx(module, path: Path, size: int) -> None:
    """torch.onnx.export (TorchScript exporter; the dynamo one was unreliable for this model),
    then the full ONNX checker (including shape inference)."""
    import warnings

    import onnx
    import torch

    with warnings.catch_warnings():  # tracer warnings about the fixed-size padding branch
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
                          str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          dynamo=False, opset_version=OPSET, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


# --- parity ----------------------------------------------------------------------------------
def synthetic_fundus(size: int, seed: int) -> np.ndarray:
    """A synthetic photograph (retina_batch.synth) on the working canvas, prepared as the
    pipeline prepares real ones: for parity checks when no real photographs are at hand."""
    from .preprocess import prepare, to_rgb8
    from .synth import synthesize

    return prepare(to_rgb8(synthesize(size, size, seed)[0]), size)[0]


def _card_images(card: dict) -> list[Path]:
    """The validation photographs named in the checkpoint's card, if they are on this disk."""
    from .io import list_images, pair_key

    data = Path(str(card.get("training", {}).get("data", "")) or "/nonexistent")
    folder = next((data / d for d in ("image", "images") if (data / d).is_dir()), None)
    if folder is None:
        return []
    files = list_images(folder)
    val = {str(s).lower() for s in card.get("training", {}).get("images_val", [])}
    return [p for p in files if pair_key(p) in val] or files


def parity_images(size: int, card: dict, folder=None, count: int = 4):
    """(uint8 count x size x size x 3 canvases, description): real photographs prepared as the
    pipeline does (from `folder`, else the card's validation images), else synthetic ones."""
    from .io import list_images, read_image
    from .preprocess import prepare, to_rgb8

    files = list_images(folder) if folder is not None else _card_images(card)
    files = files[::max(1, len(files) // count)]  # spread out: neighbours are often copies
    canvases = []
    for path in files:
        try:
            canvases.append(prepare(to_rgb8(read_image(path)), size)[0])
        except ValueError:
            continue
        if len(canvases) == count:
            break
    if canvases:
        return np.stack(canvases), f"{len(canvases)} photographs from {files[0].parent}"
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


# --- cards -----------------------------------------------------------------------------------
def export_card(source: dict, path: Path, size: int, section: dict) -> dict:
    card = {**copy.deepcopy(source), "weights": path.name, "sha256": sha256(path),
            "working_size": size, "input": f"uint8 N x {size} x {size} x 3 RGB ({INPUT})",
            "output": f"float32 N x {size} x {size} vessel probability ({OUTPUT})"}
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


# --- TensorRT --------------------------------------------------------------------------------
def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, size: int,
                 workspace_mib: int | None = None, timing_cache: Path | None = None) -> dict:
    """Build a strongly typed engine from the fp16 ONNX; returns the sidecar's tensorrt section.

    Strong typing means the graph's casts decide every tensor's precision (TensorRT 11 has no
    other way; 10.12+ needs the flag, 11 ignores it)."""
    from .backends.tensorrt import import_tensorrt, running_platform
    from .io import write_atomic

    trt = import_tensorrt()
    platform = running_platform()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    shapes = builder.create_optimization_profile()
    shapes.set_shape(INPUT, *profile.shapes(size))
    config.add_optimization_profile(shapes)
    # The timing cache makes rebuilds after retraining take seconds instead of minutes: tactic
    # timings depend on layer shapes, not on weights.
    blob = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(blob) or config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT could not build the engine (its log above says why)")
    write_atomic(engine_path, bytes(plan))
    if timing_cache:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {**platform, "profile": asdict(profile), "size": [size, size],
            "input": INPUT, "output": OUTPUT, "workspace_mib": workspace_mib,
            "timing_cache": str(timing_cache) if timing_cache else None,
            "build_seconds": round(time.perf_counter() - start, 1),
            "onnx": str(onnx_path), "onnx_sha256": sha256(onnx_path)}


def engine_names(checkpoint: Path, platform: dict, engine_dir: Path) -> tuple[Path, Path]:
    """engines/<run>.sm<XY>.engine and the timing cache shared by builds on this GPU type."""
    stem = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.stem
    sm = "sm" + platform["compute_capability"].replace(".", "")
    trt = re.sub(r"[^0-9.]", "", platform["tensorrt"])
    return (engine_dir / f"{stem or 'model'}.{sm}.engine",
            engine_dir / f"timing.{sm}.trt{trt}.cache")


# --- the whole export ------------------------------------------------------------------------
def export(checkpoint, out, *, batch: str | Profile = DEFAULT_PROFILE, size=None,
           engine_dir=ENGINE_DIR, engine: bool = True, require_engine: bool = False,
           workspace_mib: int | None = None, timing_cache=None, parity_folder=None,
           parity_count: int = 4, int8: bool | None = None, calibration=None,
           log=print) -> dict:
    """Export `checkpoint` (with its model.json card) to `out`; returns a summary dict.

    Raises ExportError for user mistakes and failed parity checks, EngineUnavailable when
    `require_engine` and no engine could be built (the ONNX files are written first).
    int8: None = model.int8.onnx when calibration photographs are at hand (`calibration`, a
    folder, else the card's training data), True = required, False = not (quantize.py)."""
    from .backends.torch import load_network
    from .model import InferenceModel

    checkpoint, out = Path(checkpoint), Path(out)
    profile = batch if isinstance(batch, Profile) else parse_profile(batch)
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    try:
        source_card = load_card(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    size = parse_size(size, source_card.get("working_size", 512))
    threshold = float(source_card.get("threshold", 0.5))
    try:
        net = load_network(checkpoint)
    except BackendUnavailable as e:
        raise ExportError(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    images, described = parity_images(size, source_card, parity_folder, parity_count)
    provenance = {"source": {"checkpoint": str(checkpoint), "sha256": sha256(checkpoint)},
                  "opset": OPSET, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions()}

    log(f"exporting {checkpoint} at {size}x{size}; parity on {described}")
    fp32_path = out / "model.onnx"
    export_onnx(InferenceModel(net).eval(), fp32_path, size)
    simplified = maybe_simplify(fp32_path, images)
    fp32 = run_onnx(fp32_path, images)
    parity32 = {"reference": "PyTorch fp32 (CPU)", "runtime": "onnxruntime CPU",
                "images": described,
                **compare(run_torch(InferenceModel(net).eval(), images), fp32, threshold)}
    fp32_card = export_card(source_card, fp32_path, size,
                            {**provenance, "precision": "fp32", "simplified": simplified,
                             "parity": parity32})

    fp16_path = out / "model.fp16.onnx"
    export_onnx(mixed_precision_model(net), fp16_path, size)
    parity16 = {"reference": "model.onnx (fp32)", "runtime": "onnxruntime CPU",
                "images": described, "min_dice": FP16_MIN_DICE,
                **compare(fp32, run_onnx(fp16_path, images), threshold)}
    fp16_card = export_card(source_card, fp16_path, size, {
        **provenance, "precision": "fp16 (mixed: uint8 input, fp32 scaling, standardisation "
        "and sigmoid; BatchNorm folded in fp32)", "parity": parity16})

    summary = {"onnx": str(fp32_path), "onnx_fp16": str(fp16_path), "size": size,
               "profile": asdict(profile), "parity_fp32": parity32, "parity_fp16": parity16,
               "engine": None, "engine_skipped": None}
    if parity32["max_abs_diff"] > FP32_MAX_DIFF:
        raise ParityError(f"ONNX fp32 differs from PyTorch by {parity32['max_abs_diff']:.2g} "
                          f"(> {FP32_MAX_DIFF:g}): the export is broken, please report it")
    if parity16["mask_dice_min"] < FP16_MIN_DICE:
        raise ParityError(f"fp16 masks agree with fp32 only to Dice "
                          f"{parity16['mask_dice_min']:.4f} (< {FP16_MIN_DICE}): do not deploy "
                          f"{fp16_path}; use model.onnx")
    if engine:
        summary.update(_engine_step(checkpoint, out, fp16_path, fp16_card, profile, size,
                                    Path(engine_dir), workspace_mib, timing_cache, log))
    else:
        summary["engine_skipped"] = "no TensorRT engine built: --no-engine"
    if int8 is not False:  # after the fp16 engine: a failed int8 gate (exit 1) keeps it
        from .quantize import int8_engine_step, int8_step

        summary.update(int8_step(fp32_path, fp32_card, images, described, calibration,
                                 required=bool(int8), log=log))
        if engine and summary["onnx_int8"]:
            summary.update(int8_engine_step(checkpoint, fp32_path, fp32_card, images,
                                            described, calibration, profile, size,
                                            engine_dir, workspace_mib, timing_cache, log))
    if require_engine and summary["engine"] is None:
        raise EngineUnavailable(summary["engine_skipped"])
    summary["fp32_card"], summary["fp16_card"] = fp32_card, fp16_card
    return summary


def _engine_step(checkpoint, out, fp16_path, fp16_card, profile, size, engine_dir,
                 workspace_mib, timing_cache, log) -> dict:
    from .backends.tensorrt import running_platform

    try:
        platform = running_platform()
    except BackendUnavailable as e:
        return {"engine": None, "engine_skipped": f"no TensorRT engine built: {e}"}
    engine_path, default_cache = engine_names(checkpoint, platform, engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    log(f"building TensorRT engine for {platform['gpu']} (batch {profile.min}..{profile.max}, "
        f"tuned for {profile.opt}); this takes minutes the first time")
    section = build_engine(fp16_path, engine_path, profile, size, workspace_mib,
                           Path(timing_cache) if timing_cache else default_cache)
    rebuild = (f"retina-batch export {checkpoint} --out {out} --batch "
               f"{profile.min},{profile.opt},{profile.max} --size {size}x{size}"
               + ("" if engine_dir == ENGINE_DIR else f" --engine-dir {engine_dir}"))
    sidecar = {**copy.deepcopy(fp16_card), "weights": engine_path.name,
               "sha256": sha256(engine_path), "tensorrt": {**section, "rebuild": rebuild}}
    write_json_atomic(engine_path.with_name(engine_path.name + ".json"), sidecar)
    return {"engine": str(engine_path), "engine_card": sidecar}
