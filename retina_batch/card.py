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
# The parity gate of int8 files: export writes model.int8.onnx only when its masks agree with
# fp32's to at least this Dice on every parity image, and `--precision auto` ignores one whose
# card records less.
INT8_MIN_DICE = 0.99


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


def _card_datasets(training: dict) -> list[tuple[str, Path]]:
    """(key prefix, folder) of each data folder a card names. Older cards: `data` is one folder
    and keys are bare stems; cards of multi-dataset training: `datasets[*]` with `name` and
    `path`, keys of the form `name/stem` (retina_batch.training.dataset)."""
    if training.get("datasets"):
        return [(f"{d['name']}/", Path(d["path"])) for d in training["datasets"]]
    data = training.get("data")
    if isinstance(data, (list, tuple)):  # a list without datasets: prefixes as training makes
        from .training.dataset import dataset_name

        return [(f"{dataset_name(Path(d))}/", Path(d)) for d in data]
    return [("", Path(str(data)))] if data else []


def card_pairs(card: dict, split: str) -> list[tuple[Path, Path | None, str]]:
    """(photograph, annotation, key) of the card's training ('train') or validation ('val')
    split that are on this disk, in the card's dataset order and by name within each; [] when
    the training data is elsewhere. Paths in the card are relative to where training ran (the
    repository root, like every command in the README)."""
    training = card.get("training", {})
    wanted = {str(k).lower() for k in training.get(f"images_{split}", []) or []}
    for dataset in training.get("datasets", []):  # per-dataset lists, where a card has them
        listed = dataset.get(f"images_{split}")
        if isinstance(listed, list):
            wanted |= {str(k).lower() for k in listed}
    found = []
    for prefix, root in _card_datasets(training):
        found += [(image, mask, prefix + key) for image, mask, key in _folder_pairs(root)
                  if (prefix + key).lower() in wanted]
    return found


def _folder_pairs(root: Path) -> list[tuple[Path, Path | None, str]]:
    """(photograph, annotation or None, key) in a training data folder, paired as training
    pairs them; photographs alone where the annotations are not all there (calibration
    needs only the photographs)."""
    from .io import list_images, pair_key
    from .training.dataset import IMAGE_DIRS, DatasetError, find_pairs

    if not root.is_dir():
        return []
    try:
        return [(p.image, p.mask, p.key) for p in find_pairs(root)]
    except DatasetError:
        for folder in (root / d for base in (root, root / "train") for d in IMAGE_DIRS):
            if folder.is_dir():
                return [(p, None, pair_key(p)) for p in list_images(folder)]
        return []


def card_photographs(card: dict, split: str) -> list[Path]:
    """The photographs of card_pairs(card, split)."""
    return [image for image, _, _ in card_pairs(card, split)]
