"""Vessel measurements for a folder of mask files: segment's output, manual annotations, or
any other tool's masks, so that they can be compared column by column.

The field of view of each mask, in this order:
  1. `fov_dir`: a FOV mask paired by file stem (io.pair_key: `21_training_mask.gif` and
     `21_manual1.gif` pair; `N_mask.gif` and `N.png` pair); a mask without one is an error;
  2. `images_dir`: detected on the photograph paired by stem (as `segment` detects it), so
     measuring segment's own masks this way reproduces segment's metrics columns;
  3. neither: the whole image is the field of view.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from .io import InputError, discover, index_by_key, pair_key, read_image, read_mask
from .measure import COLUMNS, measure_mask
from .preprocess import detect_fov, to_rgb8


def _index(folder, option: str, fov: bool = False) -> dict[str, Path]:
    if folder is not None and not Path(folder).is_dir():
        raise InputError(f"{option} folder not found: {folder}")
    return index_by_key(folder, fov)


def _fov_of(path: Path, fov_files: dict, image_files: dict) -> tuple[np.ndarray | None, str]:
    """(FOV mask or None for the whole image, where it came from) for one mask file."""
    key = pair_key(path)
    if fov_files:
        if key not in fov_files:
            raise ValueError("no field-of-view mask pairs with it in --fov")
        return read_mask(fov_files[key]), "mask"
    if image_files:
        if key not in image_files:
            raise ValueError("no photograph pairs with it in --images")
        return detect_fov(to_rgb8(read_image(image_files[key]))).mask, "detected"
    return None, "whole image"


def measure_folder(masks, *, fov_dir=None, images_dir=None, on_row=None) -> dict:
    """Measure every mask under `masks` (a folder tree, one file or a list of paths).

    Returns {"images", "rows", "errors", "summary"}: rows hold the relative path, where the FOV
    came from, and every measurement column; a file that cannot be measured is an error, never
    the end of the run. Raises InputError for an unusable argument.
    """
    fov_files = _index(fov_dir, "--fov", fov=True)
    image_files = _index(images_dir, "--images")
    rows, errors = [], []
    for path, rel in discover(masks):
        try:
            fov, source = _fov_of(path, fov_files, image_files)
            row = {"path": str(rel), "fov": source, **measure_mask(read_mask(path), fov)}
        except ValueError as e:
            errors.append({"path": str(rel), "error": str(e)})
            row = None
        if row is not None:
            rows.append(row)
        if on_row:
            on_row(row)
    if not rows and not errors:
        raise InputError(f"no mask images found in {masks}")
    return {"images": len(rows), "rows": rows, "errors": errors, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Per column: mean, median, min, max over the rows where it is defined."""
    out = {}
    for column in COLUMNS:
        values = np.array([r[column] for r in rows if _defined(r.get(column))], float)
        if values.size:
            out[column] = {"mean": float(values.mean()), "median": float(np.median(values)),
                           "min": float(values.min()), "max": float(values.max()),
                           "images": int(values.size)}
    return out


def _defined(value) -> bool:
    return value is not None and value != "" and not (isinstance(value, float)
                                                      and math.isnan(value))


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """One row per mask: path, fov, then the measurement columns (empty where undefined)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "fov", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
