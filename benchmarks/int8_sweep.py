"""Which int8 quantisation settings keep the masks and gain speed: one factor at a time.

Starting from a base setting (retina_batch.quantize.Settings()), each run changes one factor:
calibration method (minmax / entropy / percentile), the operator types that get Q/DQ,
per-channel weights, int8 (symmetric, TensorRT's) or uint8 (asymmetric) activations, how many
of the first and last convolutions stay float, and the number of calibration photographs. For
every setting it prints and records:

    dice_min / dice_mean    int8 masks vs fp32 masks on the card's validation photographs
    other_dice_min          the same on photographs of another camera (LES-AV), never seen
    max_diff                largest |probability difference| vs fp32 on those photographs
    truth_dice              mean Dice vs the manual annotation, whole image (fp32 alongside)
    ms_int8 / ms_fp32       ONNX Runtime CPU, the backend's session options, batch 2, mean
                            over rounds that alternate the two models batch by batch
    cpu_ms_int8 / _fp32     the same in process CPU time (all threads): on a shared machine
                            the steadier figure, it counts work, not waiting

Calibration uses the card's training photographs, prepared as `segment` prepares them.

    python benchmarks/int8_sweep.py --json benchmarks/results/<date>-int8-sweep.json
    python benchmarks/int8_sweep.py --setting '{"float_first": 4}' --setting '{...}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from retina_batch.backends.base import default_model
from retina_batch.backends.onnxruntime import session_options
from retina_batch.bench import contention, machine_info
from retina_batch.card import card_pairs, card_photographs, load_card
from retina_batch.export import compare, prepare_photographs, run_onnx
from retina_batch.io import list_images, read_image, read_mask
from retina_batch.metrics import Confusion, scores
from retina_batch.preprocess import prepare, to_rgb8, unletterbox
from retina_batch.quantize import (
    ACTIVATIONS,
    METHODS,
    Settings,
    quantize_graph,
)

OTHER_CAMERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "les-av" / "images"


ALL_OPS = ("Conv", "ConvTranspose", "MaxPool", "Add", "Mul", "Concat", "Sigmoid")


def variations(base: Settings, counts: list[int]) -> list[Settings]:
    """The base, then each factor changed on its own."""
    out = [base]
    out += [replace(base, method=m) for m in METHODS]
    out += [replace(base, ops=o) for o in (("Conv",), ("Conv", "ConvTranspose"),
                                           ("Conv", "ConvTranspose", "MaxPool"), ALL_OPS)]
    out += [replace(base, per_channel=not base.per_channel)]
    out += [replace(base, activations=a) for a in ACTIVATIONS]
    out += [replace(base, float_first=n) for n in (0, 1, 2, 3, 4)]
    out += [replace(base, float_last=n) for n in (0, 1)]
    out += [replace(base, float_first=0, float_last=0, activations=a) for a in ACTIVATIONS]
    out += [replace(base, calibration_images=n) for n in counts]
    out += [replace(base, float_gates=not base.float_gates)]
    unique = []
    for s in out:
        if s not in unique:
            unique.append(s)
    return unique


class Photos:
    """Prepared canvases with what is needed to score them on the original grid."""

    def __init__(self, files: list[Path], size: int, truths: list[Path] | None = None):
        self.canvases, self.boxes, self.fovs, self.truths = [], [], [], []
        for path, truth in zip(files, truths or [None] * len(files), strict=True):
            canvas, box, fov = prepare(to_rgb8(read_image(path)), size)
            self.canvases.append(canvas)
            self.boxes.append(box)
            self.fovs.append(fov.mask)
            self.truths.append(read_mask(truth) if truth and truth.exists() else None)
        self.canvases = np.stack(self.canvases)

    def truth_dice(self, probs: np.ndarray, threshold: float) -> float | None:
        dices = [scores(Confusion.of(unletterbox(p, box) * fov >= threshold, truth))["dice"]
                 for p, box, fov, truth in zip(probs, self.boxes, self.fovs, self.truths,
                                               strict=True) if truth is not None]
        return round(statistics.fmean(dices), 5) if dices else None


def session(path: Path):
    """An ONNX Runtime session with the segment backend's options (all cores, no spinning)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(ort, os.cpu_count() or 1),
                                providers=["CPUExecutionProvider"])


def timed_pair(fp32: Path, int8: Path, images: np.ndarray, rounds: int,
               batch: int = 2) -> dict:
    """ms per image of fp32 and int8, wall clock and process CPU time, alternating the two
    models batch by batch, so a change in the machine's load hits both alike. On a shared
    machine the CPU time is the steadier figure: it counts the work, not the waiting."""
    sessions = {"fp32": session(fp32), "int8": session(int8)}
    wall, cpu = dict.fromkeys(sessions, 0.0), dict.fromkeys(sessions, 0.0)
    for s in sessions.values():
        s.run(None, {"images": images[:batch]})  # first-call allocations
    for _ in range(rounds):
        for i in range(0, len(images), batch):
            for name, s in sessions.items():
                w, c = time.perf_counter(), time.process_time()
                s.run(None, {"images": images[i:i + batch]})
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c
    n = rounds * len(images)
    out = {f"{kind}_{name}": round(1000 * table[name] / n, 1)
           for kind, table in (("ms", wall), ("cpu_ms", cpu)) for name in sessions}
    out["speedup"] = round(wall["fp32"] / wall["int8"], 3)
    out["cpu_speedup"] = round(cpu["fp32"] / cpu["int8"], 3)
    return out


