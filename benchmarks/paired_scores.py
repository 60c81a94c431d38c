"""Per-photograph scores of several `segment --truth` runs on the same photographs, paired.

    python benchmarks/paired_scores.py NAME=OUT_DIR NAME=OUT_DIR ... [--columns dice,auc]
        [--csv FILE]

Each OUT_DIR is a `segment --truth` output folder (its metrics.csv); rows pair by file stem
(retina_batch.io.pair_key). Prints, for each run after the first and each column, the mean
difference to the first run and on how many photographs it is higher: a mean of 22 photographs
can hide one large change, a count cannot. `--csv` writes the joined table (photograph, then
NAME_COLUMN for each run and column). Used for train/experiments/r4-drive-only-illumination/.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from measure_agreement import read


def scored(folder: Path, columns: list[str]) -> dict[str, dict]:
    """{photograph key: {column: float}} for the rows that carry every column."""
    rows = read(folder / "metrics.csv")
    return {key: {c: float(row[c]) for c in columns} for key, row in rows.items()
            if all(row.get(c) not in (None, "") for c in columns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=OUT_DIR, the first is the reference")
    parser.add_argument("--columns", default="dice,auc")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    columns = args.columns.split(",")
    runs = {}
    for spec in args.runs:
        name, sep, folder = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: expected NAME=OUT_DIR")
        runs[name] = scored(Path(folder), columns)
    keys = sorted(set.intersection(*(set(r) for r in runs.values())),
                  key=lambda k: (len(k), k))  # numeric stems in numeric order
    reference_name, reference = next(iter(runs.items()))
    print(f"{len(keys)} photographs in every run; reference {reference_name}")
    for name, run in list(runs.items())[1:]:
        for c in columns:
            diffs = [run[k][c] - reference[k][c] for k in keys]
            print(f"{name} {c}: mean {sum(run[k][c] for k in keys) / len(keys):.4f} "
                  f"(reference {sum(reference[k][c] for k in keys) / len(keys):.4f}), "
                  f"difference {sum(diffs) / len(diffs):+.4f}, "
                  f"higher on {sum(d > 0 for d in diffs)} of {len(keys)}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["photograph"] + [f"{n}_{c}" for n in runs for c in columns])
            for k in keys:
                writer.writerow([k] + [f"{runs[n][k][c]:g}" for n in runs for c in columns])


if __name__ == "__main__":
    main()
