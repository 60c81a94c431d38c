"""How close are synthetic photographs to real ones where it costs time? Bytes per image, decode
time, and the vessel fraction the default model predicts, at the same size and format.

Real: the 512x512 PNGs of ../shared/data/retina-blood-vessel (DRIVE resized), as stored and
re-encoded as JPEG at the quality synth uses. Synthetic: `retina-batch synth` output at 512x512,
PNG and JPEG. Usage:

    python benchmarks/synth_vs_real.py --images 16 --json benchmarks/results/synth-vs-real.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from retina_batch.bench import contention
from retina_batch.pipeline import segment
from retina_batch.synth import write_synthetic

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "retina-blood-vessel" / "train"


def decode_ms(paths: list[Path], rounds: int = 3) -> float:
    """Median over files of the best-of-`rounds` decode time (page cache warm)."""
    cv2.setNumThreads(1)
    times = []
    for p in paths:
        data = np.fromfile(str(p), np.uint8)
        best = min(_timed_decode(data) for _ in range(rounds))
        times.append(best)
    return round(1000 * statistics.median(times), 2)


def _timed_decode(data: np.ndarray) -> float:
    start = time.perf_counter()
    cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return time.perf_counter() - start


def describe(folder: Path, out: Path) -> dict:
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    rows: list[dict] = []
    segment(folder, out, write=False, on_row=rows.append, batch_size=4)
    fractions = [r["vessel_fraction"] for r in rows if r.get("status") == "ok"]
    return {"images": len(paths),
            "kilobytes_per_image": round(statistics.fmean(p.stat().st_size for p in paths) / 1000,
                                         1),
            "decode_ms_median": decode_ms(paths),
            "predicted_vessel_fraction_mean": round(statistics.fmean(fractions), 4),
            "predicted_vessel_fraction_range": [round(min(fractions), 4),
                                                round(max(fractions), 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--quality", type=int, default=92)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    real = sorted((REAL / "image").glob("*.png"), key=lambda p: int(p.stem))
    real = real[::4][: args.images]  # one of the four copies of each source photograph
    from retina_batch.backends.base import default_model
    from retina_batch.card import load_card

    card = load_card(default_model())
    result = {"contention": contention(), "quality": args.quality,
              "model": {"name": card.get("name"), "sha256": card.get("sha256")}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for p in real:
            (tmp / "real_png").mkdir(exist_ok=True)
            (tmp / "real_png" / p.name).write_bytes(p.read_bytes())
            (tmp / "real_jpg").mkdir(exist_ok=True)
            ok, buf = cv2.imencode(".jpg", cv2.imread(str(p)),
                                   [cv2.IMWRITE_JPEG_QUALITY, args.quality])
            (tmp / "real_jpg" / f"{p.stem}.jpg").write_bytes(buf.tobytes())
        write_synthetic(tmp / "synth_png", len(real), (512, 512), "png")
        write_synthetic(tmp / "synth_jpg", len(real), (512, 512), "jpg", quality=args.quality)
        for name in ("real_png", "synth_png", "real_jpg", "synth_jpg"):
            result[name] = describe(tmp / name, tmp / f"out_{name}")
            print(name, json.dumps(result[name]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
