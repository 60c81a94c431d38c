"""Process CPU ms per image of each host step of `segment`, one thread, for one folder.

    python benchmarks/host_steps.py /tmp/hc/in512jpg [--images 60] [--repeat 3] \
        [--default-allocator]

Steps as the pipeline runs them: decode (reduced for large JPEGs), to RGB, FOV thumbnail, FOV
decisions, letterbox, quality flags (qc.image_quality, reusing the canvas where segment does),
back to the original size + threshold + FOV (on a smooth random canvas map, the model's output
is not needed for the cost), the vessel measurements of an empty mask (what `bench --backend
none` measures; a real mask costs ~10 ms more, benchmarks/measure_cost.py), 1-bit PNG encode,
atomic write (to a temporary folder). With the allocator settings every pipeline applies
(retina_batch.allocator), or glibc's defaults with --default-allocator, to compare.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from retina_batch.allocator import keep_freed_memory
from retina_batch.io import decode, encode_mask, list_images, write_atomic
from retina_batch.measure import measure_mask
from retina_batch.preprocess import (
    fov_from_thumbnail,
    fov_thumbnail,
    letterbox,
    threshold_in_fov,
    to_rgb8,
)
from retina_batch.qc import image_quality


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc settings as they are (segment changes them)")
    args = parser.parse_args(argv)
    if not args.default_allocator:
        keep_freed_memory()
    cv2.setNumThreads(1)  # as inside the pipeline
    files = list_images(args.folder)[:args.images]
    rng = np.random.default_rng(0)
    canvas_map = cv2.GaussianBlur(rng.random((args.canvas,) * 2, np.float32), (0, 0), 2) * 1.2
    cost: dict[str, float] = collections.defaultdict(float)
    out = Path(tempfile.mkdtemp(prefix="host-steps-"))

    def step(name, fn, *a):
        start = time.process_time()
        result = fn(*a)
        cost[name] += time.process_time() - start
        return result

    for rounds in range(args.repeat + 1):
        if rounds == 1:  # the first round warms up (lazy imports, caches): not counted
            cost.clear()
        for path in files[:1] if rounds == 0 else files:
            raw, size, _ = step("decode", decode, path, args.canvas)
            rgb = step("to_rgb8", to_rgb8, raw)
            thumb = step("fov_thumbnail", fov_thumbnail, rgb)
            fov = step("fov_decisions", fov_from_thumbnail, thumb, rgb.shape[1::-1])
            canvas, lb = step("letterbox", letterbox, rgb, fov.box, args.canvas, size)
            step("quality", image_quality, rgb, fov.mask, (canvas, lb.source_box))
            masked = step("threshold_in_fov", threshold_in_fov, canvas_map, lb, fov.mask, 0.45)
            step("measure_empty", measure_mask, np.zeros_like(masked.mask), masked.fov)
            data = step("png_1bit", encode_mask, masked.mask)
            step("write_atomic", write_atomic, out / path.with_suffix(".png").name, data)
    n = args.repeat * len(files)
    for name, seconds in cost.items():
        print(f"{name:18s} {1000 * seconds / n:7.3f} ms")
    print(f"{'total':18s} {1000 * sum(cost.values()) / n:7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
