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
        raise FileNotFoundError(
            f"no model card for {weights}: expected {path} (every model needs its .json card; "
            "re-run `retina-batch export` to write one)"
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


def training_folders(card: dict) -> tuple[Path | None, Path | None]:
    """(photographs, annotations) folders of the card's training data, if on this disk."""
    data = Path(str(card.get("training", {}).get("data", "")) or "/nonexistent")
    images = next((data / d for d in ("image", "images") if (data / d).is_dir()), None)
    masks = next((data / d for d in ("mask", "masks") if (data / d).is_dir()), None)
    return images, masks


def card_photographs(card: dict, split: str) -> list[Path]:
    """The card's training ('train') or validation ('val') photographs that are on this disk,
    sorted by name; [] when the training data is elsewhere."""
    from .io import list_images, pair_key

    images, _ = training_folders(card)
    keys = {str(k).lower() for k in card.get("training", {}).get(f"images_{split}", [])}
    return [p for p in list_images(images) if pair_key(p) in keys] if images else []
