"""Where ONNX Runtime spends a model's time, per operator type: its own profiler
(SessionOptions.enable_profiling) over a few batches, with the backend's session options.

    python benchmarks/ort_profile.py retina_batch/default_model/model.int8.onnx [--batch 2]

Prints each operator type's share of the summed kernel time and the heaviest nodes. The
shares are the figure to read; the milliseconds grow with the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from retina_batch.backends.onnxruntime import session_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(ort, os.cpu_count() or 1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(args.model), options,
                                       providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).integers(
            0, 256, (args.batch, args.size, args.size, 3), np.uint8)
        for _ in range(args.runs):
            session.run(None, {session.get_inputs()[0].name: batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    total = sum(by_op.values())
    for op, us in by_op.most_common(12):
        print(f"{op:24s} {us / total:6.1%} {us / args.runs / 1000:8.1f} ms per run")
    print("heaviest nodes:")
    for node, us in by_node.most_common(8):
        print(f"  {node:60s} {us / total:6.1%}")


if __name__ == "__main__":
    main()
