"""CPU inference cost of the Attention U-Net at several widths (the width/accuracy trade-off).

Cost depends on the architecture only, so each width is exported with random weights; the
accuracy side of the trade-off comes from training runs (train/default/README.md). Widths are
timed interleaved, round after round, so a busy machine slows all of them alike and the ratios
stay fair. Usage:

    python benchmarks/widths.py --widths 8,16,32 --rounds 7 --json benchmarks/results/widths.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from retina_batch.model import AttentionUNet, InferenceModel, UNetConfig, count_parameters


def export(width: int, size: int, folder: Path) -> Path:
    torch.manual_seed(0)
    model = InferenceModel(AttentionUNet(UNetConfig(width=width))).eval()
    path = folder / f"w{width}.onnx"
    torch.onnx.export(model, (torch.zeros(1, size, size, 3, dtype=torch.uint8),), str(path),
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_axes={"images": {0: "n"}, "probabilities": {0: "n"}},
                      dynamo=False, opset_version=17)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    batch = np.random.default_rng(0).integers(
        0, 256, (args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {w: ort.InferenceSession(str(export(w, args.size, Path(tmp))), options,
                                            providers=["CPUExecutionProvider"]) for w in widths}
        for session in sessions.values():  # warm-up
            session.run(None, {"images": batch})
        times = {w: [] for w in widths}
        for _ in range(args.rounds):
            for w, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"images": batch})
                times[w].append((time.perf_counter() - start) / args.batch_size)
    reference = statistics.median(times[16]) if 16 in times else None
    rows = []
    for w in widths:
        ms = 1000 * statistics.median(times[w])
        rows.append({"width": w,
                     "parameters": count_parameters(AttentionUNet(UNetConfig(width=w))),
                     "ms_per_image_median": round(ms, 1), "images_per_second": round(1000 / ms, 2),
                     "relative_to_width16": round(ms / 1000 / reference, 2) if reference else None})
        print(f"width {w:3d}: {rows[-1]['parameters']:>10,} parameters, {ms:7.1f} ms/image "
              f"({args.size}x{args.size}, batch {args.batch_size}, median of {args.rounds})")
    result = {"size": args.size, "batch_size": args.batch_size, "rounds": args.rounds,
              "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_average": os.getloadavg(), "widths": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
