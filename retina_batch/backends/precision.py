"""`--precision auto|fp32|int8`: which of a model's ONNX files ONNX Runtime runs.

`retina-batch export` writes model.int8.onnx (QDQ, retina_batch.quantize) beside model.onnx
when its masks agree with fp32's (Dice >= 0.99 on the validation photographs); the package
ships both. `auto` takes the int8 file only where it is faster AND lossless:

- faster: the CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8 on
  x86-64). ONNX Runtime's int8 convolutions use them to multiply-accumulate four int8 pairs
  into int32 in one instruction (measured 1.4-1.5x end to end on this project's AVX512-VNNI
  machine, benchmarks/README.md). Without them the x86 kernels (AVX2 vpmaddubsw) add pairs
  into saturating int16, so results can differ from the measured parity and gain little.
  Other CPUs (ARM dot-product among them) are not measured: fp32, the safe choice.
- lossless: the int8 card records parity with fp32 at or above the gate, and says it was made
  from this very fp32 file (sha256), so a stale int8 file beside a retrained model is ignored.

On a GPU (`--device cuda`, or an onnxruntime with CUDA that `--device auto` would use), `auto`
is fp32: the int8 file is for CPUs (TensorRT builds its own INT8 engine from it, see export).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from ..card import INT8_MIN_DICE, load_card
from .base import BackendUnavailable

PRECISIONS = ("auto", "fp32", "int8")
# /proc/cpuinfo flags of x86 CPUs with 8-bit dot-product instructions ONNX Runtime uses.
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Choice:
    path: Path
    precision: str  # fp32, int8 (or fp16 for a mixed-precision file given with --model)
    reason: str


def model_precision(card: dict) -> str:
    """What a model file computes in, from its card: int8, fp16 or fp32."""
    export = card.get("export", {})
    if "int8" in export:
        return "int8"
    return "fp16" if str(export.get("precision", "")).startswith("fp16") else "fp32"


def int8_path(fp32: Path) -> Path:
    """Where export puts a model's int8 file: model.onnx -> model.int8.onnx."""
    return fp32.with_name(fp32.stem + ".int8.onnx")


def cpu_int8_support(cpuinfo: str | None = None, machine: str | None = None) -> tuple[bool, str]:
    """(whether int8 is fast here, why). `cpuinfo`: the text of /proc/cpuinfo (read if None)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False, f"int8 speed not measured on {machine or 'this'} CPUs"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False, "CPU features unknown (no /proc/cpuinfo)"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    found = [f for f in INT8_CPU_FLAGS if f in flags]
    if found:
        return True, f"CPU has {'/'.join(found)}"
    return False, "CPU has no VNNI/AMX 8-bit dot-product instructions"


def usable_int8(fp32: Path) -> tuple[Path | None, str]:
    """The int8 file made from `fp32` and passed the parity gate, or (None, why not)."""
    path = int8_path(fp32)
    if not path.is_file():
        return None, f"no {path.name} beside {fp32.name}"
    try:
        card, source = load_card(path), load_card(fp32)
    except (OSError, ValueError) as e:
        return None, f"{path.name} has no readable card ({e})"
    made_from = card.get("export", {}).get("int8", {}).get("source", {}).get("sha256")
    if not made_from or made_from != source.get("sha256"):
        return None, f"{path.name} was not made from this {fp32.name} (re-run export)"
    dice = card["export"]["int8"].get("parity", {}).get("mask_dice_min", 0.0)
    if dice < INT8_MIN_DICE:
        return None, f"{path.name} masks agree with fp32 only to Dice {dice:.4f}"
    return path, f"masks agree with fp32 to Dice >= {dice:.4f}"


def _gpu_session(device: str) -> bool:
    """Would the ONNX Runtime backend run on a GPU? (see OnnxRuntimeBackend._providers)"""
    if device != "auto":
        return device == "cuda"
    try:
        import onnxruntime as ort
    except ImportError:  # the backend says how to install it
        return False
    return any(p in ort.get_available_providers()
               for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"))


def choose(model: Path, requested: str, backend: str, device: str = "auto") -> Choice:
    """The file to run for `--precision requested`, and why (for the summary)."""
    if requested not in PRECISIONS:
        raise BackendUnavailable(f"--precision {requested!r}: choose from "
                                 f"{', '.join(PRECISIONS)}")
    try:
        own = model_precision(load_card(model))
    except (OSError, ValueError):  # no card: the backend reports it when it loads the model
        own = "fp32"
    if backend != "onnxruntime" or model.suffix != ".onnx" or own != "fp32":
        if requested != "auto" and requested != own:
            where = (f"--model {model.name} is {own}" if backend == "onnxruntime"
                     else f"--backend {backend} runs {model.name} as it is ({own})")
            raise BackendUnavailable(f"--precision {requested}: {where}; int8 runs on "
                                     "--backend onnxruntime with an fp32 .onnx and the "
                                     "model.int8.onnx export wrote beside it")
        return Choice(model, own, "the model file's own precision")
    if requested == "fp32":
        return Choice(model, "fp32", "--precision fp32")
    path, why = usable_int8(model)
    if requested == "int8":
        if path is None:
            raise BackendUnavailable(f"--precision int8: {why}; make it with `retina-batch "
                                     "export CHECKPOINT --out DIR` (it writes model.int8.onnx)")
        if device == "cuda":
            raise BackendUnavailable("--precision int8 runs on the CPU: use --device cpu")
        return Choice(path, "int8", "--precision int8")
    if _gpu_session(device):
        return Choice(model, "fp32", "auto: GPU (int8 is for CPUs)")
    fast, cpu = cpu_int8_support()
    if not fast:
        return Choice(model, "fp32", f"auto: {cpu}")
    if path is None:
        return Choice(model, "fp32", f"auto: {why}")
    return Choice(path, "int8", f"auto: {cpu}; {why}")
