"""Host CPU cost per image (bench --backend none: no inference), two source trees A/B.

Runs `retina-batch bench INPUT --backend none` for each input with each tree's code on
PYTHONPATH, alternating trees within each round so that a change in machine load hits both,
and writes one JSON record: per input and tree, host_ms_per_image (process CPU ms per image,
pipeline and naive loop) of every round, their medians, the stage costs and the load.

    retina-batch synth /tmp/hc/in512jpg -n 200 --size 512x512 --unique 200
    retina-batch synth /tmp/hc/in512png -n 200 --size 512x512 --format png --unique 200
    retina-batch synth /tmp/hc/in3504 -n 24 --size 3504x2336 --unique 16
    python benchmarks/host_cost.py --before /tmp/before-tree --after . \\
        --inputs /tmp/hc/in512jpg /tmp/hc/in512png /tmp/hc/in3504 [--device-flow] \\
        --json benchmarks/results/<date>-host-cost.json

`--device-flow` adds a third configuration, the after tree with `--pixel-work device`: what the
host still does per image when the pixel work runs on a device (here an instant one).
`--pixel-work device` runs both trees in that flow (a change to the GPU-resident flow's host
share, such as handing JPEGs to the device undecoded).

The "before" tree needs `--backend none` and host_ms_per_image, which came with the change
being measured: see benchmarks/README.md (host cost) for how it was made.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(tree: Path, source: Path, repeat: int, pixel_work: str = "host") -> dict:
    """One bench process; `pixel_work` device: the GPU-resident flow's host share (no naive
    loop: that is the host flow whatever the setting)."""
    extra = [] if pixel_work == "host" else ["--pixel-work", pixel_work, "--no-naive"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "retina_batch.cli", "bench", str(source),
                        "--backend", "none", "--batch-size", "8", "--repeat", str(repeat),
                        *extra, "-q", "--json", str(out)],
                       env={**os.environ, "PYTHONPATH": str(tree.resolve())}, check=True,
                       # `python -m` puts the current directory before PYTHONPATH: run from a
                       # folder without a retina_batch package, or a checkout would shadow `tree`
                       cwd=tmp)
        record = json.loads(out.read_text())
    pipeline, naive = record["results"][0], record.get("naive") or {}
    return {"tree": str(tree), "pixel_work": pixel_work,
            "pipeline_host_ms": pipeline["host_ms_per_image"],
            "naive_host_ms": naive.get("host_ms_per_image"),
            "pipeline_images_per_second": pipeline["end_to_end_ips"],
            "naive_stage_ms": naive.get("stage_ms"),
            "load_average": record["contention_before"]["load_average"],
            "input": record["input"], "machine": record["machine"]["cpu_model"],
            "cores": record["machine"]["cores"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device-flow", action="store_true",
                        help="also the after tree with --pixel-work device (the host's share "
                             "of the GPU-resident flow), alternating with the other two")
    parser.add_argument("--pixel-work", choices=("host", "device"), default="host",
                        help="the flow both trees run in (default host)")
    args = parser.parse_args(argv)
    configs = {"before": (args.before, args.pixel_work), "after": (args.after, args.pixel_work)}
    if args.device_flow and args.pixel_work == "host":
        configs["after_device_flow"] = (args.after, "device")
    runs: dict = {str(i): {c: [] for c in configs} for i in args.inputs}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for _ in range(args.rounds):
        for source in args.inputs:
            for name, (tree, pixel_work) in configs.items():
                runs[str(source)][name].append(run(tree, source, args.repeat, pixel_work))
                print(source.name, name, runs[str(source)][name][-1]["pipeline_host_ms"],
                      flush=True)
    summary = {}
    for source, by_config in runs.items():
        summary[source] = {name: {
            "pipeline_host_ms_median": statistics.median(r["pipeline_host_ms"] for r in rs),
            "naive_host_ms_median": _median(r["naive_host_ms"] for r in rs)}
            for name, rs in by_config.items()}
        before = summary[source]["before"]["pipeline_host_ms_median"]
        for name in list(configs)[1:]:
            summary[source][f"{name}_over_before"] = round(
                summary[source][name]["pipeline_host_ms_median"] / before, 3)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/host_cost.py " + " ".join(sys.argv[1:]),
        "configs": {k: {"tree": str(t), "pixel_work": w} for k, (t, w) in configs.items()},
        "summary": summary, "runs": runs},
        indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    sys.exit(main())
