"""Build a TensorRT engine from the fp16 ONNX graph, and name it for the GPU that built it.

TensorRT is imported only inside `build_engine`; the decisions around it (names, the timing
cache, what a failed parse or build reports, the order files are written in) are plain Python
and are tested with fake `tensorrt` modules (tests/test_engine_build.py).

Written against the TensorRT 11.4 Python API: Builder / IBuilderConfig / OnnxParser /
ITimingCache, and the 10.x -> 11.x migration guide (strongly typed networks are the only kind:
the graph's casts decide every tensor's precision; there is no FP16 builder flag).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from .card import sha256, write_json_atomic
from .export import INPUT, OUTPUT, ExportError
from .io import write_atomic
from .shapes import Range, input_shapes


class EngineBuildError(ExportError):
    """TensorRT is here but could not parse or build the graph (the ONNX files are written)."""


# --- names -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")


def platform_key(platform: dict) -> str:
    """<gpu>.sm<XY>.trt<version>, e.g. h100-80gb-hbm3.sm90.trt11.4.0.1.

    The GPU name is in the key, not only the compute capability: an H100 and an H200 are both
    sm90 but differ in memory bandwidth and SM count, so their tactic timings (and best engines)
    differ; sharing a cache or an engine name between them would mislead both."""
    gpu = re.sub(r"^nvidia-", "", _slug(platform["gpu"]))
    sm = "sm" + str(platform["compute_capability"]).replace(".", "")
    trt = re.sub(r"[^0-9.]", "", str(platform["tensorrt"]))
    return f"{gpu}.{sm}.trt{trt}"


def engine_names(checkpoint: Path, platform: dict, engine_dir: Path) -> tuple[Path, Path]:
    """engines/<run>.<platform key>.engine and the timing cache shared by builds on this GPU."""
    stem = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.stem
    key = platform_key(platform)
    return engine_dir / f"{stem or 'model'}.{key}.engine", engine_dir / f"timing.{key}.cache"


# --- what TensorRT says ----------------------------------------------------------------------
def _call(obj, method: str):
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # an accessor missing in this TensorRT version: use what there is
        return None


def parser_messages(parser) -> list[str]:
    """One line per ONNX parser error: operator, node name, description (TensorRT >= 10 has
    node_name/node_operator on IParserError; older ones only desc)."""
    messages = []
    for i in range(int(parser.num_errors)):
        error = parser.get_error(i)
        where = " ".join(str(x) for x in (_call(error, "node_operator"),
                                          _call(error, "node_name")) if x)
        text = str(_call(error, "desc") or error)
        messages.append(f"{where}: {text}" if where else text)
    return messages


def recording_logger(trt, log):
    """A TensorRT logger that forwards warnings and errors to `log` and keeps the errors, so a
    failed build can say why in its one error line (trt.ILogger subclass, as documented)."""

    class Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR,
                            trt.ILogger.Severity.WARNING):
                log(f"TensorRT: {msg}")

    return Recorder()


# --- timing cache ----------------------------------------------------------------------------
def _attach(config, blob: bytes) -> bool:
    try:
        cache = config.create_timing_cache(blob)
        # False when the cache was made by another TensorRT version or another device
        # (IBuilderConfig.set_timing_cache / ITimingCache.combine docs). ignore_mismatch stays
        # False: the docs warn that another device's timings can mislead tactic selection.
        return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    except Exception:  # a corrupt cache file: TensorRT raises its own error types
        return False


def attach_timing_cache(config, path: Path | None, log) -> bool:
    """Use the cache at `path` (tactic timings: rebuilds after retraining take seconds); if
    TensorRT refuses it, start a fresh one (saved over it after the build) and say so. Returns
    whether a cache is attached; a build without one is only slower."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    if _attach(config, blob):
        return True
    if blob:
        log(f"warning: TensorRT refused the timing cache {path} (made by another GPU or "
            "TensorRT version); starting a fresh one, which replaces it after the build")
        if _attach(config, b""):
            return True
    log("warning: TensorRT refused an empty timing cache; building without one (slower)")
    return False


def save_timing_cache(config, path: Path, log) -> bool:
    """Write the (updated) cache; a failure is a warning: the engine and its card are written."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            raise RuntimeError("get_timing_cache() returned None")
        write_atomic(path, bytes(cache.serialize()))
        return True
    except (RuntimeError, OSError) as e:
        log(f"warning: timing cache not saved to {path}: {e}")
        return False


# --- the build -------------------------------------------------------------------------------
def _network(trt, builder, onnx_path: Path, logger):
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        messages = parser_messages(parser) or logger.errors or ["no message from the parser"]
        raise EngineBuildError(f"engine could not be built: TensorRT could not parse "
                               f"{onnx_path}: {'; '.join(messages)}")
    return network, parser


def _config(trt, builder, batch: Range, canvas: Range, workspace_mib: int | None):
    config = builder.create_builder_config()
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *input_shapes(batch, canvas))
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"engine could not be built: TensorRT rejected the profile "
                               f"{input_shapes(batch, canvas)}")
    return config


def build_engine(onnx_path: Path, engine_path: Path, batch: Range, canvas: Range, card: dict,
                 rebuild: str, *, workspace_mib: int | None = None,
                 timing_cache: Path | None = None, log=print) -> dict:
    """Build, then write the sidecar card, the engine, and the timing cache, in that order: an
    engine never lies on disk without its card (a card without an engine is ignored by
    `--backend auto`, which looks for engines), and a cache problem cannot cost the engine.
    Returns the sidecar. Raises EngineBuildError with TensorRT's own messages."""
    from .backends.tensorrt import import_tensorrt, running_platform

    trt = import_tensorrt()
    platform = running_platform()
    logger = recording_logger(trt, log)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, onnx_path, logger)
    config = _config(trt, builder, batch, canvas, workspace_mib)
    cached = timing_cache is not None and attach_timing_cache(config, timing_cache, log)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = "; ".join(logger.errors) or "no message from TensorRT"
        raise EngineBuildError(f"engine could not be built from {onnx_path}: {reason}")
    blob = bytes(plan)
    section = {**platform, "profile": batch.as_dict(), "canvas": canvas.as_dict(),
               "input": INPUT, "output": OUTPUT, "workspace_mib": workspace_mib,
               "timing_cache": str(timing_cache) if cached else None,
               "build_seconds": round(time.perf_counter() - start, 1),
               "onnx": str(onnx_path), "onnx_sha256": sha256(onnx_path), "rebuild": rebuild}
    sidecar = {**card, "weights": engine_path.name,
               "sha256": hashlib.sha256(blob).hexdigest(), "tensorrt": section}
    write_json_atomic(engine_path.with_name(engine_path.name + ".json"), sidecar)
    write_atomic(engine_path, blob)
    if cached:
        save_timing_cache(config, timing_cache, log)
    return sidecar
