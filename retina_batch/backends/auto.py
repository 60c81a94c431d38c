"""`--backend auto`: the fastest backend that can run the requested model here.

A `.pt` checkpoint runs on torch and an `.engine` on TensorRT. For an ONNX model (or the
shipped default) a TensorRT engine is preferred when one built from the SAME weights for THIS
GPU and TensorRT version is found beside the model or in ./engines/; otherwise ONNX Runtime.
Matching weights is by sha256 (the ONNX file's, or the checkpoint it was exported from), so an
engine of another model is never picked up by accident.
"""

from __future__ import annotations

from pathlib import Path

from ..card import load_card
from .base import BackendUnavailable, default_model

ENGINE_DIR = Path("engines")
ENGINE_SUFFIXES = (".engine", ".plan")


def weight_ids(card: dict) -> set[str]:
    """The sha256s that identify a model's weights: its own file and the checkpoint it came
    from (an engine sidecar records both its ONNX file and the checkpoint)."""
    export = card.get("export", {})
    trt = card.get("tensorrt", {})
    ids = {card.get("sha256"), export.get("source", {}).get("sha256"), trt.get("onnx_sha256")}
    return {i for i in ids if i}


def _engine_cards(folders):
    seen = set()
    for folder in folders:
        for path in sorted(Path(folder).glob("*")) if Path(folder).is_dir() else []:
            if path.suffix not in ENGINE_SUFFIXES or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                yield path, load_card(path)
            except (OSError, ValueError):  # no or unreadable sidecar: not usable
                continue


def find_engine(model: Path, running: dict, engine_dir: Path = ENGINE_DIR) -> Path | None:
    """An engine beside `model` or in `engine_dir` built from the same weights for `running`."""
    from .tensorrt import platform_mismatches

    try:
        wanted = weight_ids(load_card(model))
    except (OSError, ValueError):  # no card or a broken one: nothing to match against
        return None
    # The model's own sha256 names the file itself; an engine must share the ONNX file or the
    # source checkpoint, which the sidecar's export section and onnx_sha256 record.
    for path, card in _engine_cards([model.parent, engine_dir]):
        if "tensorrt" in card and wanted & (weight_ids(card) - {card.get("sha256")}) \
                and not platform_mismatches(card, running):
            return path
    return None


def choose(model, device: str = "auto", engine_dir: Path = ENGINE_DIR) -> tuple[str, Path | None]:
    """(backend name, model path) for `--backend auto`."""
    path = Path(model) if model is not None else None
    if path is not None and path.suffix == ".pt":
        return "torch", path
    if path is not None and path.suffix in ENGINE_SUFFIXES:
        return "tensorrt", path
    if device != "cpu":
        from .tensorrt import running_platform

        try:
            running = running_platform()
        except BackendUnavailable:  # no TensorRT, cuda-python or GPU here
            running = None
        if running is not None:
            engine = find_engine(path or default_model(), running, Path(engine_dir))
            if engine is not None:
                return "tensorrt", engine
    return "onnxruntime", path
