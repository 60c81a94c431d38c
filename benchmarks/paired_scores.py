"""Per-photograph scores of several `segment --truth` runs on the same photographs, paired.

    python benchmarks/paired_scores.py NAME=RUN NAME=RUN ... [--columns dice,auc] [--csv FILE]

Each RUN is a `segment --truth` output folder (its metrics.csv), or a per-photograph CSV committed
from one (a `path` or `photograph` column, as in train/experiments/loco/), so that a run scored
in an earlier session can be the reference; rows pair by file stem (retina_batch.io.pair_key).
Prints, for each run after the first and each column, the mean difference to the first run and
on how many photographs it is higher: a mean of 22 photographs can hide one large change, a count
cannot. `--csv` writes the joined table (photograph, then NAME_COLUMN for each run and column).
Used for train/experiments/r4-drive-only-illumination/ and r5-two-cameras-illumination/.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from measure_agreement import read


def scored(table: Path, columns: list[str]) -> dict[str, dict]:
    """{photograph key: {column: float}} for the rows that carry every column."""
    return {key: {c: float(row[c]) for c in columns} for key, row in read(table).items()
            if all(row.get(c) not in (None, "") for c in columns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN, the first is the reference")
    parser.add_argument("--columns", default="dice,auc")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    columns = args.columns.split(",")
    runs = {}
    for spec in args.runs:
        name, sep, run = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: expected NAME=RUN")
        table = Path(run) / "metrics.csv" if Path(run).is_dir() else Path(run)
        if not table.is_file():
            parser.error(f"{run}: no metrics.csv (give a `segment --truth` output folder "
                         "or a per-photograph CSV)")
        runs[name] = scored(table, columns)
    keys = sorted(set.intersection(*(set(r) for r in runs.values())),
                  key=lambda k: (len(k), k))  # numeric stems in numeric order
    if not keys:
        # Different photographs (or runs without --truth) would otherwise divide by zero.
        parser.error(f"no photograph has {', '.join(columns)} in every run: score the same "
                     "photographs with `segment --truth`")
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
