"""benchmarks/paired_scores.py: rows pair by photograph, counts and differences are per pair."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_scores.py"


def write_run(folder: Path, rows: dict[str, tuple[float, float]]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "status", "dice", "auc"])
        for path, (dice, auc) in rows.items():
            writer.writerow([path, "ok", dice, auc])
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=SCRIPT.parent)


def test_pairs_by_photograph_and_counts_higher(tmp_path):
    # Rows in another order and one photograph only in the reference: it must be left out.
    a = write_run(tmp_path / "a", {"/x/1.png": (0.70, 0.90), "/x/2.png": (0.80, 0.95),
                                   "/x/3.png": (0.60, 0.97)})
    b = write_run(tmp_path / "b", {"/y/2.png": (0.78, 0.96), "/y/1.png": (0.75, 0.93)})
    out = tmp_path / "joined.csv"
    result = run(f"a={a}", f"b={b}", "--csv", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 photographs in every run" in result.stdout
    # dice: 0.75 vs 0.70 (+0.05), 0.78 vs 0.80 (-0.02): mean +0.015, higher on 1 of 2
    assert "b dice: mean 0.7650 (reference 0.7500), difference +0.0150, higher on 1 of 2" \
        in result.stdout
    assert "b auc: mean 0.9450 (reference 0.9250), difference +0.0200, higher on 2 of 2" \
        in result.stdout
    table = list(csv.DictReader(open(out)))
    assert [r["photograph"] for r in table] == ["1", "2"]
    assert float(table[0]["b_dice"]) == 0.75 and float(table[1]["a_dice"]) == 0.80


def test_no_common_photograph_is_one_line_error(tmp_path):
    a = write_run(tmp_path / "a", {"/x/1.png": (0.7, 0.9)})
    b = write_run(tmp_path / "b", {"/x/2.png": (0.7, 0.9)})
    result = run(f"a={a}", f"b={b}")
    assert result.returncode == 2
    assert "no photograph has dice, auc in every run" in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_without_metrics_is_one_line_error(tmp_path):
    a = write_run(tmp_path / "a", {"/x/1.png": (0.7, 0.9)})
    result = run(f"a={a}", f"b={tmp_path / 'missing'}")
    assert result.returncode == 2
    assert "no metrics.csv" in result.stderr and "Traceback" not in result.stderr


def test_committed_per_photograph_csv_is_a_reference(tmp_path):
    # The form of train/experiments/loco/*.csv: a `photograph` column holding file names.
    committed = tmp_path / "committed.csv"
    committed.write_text("photograph,threshold,dice,auc\n21_training.tif,0.55,0.70,0.96\n"
                         "22_training.tif,0.55,0.60,0.97\n")
    new = write_run(tmp_path / "new", {"/d/images/21_training.tif": (0.72, 0.95),
                                       "/d/images/22_training.tif": (0.61, 0.98)})
    result = run(f"old={committed}", f"new={new}", "--columns", "dice")
    assert result.returncode == 0, result.stderr
    assert "new dice: mean 0.6650 (reference 0.6500), difference +0.0150, higher on 2 of 2" \
        in result.stdout
