"""What the per-image measurements and quality statistics cost, on one core.

    python benchmarks/measure_cost.py [--repeat 3] [--json FILE]

Times retina_batch.measure.measure_mask (mask + FOV -> the 8 columns) and
retina_batch.qc.image_quality (photograph + FOV -> the 3 statistics) exactly as segment calls
them, one thread (OpenCV pinned to 1), on: the 512 x 512 Retina Blood Vessel masks (no
resampling: the budget case), DRIVE 565 x 584 (resampled down to the grid), LES-AV
1620 x 1444, and synthetic 3504 x 2336 photographs with their drawn masks. Reports the median
and 90th percentile of CPU time (time.thread_time: what the call costs this thread, little
affected by other processes on a shared machine) and of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from retina_batch.io import index_by_key, list_images, pair_key, read_image, read_mask
from retina_batch.measure import measure_mask
from retina_batch.preprocess import detect_fov, to_rgb8
from retina_batch.qc import image_quality
from retina_batch.synth import synthesize


def cases(data: Path):
    """(name, [(rgb, vessel mask, fov mask)])."""
    rbv = data / "retina-blood-vessel" / "train"
    drive, lesav = data / "drive-training", data / "les-av"

    def with_fov(rgb, mask, fov=None):
        return rgb, mask, detect_fov(rgb).mask if fov is None else fov

    yield "512x512 (Retina Blood Vessel)", [
        with_fov(to_rgb8(read_image(p)), read_mask(rbv / "mask" / p.name))
        for p in list_images(rbv / "image")[:40]]
    truth = index_by_key(drive / "masks")
    yield "565x584 (DRIVE)", [with_fov(to_rgb8(read_image(p)), read_mask(truth[pair_key(p)]))
                              for p in list_images(drive / "images")]
    fovs, vessels = index_by_key(lesav / "fov", fov=True), index_by_key(lesav / "vessels")
    yield "1620x1444 (LES-AV)", [
        (to_rgb8(read_image(p)), read_mask(vessels[pair_key(p)]), read_mask(fovs[pair_key(p)]))
        for p in list_images(lesav / "images")[:10]]
    synthetic = []
    for seed in range(6):
        bgr, mask = synthesize(3504, 2336, seed=seed)
        synthetic.append(with_fov(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), mask))
    yield "3504x2336 (synthetic)", synthetic


def timed(call, items, repeat: int) -> dict:
    cpu, wall = [], []
    for _ in range(repeat):
        for item in items:
            c, w = time.thread_time(), time.perf_counter()
            call(*item)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)

    def summary(values):
        return {"median_ms": round(1000 * statistics.median(values), 2),
                "p90_ms": round(1000 * float(np.percentile(values, 90)), 2)}

    return {"cpu": summary(cpu), "wall": summary(wall), "calls": len(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as inside the pipeline
    record = {"load_average_start": os.getloadavg(), "results": {}}
    measure_mask(np.ones((64, 64), bool))  # imports and first-call costs are not per image
    print("| input | measure_mask CPU ms (median / p90) | wall ms "
          "| image_quality CPU ms | wall ms |")
    print("|---|---|---|---|---|")
    for name, items in cases(args.data):
        m = timed(lambda rgb, mask, fov: measure_mask(mask, fov), items, args.repeat)
        q = timed(lambda rgb, mask, fov: image_quality(rgb, fov), items, args.repeat)
        record["results"][name] = {"measure_mask": m, "image_quality": q}
        print(f"| {name} | {m['cpu']['median_ms']} / {m['cpu']['p90_ms']} | "
              f"{m['wall']['median_ms']} | {q['cpu']['median_ms']} / {q['cpu']['p90_ms']} | "
              f"{q['wall']['median_ms']} |", flush=True)
    record["load_average_end"] = os.getloadavg()
    print(f"load average {record['load_average_start'][0]:.1f} at start, "
          f"{record['load_average_end'][0]:.1f} at end")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
