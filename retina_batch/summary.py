"""summary.json: the output folder's totals (over every run) and what the last run did.

Throughput has ONE definition everywhere (summary, progress bar, bench): images processed
(ok + failed; inputs skipped because they were already done excluded) divided by the wall
time of the run, see `images_per_second`.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from . import __version__
from .card import card_path, sha256
from .records import STAGES

FAILURES_LISTED = 100  # the rest are in metrics.csv; the summary stays small at any scale


def images_per_second(images: int, seconds: float) -> float | None:
    """Images processed per second of wall time (skipped inputs are not processed), to four
    significant digits (a slow run's 0.0167 img/s keeps its precision)."""
    return float(f"{images / seconds:.4g}") if seconds > 0 and images else None


class RunTally:
    """What one run did, in constant memory: counts, stage time sums, the first failures."""

    def __init__(self):
        self.counts = {"ok": 0, "error": 0, "skipped": 0, "no_fov": 0}
        self.stage_totals = dict.fromkeys(STAGES, 0.0)
        self.failures: list[dict] = []

    @property
    def processed(self) -> int:
        return self.counts["ok"] + self.counts["error"]

    def add(self, row: dict) -> None:
        status = row.get("status", "error")
        self.counts[status] += 1
        if status == "ok":
            self.counts["no_fov"] += not row.get("fov_found", True)
            for stage in STAGES:
                self.stage_totals[stage] += row.get(stage, 0.0)
        elif len(self.failures) < FAILURES_LISTED:
            self.failures.append({"path": row["path"], "message": row.get("message", "")})

    def mean_stage_seconds(self) -> dict:
        ok = self.counts["ok"]
        return {k: round(v / ok, 5) for k, v in self.stage_totals.items()} if ok else {}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(path)


def model_identity(backend) -> dict:
    """sha256 of the weights file that makes the masks (hashed, not taken from the card, so
    a replaced file is noticed) and of its card file. Backends without a file (test fakes)
    fall back to the card's own `sha256`."""
    path = getattr(backend, "model_path", None)
    if path is None or not Path(path).is_file():
        return {"weights_sha256": backend.card.get("sha256"), "card_sha256": None}
    card = card_path(path)
    return {"weights_sha256": _hash(path), "card_sha256": _hash(card) if card.exists() else None}


def _hash(path: Path) -> str:
    st = os.stat(path)
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def software_versions() -> dict:
    versions = {"retina-batch": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "opencv": cv2.__version__, "platform": sys.platform}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def build_summary(*, tally: RunTally, found: int, folder: dict, wall: float, started: datetime,
                  interrupted: bool, run_id: str, threshold: float, backend, model: dict,
                  settings: dict, outputs: dict, view: dict | None) -> dict:
    """The summary of a run: `folder` totals (from the ledger), then this run's figures."""
    summary = {
        "folder": folder,
        "run_id": run_id,
        "inputs": found,
        "counts": {**tally.counts, "processed": tally.processed},
        "failures": tally.failures,
        "interrupted": interrupted,
        "wall_seconds": round(wall, 3),
        "images_per_second": images_per_second(tally.processed, wall),
        "mean_stage_seconds": tally.mean_stage_seconds(),
        "threshold": threshold,
        "backend": backend.describe(),
        "model_sha256": model["weights_sha256"],
        "model_card_sha256": model["card_sha256"],
        "settings": settings,
        "outputs": outputs,
        "versions": software_versions(),
        "started": started.isoformat(timespec="seconds"),
        "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if view and view["truth_images"]:
        summary["truth_means"] = view["truth_means"]
        summary["truth_images"] = view["truth_images"]
    return summary
