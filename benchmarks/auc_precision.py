"""ROC AUC of stored probability maps at 16 bits (what `segment --prob` writes) against the same
maps rounded to 8 bits (what it wrote before 2026-12-08): what the precision of the map costs.

    retina-batch segment IMAGES --out OUT --prob PROB --truth TRUTH [--fov FOV]
    python benchmarks/auc_precision.py PROB TRUTH [--json out.json]

Whole-image AUC (every pixel, as the maintainers score), per photograph and mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retina_batch.io import index_by_key, read_mask, read_probability
from retina_batch.metrics import roc_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prob", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    truths = index_by_key(args.truth)
    rows = []
    for key, path in sorted(index_by_key(args.prob).items()):
        if key not in truths:
            continue
        p, truth = read_probability(path), read_mask(truths[key])
        rows.append({"photograph": key,
                     "auc_16bit": roc_auc(np.rint(p * 65535).astype(np.uint16), truth),
                     "auc_8bit": roc_auc(np.rint(p * 255).astype(np.uint8), truth)})
    if not rows:
        raise SystemExit(f"error: no probability map in {args.prob} has a truth mask in "
                         f"{args.truth}")
    for row in rows:
        print(f"{row['photograph']:>12s}  16-bit {row['auc_16bit']:.5f}  8-bit "
              f"{row['auc_8bit']:.5f}  {row['auc_16bit'] - row['auc_8bit']:+.5f}")
    mean16 = float(np.mean([r["auc_16bit"] for r in rows]))
    mean8 = float(np.mean([r["auc_8bit"] for r in rows]))
    print(f"{'mean':>12s}  16-bit {mean16:.5f}  8-bit {mean8:.5f}  {mean16 - mean8:+.5f}"
          f"  ({len(rows)} photographs)")
    if args.json:
        args.json.write_text(json.dumps({"mean_16bit": mean16, "mean_8bit": mean8,
                                         "per_photograph": rows}, indent=1))


if __name__ == "__main__":
    main()