def calibrated(s: Settings, calibration: np.ndarray, fp32: Path, work: Path) -> Path:
    """The ranges of every activation any setting quantises, for this method and these
    images: computed once (a histogram calibration takes minutes), reused by the others."""
    cache = work / f"ranges-{s.method}-{s.percentile}-{s.calibration_images}.json"
    if not cache.exists():
        quantize_graph(fp32, work / "throwaway.onnx", calibration,
                       replace(s, ops=ALL_OPS, float_first=0, float_last=0), cache=cache)
    return cache


def measure(s: Settings, fp32: Path, card: dict, val: Photos, other: Photos | None,
            references: dict, work: Path, rounds: int) -> dict:
    threshold = float(card["threshold"])
    calibration, used = prepare_photographs(card_photographs(card, "train"), card["working_size"],
                                            s.calibration_images)
    out = work / "int8.onnx"
    start = time.perf_counter()
    quantize_graph(fp32, out, calibration, s, cache=calibrated(s, calibration, fp32, work))
    seconds = time.perf_counter() - start
    probs = run_onnx(out, val.canvases)
    parity = compare(references["val"], probs, threshold)
    row = {"settings": s.describe(), "calibration_files": len(used),
           "quantise_s": round(seconds, 1), "dice_min": parity["mask_dice_min"],
           "dice_mean": parity["mask_dice"], "max_diff": round(parity["max_abs_diff"], 4),
           "mean_diff": round(parity["mean_abs_diff"], 5),
           "truth_dice": val.truth_dice(probs, threshold),
           "truth_dice_fp32": references["truth_dice"]}
    if other is not None:
        row["other_dice_min"] = compare(references["other"], run_onnx(out, other.canvases),
                                        threshold)["mask_dice_min"]
    row.update(timed_pair(fp32, out, val.canvases[:8], rounds))
    return row


def label(s: Settings) -> str:
    ops = "+".join("ConvT" if o == "ConvTranspose" else o for o in s.ops)
    return (f"{s.method}, {ops}, {'per-channel' if s.per_channel else 'per-tensor'}, "
            f"{s.activations}, float {s.float_first}+{s.float_last}"
            f"{' + gates' if s.float_gates else ''}, "
            f"{s.calibration_images} img")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--counts", default="4,16,32",
                        help="calibration image counts to try (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per setting")
    parser.add_argument("--only-base", action="store_true", help="measure the base only")
    parser.add_argument("--setting", action="append", type=json.loads, metavar="JSON",
                        help='measure only these settings, each the base with changes, e.g. '
                             '\'{"method": "percentile", "float_first": 4}\' (repeatable)')
    parser.add_argument("--no-other-camera", action="store_true",
                        help="skip the LES-AV parity (22 more photographs per setting)")
    parser.add_argument("--work", type=Path,
                        help="keep calibrated ranges here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    card = load_card(args.model)
    size = int(card["working_size"])
    pairs = card_pairs(card, "val")
    val_files = [image for image, _, _ in pairs]
    if not val_files:
        print(f"validation photographs not found in {card['training']['data']}", file=sys.stderr)
        return 2
    val = Photos(val_files, size, [mask for _, mask, _ in pairs])
    other = Photos(list_images(OTHER_CAMERA), size) \
        if OTHER_CAMERA.is_dir() and not args.no_other_camera else None
    references = {"val": run_onnx(args.model, val.canvases),
                  "other": run_onnx(args.model, other.canvases) if other else None}
    references["truth_dice"] = val.truth_dice(references["val"], float(card["threshold"]))
    counts = [int(c) for c in args.counts.split(",") if c]
    if args.setting:
        settings = [replace(Settings(), **{k: tuple(v) if k == "ops" else v
                                           for k, v in change.items()})
                    for change in args.setting]
    else:
        settings = [Settings()] if args.only_base else variations(Settings(), counts)
    record = {"model": str(args.model), "model_sha256": card["sha256"],
              "validation": f"{len(val_files)} files from {val_files[0].parent}",
              "other_camera": f"{len(other.canvases)} from {OTHER_CAMERA}" if other else None,
              "machine": machine_info(), "contention_before": contention(), "rows": []}
    print(f"load {record['contention_before']['load_average']}; fp32 truth Dice "
          f"{references['truth_dice']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="int8-sweep-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for s in settings:
            row = measure(s, args.model, card, val, other, references, work, args.rounds)
            row["load"] = os.getloadavg()[0]
            record["rows"].append(row)
            print(json.dumps({"setting": label(s), **{k: v for k, v in row.items()
                                                      if k != "settings"}}), flush=True)
    record["contention_after"] = contention()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record)
    return 0


def print_table(record: dict) -> None:
    print("| setting | mask Dice vs fp32 (min / mean) | other camera (min) | max diff | "
          "truth Dice int8 (fp32) | ms/img int8 / fp32 | speed-up | CPU ms/img int8 / fp32 | "
          "CPU speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in record["rows"]:
        s = Settings(**{k: tuple(v) if k == "ops" else v for k, v in r["settings"].items()
                        if k in Settings.__dataclass_fields__})
        print(f"| {label(s)} | {r['dice_min']:.4f} / {r['dice_mean']:.4f} | "
              f"{r.get('other_dice_min', float('nan')):.4f} | {r['max_diff']:.3f} | "
              f"{r['truth_dice']:.4f} ({r['truth_dice_fp32']:.4f}) | "
              f"{r['ms_int8']:.0f} / {r['ms_fp32']:.0f} | {r['speedup']:.2f}x | "
              f"{r['cpu_ms_int8']:.0f} / {r['cpu_ms_fp32']:.0f} | {r['cpu_speedup']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
