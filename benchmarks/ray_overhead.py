"""What running `segment` through Ray Data costs on one machine: the same synthetic photographs
segmented by the local pipeline and by `--ray` on a local Ray instance, in alternating rounds,
same model and batch size, into fresh output folders. Records the wall time of each, Ray's start-up
(`ray.init`) separately, the CPU time of each (the process tree: Ray's own processes
included), whether the masks are byte-identical, and the machine's load before and after
(a shared machine: compare the ratio within one run, not across runs).

    python benchmarks/ray_overhead.py --images 200 --rounds 3 \
        --json benchmarks/results/<date>-ray-overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import ray

from retina_batch.bench import contention
from retina_batch.pipeline import segment
from retina_batch.ray_runner import segment_ray
from retina_batch.synth import write_synthetic


def masks(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")
            if not p.name.startswith(".")}


def timed(run) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = run()
    return summary, time.perf_counter() - start


def cpu_by_process() -> dict[int, float]:
    """CPU seconds of this process and of every live process under it (a local Ray instance's
    GCS, raylet and workers are)."""
    me = psutil.Process()
    seconds = {me.pid: sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            seconds[child.pid] = sum(child.cpu_times()[:2])
        except psutil.Error:
            pass  # ended meanwhile
    return seconds


def costed(run, tree: bool) -> tuple[dict, float, float]:
    """(summary, wall seconds, CPU seconds) of one run: what the work cost, whatever else loads
    the machine. `tree`: count Ray's processes too (not for the local run: Ray idles beside it).
    A process that ends during the run takes its CPU time with it (Ray may retire an idle
    worker), so Ray's figure is a lower bound."""
    before = cpu_by_process()
    summary, wall = timed(run)
    after = cpu_by_process()
    pids = after if tree else [os.getpid()]
    cpu = sum(after[pid] - before.get(pid, 0.0) for pid in pids)
    return summary, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--model", help="default: the shipped model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating local/Ray pairs")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "images": args.images, "size": args.size, "batch_size": args.batch_size,
              "model": args.model or "shipped", "cpus": os.cpu_count(),
              "contention_start": contention()}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "in", args.images, (args.size, args.size), "jpg", seed=0)
        _, init_s = timed(lambda: ray.init(include_dashboard=False, log_to_driver=False,
                                           logging_level="error") and {})
        rounds = []
        # Alternating local / Ray rounds, each into fresh folders: on a shared machine the load
        # drifts, so the median of the per-round ratios is the figure, not one pair of runs.
        for r in range(args.rounds):
            local, local_s, local_cpu = costed(lambda r=r: segment(
                tmp / "in", tmp / f"local{r}", model=args.model, batch_size=args.batch_size),
                tree=False)
            on_ray, ray_s, ray_cpu = costed(lambda r=r: segment_ray(
                tmp / "in", tmp / f"ray{r}", model=args.model, batch_size=args.batch_size),
                tree=True)
            rounds.append({
                "local_wall_s": round(local_s, 2), "ray_wall_s": round(ray_s, 2),
                "ray_over_local": round(ray_s / local_s, 3),
                "local_cpu_ms_per_image": round(1000 * local_cpu / args.images, 1),
                "ray_cpu_ms_per_image": round(1000 * ray_cpu / args.images, 1),
                "ray_cpu_over_local": round(ray_cpu / local_cpu, 3),
                "local_ok": local["counts"]["ok"], "ray_ok": on_ray["counts"]["ok"],
                "masks_identical": masks(tmp / f"local{r}") == masks(tmp / f"ray{r}"),
                "pools": on_ray["settings"]["ray"], "contention": contention()})
        ray.shutdown()
    local_med = statistics.median(r["local_wall_s"] for r in rounds)
    ray_med = statistics.median(r["ray_wall_s"] for r in rounds)
    result.update({
        "rounds": rounds,
        "ray_init_s": round(init_s, 2),
        "local_wall_s_median": local_med,
        "ray_wall_s_median": ray_med,
        "local_images_per_second_median": round(args.images / local_med, 2),
        "ray_images_per_second_median": round(args.images / ray_med, 2),
        "ray_over_local_median": statistics.median(r["ray_over_local"] for r in rounds),
        "ray_cpu_over_local_median": statistics.median(r["ray_cpu_over_local"] for r in rounds),
        "masks_identical": all(r["masks_identical"] for r in rounds),
        "every_input_once": all(r["local_ok"] == r["ray_ok"] == args.images for r in rounds),
        "contention_end": contention(),
    })
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
