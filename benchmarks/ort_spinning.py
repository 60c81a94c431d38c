"""A/B: ONNX Runtime's intra-op thread spinning on (its default) vs off, in the real pipeline.

While ORT waits for work its threads spin for a while instead of sleeping. On a machine with
as many ORT threads as cores, those spinning threads compete with the pipeline's decode and
writer threads (and anything else running). This measures bench (in-process, so the patched
session options apply) with both settings, alternating, on synthetic 512x512 JPEGs.

    python benchmarks/ort_spinning.py --rounds 2 --json benchmarks/results/ort-spinning.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort

from retina_batch.bench import bench, contention

_Original = ort.SessionOptions


class _NoSpin(_Original):
    def __init__(self):
        super().__init__()
        self.add_session_config_entry("session.intra_op.allow_spinning", "0")


def measure(spinning: bool, images: int) -> dict:
    ort.SessionOptions = _Original if spinning else _NoSpin
    try:
        record = bench(synthetic=images, size=(512, 512), batch_sizes=(1, 4), repeat=2,
                       isolate=False, pure_images=8)
    finally:
        ort.SessionOptions = _Original
    return {"spinning": spinning, "naive_ips": record["naive"]["end_to_end_ips"],
            "results": [{"batch_size": r["config"]["batch_size"], "ips": r["end_to_end_ips"],
                         "pure_ips": r["pure_inference_ips"], "efficiency": r["efficiency"],
                         "speedup_vs_naive": r["speedup_vs_naive"]} for r in record["results"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"contention_start": contention(), "runs": []}
    for _ in range(args.rounds):
        for spinning in (True, False):
            out["runs"].append(measure(spinning, args.images))
            print(json.dumps(out["runs"][-1]))
    out["contention_end"] = contention()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
