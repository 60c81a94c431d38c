"""Model cards: the JSON file beside every weights file that says what the weights are.

A card travels with its weights (`model.pt` -> `model.json`, `model.onnx` -> `model.json` or
`model.onnx.json`) and holds what a backend needs to use the model correctly (working size,
threshold) and what an auditor needs to trust it (data, recipe, scores, sha256 of the weights).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CARD_VERSION = 1


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(weights: str | os.PathLike) -> Path:
    """The card of a weights file: `X.onnx.json` if present, else `X.json`."""
    weights = Path(weights)
    beside = weights.with_name(weights.name + ".json")
    return beside if beside.exists() else weights.with_suffix(".json")


def load_card(weights: str | os.PathLike) -> dict:
    path = card_path(weights)
    if not path.exists():
        weights = Path(weights)
        raise FileNotFoundError(
            f"no model card for {weights}: expected {weights.with_name(weights.name + '.json')}"
            f" (or {path.name}) beside it; every model needs its .json card: re-run "
            "`retina-batch export` to write one"
        )
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
