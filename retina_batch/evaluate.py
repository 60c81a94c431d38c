"""Scoring predicted masks (and probability maps) against ground truth, file by file.

Works on any folder of masks, not only retina-batch's own output, so other tools' results can be
scored the same way. Files pair by `io.pair_key` (stem without markers such as `_manual1`,
`_1stHO`, `.ah`, `_mask`), so `21_training.png` meets `21_manual1.gif`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from .io import (
    InputError,
    discover,
    index_by_key,
    pair_key,
    read_image,
    read_mask,
    read_probability,
)
from .metrics import evaluate_mask, mean_scores, roc_auc
from .preprocess import detect_fov, to_rgb8


def _folder_index(folder: str | os.PathLike | None, fov: bool = False) -> dict[str, Path]:
    if folder is not None and not Path(folder).is_dir():
        raise InputError(f"not a folder: {folder}")
    return index_by_key(folder, fov)


def _fov(key: str, fov_files: dict, image_files: dict) -> np.ndarray | None:
    """The FOV from a mask file if given, else detected on the photograph, else None."""
    if key in fov_files:
        return read_mask(fov_files[key])
    if key in image_files:
        return detect_fov(to_rgb8(read_image(image_files[key]))).mask.astype(bool)
    return None


def score_one(pred_path: Path, truth_path: Path, prob_path: Path | None = None,
              fov: np.ndarray | None = None) -> dict:
    pred, truth = read_mask(pred_path), read_mask(truth_path)
    if pred.shape != truth.shape:
        raise ValueError(f"{pred_path.name} is {pred.shape[1]}x{pred.shape[0]} but its truth "
                         f"{truth_path.name} is {truth.shape[1]}x{truth.shape[0]}")
    if fov is not None and fov.shape != truth.shape:
        raise ValueError(f"field-of-view mask for {pred_path.name} has another size")
    row = evaluate_mask(pred, truth, fov)
    if prob_path is not None:
        prob = read_probability(prob_path)  # 8- or 16-bit levels: AUC counts both exactly
        if prob.shape != truth.shape:
            raise ValueError(f"{prob_path.name}: expected a probability map of the mask's size")
        row["auc"] = roc_auc(prob, truth)
        if fov is not None:
            row["fov_auc"] = roc_auc(prob, truth, fov)
    return row


def evaluate(pred_dir, truth_dir, *, prob_dir=None, fov_dir=None, images_dir=None) -> dict:
    """Per-image and mean scores of every mask in `pred_dir` that has a ground truth.

    `fov_dir` gives field-of-view masks; `images_dir` the photographs to detect it on instead.
    With neither, only whole-image scores are computed.
    """
    truth_files = _folder_index(truth_dir)
    prob_files, fov_files = _folder_index(prob_dir), _folder_index(fov_dir, fov=True)
    image_files = _folder_index(images_dir)
    rows, errors, unmatched = [], [], []
    for path, rel in discover(pred_dir):
        key = pair_key(path)
        if key not in truth_files:
            unmatched.append(str(rel))
            continue
        try:
            fov = _fov(key, fov_files, image_files)
            scores = score_one(path, truth_files[key], prob_files.get(key), fov)
        except ValueError as e:
            errors.append({"path": str(rel), "error": str(e)})
            continue
        rows.append({"path": str(rel), "truth": truth_files[key].name,
                     **{k: round(v, 5) for k, v in scores.items()}})
    if not rows and not errors:
        raise InputError(f"no mask in {pred_dir} pairs with a file in {truth_dir} "
                         "(pairing is by file stem without markers like _manual1)")
    return {"images": len(rows), "mean": {k: round(v, 5) for k, v in mean_scores(rows).items()},
            "per_image": rows, "errors": errors, "unmatched": unmatched,
            "fov": "masks" if fov_dir else "detected" if images_dir else "none"}


def write_csv(result: dict, path: str | os.PathLike) -> None:
    rows = result["per_image"]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                             for k, v in row.items()})
