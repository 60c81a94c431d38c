"""Agreement of two `retina-batch measure` CSVs (e.g. predicted vs manual masks), per column.

    python benchmarks/measure_agreement.py PREDICTED.csv MANUAL.csv [--label NAME]

Rows pair by file stem without annotation markers (retina_batch.io.pair_key), so
`21_training.png` meets `21_manual1.gif`. Prints a Markdown table: for every measurement the
mean of each side, Pearson's r and Spearman's rho over the images where both are defined.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from scipy import stats

from retina_batch.io import pair_key
from retina_batch.measure import COLUMNS


def read(path: Path) -> dict[str, dict]:
    """Rows keyed by photograph: the `path` column of a metrics CSV, or the `photograph` column
    of the per-photograph tables committed under train/experiments/."""
    with open(path, newline="") as f:
        return {pair_key(row.get("path") or row["photograph"]): row
                for row in csv.DictReader(f)}


def agreement(first: dict, second: dict) -> list[dict]:
    keys = sorted(first.keys() & second.keys())
    table = []
    for column in COLUMNS:
        pairs = np.array([(float(first[k][column]), float(second[k][column])) for k in keys
                          if first[k][column] != "" and second[k][column] != ""])
        a, b = pairs[:, 0], pairs[:, 1]
        table.append({"column": column, "images": len(pairs), "mean_first": a.mean(),
                      "mean_second": b.mean(), "pearson": stats.pearsonr(a, b)[0],
                      "spearman": stats.spearmanr(a, b)[0]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="CSV of `retina-batch measure` (predicted)")
    parser.add_argument("second", type=Path, help="CSV of `retina-batch measure` (manual)")
    parser.add_argument("--label", default="", help="a title line for the table")
    args = parser.parse_args()
    rows = agreement(read(args.first), read(args.second))
    if args.label:
        print(f"{args.label} ({rows[0]['images']} images)\n")
    print("| measurement | mean predicted | mean manual | Pearson r | Spearman rho |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['column']} | {r['mean_first']:.4g} | {r['mean_second']:.4g} | "
              f"{r['pearson']:.2f} | {r['spearman']:.2f} |")


if __name__ == "__main__":
    main()
