"""The per-image metrics row: its columns (defined here only) and metrics.csv, a view of the ledger.

The ledger stores each row as JSON, so a new column is one name added to METRIC_FIELDS (and
the code that computes it): rows recorded before it simply have an empty cell.

metrics.csv is never appended to: it is rewritten from the ledger (temporary file, then
rename) at the end of every run, and at the start of a run after one that was killed before
doing so. So it always holds exactly one current row per input, whatever sequence of runs,
crashes and re-runs made the folder; a reader never sees half a file.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .measure import COLUMNS as MEASURE_COLUMNS
from .qc import COLUMNS as QC_COLUMNS

STAGES = ("decode_s", "preprocess_s", "infer_s", "postprocess_s", "measure_s", "write_s")
SCORE_FIELDS = ("dice", "iou", "sensitivity", "specificity", "accuracy", "auc", "fov_dice",
                "fov_auc")
METRIC_FIELDS = [
    "run_id", "path", "output", "status", "message", "width", "height", "decode_scale", "canvas",
    "fov_found", "fov_area", "vessel_fraction", "threshold", "precision", *MEASURE_COLUMNS,
    *QC_COLUMNS, *STAGES, "truth", *SCORE_FIELDS,
]


def write_metrics_csv(rows, path: Path) -> dict:
    """Write `rows` (the ledger's current rows, in key order) to `path` atomically.

    Returns what the pass saw: the number of rows and the folder's mean scores against ground
    truth (over every ok row that has them), computed on the way at no extra read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    sums, counts, n = dict.fromkeys(SCORE_FIELDS, 0.0), dict.fromkeys(SCORE_FIELDS, 0), 0
    scored = 0
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
            if row.get("status") == "ok" and row.get("dice") is not None:
                scored += 1
                for k in SCORE_FIELDS:
                    value = row.get(k)
                    if value is not None and not math.isnan(value):
                        sums[k] += value
                        counts[k] += 1
    os.replace(tmp, path)
    means = {k: round(sums[k] / counts[k], 5) for k in SCORE_FIELDS if counts[k]}
    return {"rows": n, "truth_images": scored, "truth_means": means}


def refresh_view(ledger, path: Path) -> dict:
    """Rewrite metrics.csv from the ledger if it no longer matches it (or is missing); returns
    what the last rewrite saw (rows, folder means against ground truth)."""
    # With other writers' files in the folder (shards, Ray actors) always rewritten: this
    # writer cannot tell whether they changed since its last view.
    if getattr(ledger, "others", None) or ledger.view_stale() or not Path(path).exists() \
            or ledger.last_view() is None:
        ledger.view_written(write_metrics_csv(ledger.rows(), path))
    return ledger.last_view()
