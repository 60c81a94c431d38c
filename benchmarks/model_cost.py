"""End-to-end img/s of two (or more) models on the same photographs, alternating in rounds.

For a retrained model the question is "does it cost what the old one did": this runs
`retina-batch bench INPUT --model M --precision P` for every model in every round (so a change
in machine load hits all of them) and writes one JSON record with each run, the median img/s
per model and precision, and each model's ratio to the first.

    python benchmarks/model_cost.py ../shared/data/retina-blood-vessel/train/image \\
        --models OLD/model.onnx retina_batch/default_model/model.onnx --precision fp32,int8 \\
        --rounds 3 --json benchmarks/results/<date>-model-cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench(source: Path, model: Path, precision: str, batch_size: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "retina_batch.cli", "bench", str(source),
                        "--model", str(model), "--precision", precision,
                        "--batch-size", str(batch_size), "--repeat", str(repeat),
                        "--no-naive", "-q", "--json", str(out)], check=True)
        return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ips: dict = {str(m): {} for m in args.models}
    loads = []
    for _ in range(args.rounds):
        for model in args.models:
            record = bench(args.input, model, args.precision, args.batch_size, args.repeat)
            loads.append(record["contention_before"]["load_average"][0])
            for result in record["results"]:
                ips[str(model)].setdefault(result["precision"], []).append(
                    result["end_to_end_ips"])
            print(model, {p: v[-1] for p, v in ips[str(model)].items()}, flush=True)
    first = str(args.models[0])
    summary = {m: {p: {"median_ips": statistics.median(v),
                       "over_first": round(statistics.median(v)
                                           / statistics.median(ips[first][p]), 3)}
                   for p, v in by_p.items()} for m, by_p in ips.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/model_cost.py " + " ".join(sys.argv[1:]),
        "load_average_1min_before_each_run": loads, "summary": summary, "runs_ips": ips},
        indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
