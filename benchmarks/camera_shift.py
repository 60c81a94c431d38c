"""Labelled photographs re-rendered as other cameras frame and light them, scored through the
real `segment` pipeline: what the pipeline and model lose when only the camera changes.

Each photograph of a data folder (images + vessel masks, paired as `train` pairs them) is also
written as:

- grey-rim: everything outside its FOV replaced by grainy grey (mean 30, sd 6), as scanned film
  and some JPEG cameras give it, where our training cameras have a black rim;
- dim-edge: brightness falling to 30 % at the FOV's edge (vignetting, uneven illumination);
- cut-70: the FOV cut at top and bottom to 70 % of its height (cameras whose circle is wider
  than the sensor), scored against the original's mask on the same rows.

The FOV is the folder's own mask (`fov/N_mask.*`, LES-AV) or the one detected on the
original. Each version goes through `retina_batch.segment` (default settings, one backend)
and is scored whole-image against its re-rendered truth. Prints mean Dice per version, the
original's beside it, and on how many photographs the version is lower.

    python benchmarks/camera_shift.py MODEL FOLDER [--stems 8,16,24,76] [--backend torch]
        [--work DIR] [--json out.json]

MODEL is a .pt checkpoint (with --backend torch) or an .onnx model. To measure an older
checkout's pipeline on the same inputs, run this file with PYTHONPATH set to that checkout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

import retina_batch
from retina_batch.io import index_by_key, read_image, read_mask
from retina_batch.metrics import Confusion, scores
from retina_batch.preprocess import detect_fov, to_rgb8
from retina_batch.synth import dim_edge, grey_rim
from retina_batch.training.dataset import find_pairs

SHIFTS = ("original", "grey-rim", "dim-edge", "cut-70")


def fov_of(folder: Path, key: str, rgb: np.ndarray) -> np.ndarray:
    mask = index_by_key(folder / "fov" if (folder / "fov").is_dir() else None, fov=True).get(key)
    return read_mask(mask).astype(bool) if mask else detect_fov(rgb).mask.astype(bool)


def cut_rows(fov: np.ndarray, keep: float = 0.70) -> slice:
    rows = np.flatnonzero(fov.any(axis=1))
    height = rows[-1] + 1 - rows[0]
    top = rows[0] + (height - int(keep * height)) // 2
    return slice(top, top + int(keep * height))


def shifted(rgb: np.ndarray, truth: np.ndarray, fov: np.ndarray, shift: str, seed: int):
    """(RGB image, truth) of one photograph as `shift` renders it."""
    if shift == "grey-rim":
        return grey_rim(rgb, fov, seed=seed), truth
    if shift == "dim-edge":
        return dim_edge(rgb, fov), truth
    if shift == "cut-70":
        rows = cut_rows(fov)
        return rgb[rows], truth[rows]
    return rgb, truth


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return scores(Confusion.of(mask, truth))["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--stems", help="only these photographs (comma-separated keys)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--work", type=Path, help="where the versions and masks go (kept)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    pairs = find_pairs(args.folder)
    if args.stems:
        wanted = set(args.stems.split(","))
        pairs = [p for p in pairs if p.key in wanted]
    if not pairs:
        raise SystemExit(f"error: no labelled photograph in {args.folder}"
                         + (f" among --stems {args.stems}" if args.stems else ""))
    work = args.work or Path(tempfile.mkdtemp(prefix="camera-shift-"))
    cuts = {}
    for seed, pair in enumerate(pairs):
        rgb = to_rgb8(read_image(pair.image))
        truth = read_mask(pair.mask).astype(bool)
        fov = fov_of(args.folder, pair.key, rgb)
        cuts[pair.key] = cut_rows(fov)
        for shift in SHIFTS:
            image, target = shifted(rgb, truth, fov, shift, seed)
            for kind, pixels in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)),
                                 ("truth", target.astype(np.uint8) * 255)):
                (work / shift / kind).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(work / shift / kind / f"{pair.key}.png"), pixels)

    scores: dict[str, dict[str, float]] = {}
    for shift in SHIFTS:
        retina_batch.segment(work / shift / "images", work / shift / "masks", model=args.model,
                             backend=args.backend, overwrite=True)
        for pair in pairs:
            mask = read_mask(work / shift / "masks" / f"{pair.key}.png").astype(bool)
            truth = read_mask(work / shift / "truth" / f"{pair.key}.png").astype(bool)
            scores.setdefault(pair.key, {})[shift] = dice(mask, truth)
    for pair in pairs:  # the original's mask, scored on the rows cut-70 keeps
        rows = cuts[pair.key]
        mask = read_mask(work / "original" / "masks" / f"{pair.key}.png").astype(bool)
        truth = read_mask(work / "original" / "truth" / f"{pair.key}.png").astype(bool)
        scores[pair.key]["original, cut-70 rows"] = dice(mask[rows], truth[rows])

    rows = []
    print(f"{args.model} on {len(pairs)} photographs of {args.folder}")
    print(f"{'version':10s} {'Dice':>7s} {'original':>9s} {'change':>8s}  lower on")
    for shift in SHIFTS[1:]:
        base = "original, cut-70 rows" if shift == "cut-70" else "original"
        got = np.array([s[shift] for s in scores.values()])
        ref = np.array([s[base] for s in scores.values()])
        rows.append({"shift": shift, "dice": float(got.mean()), "reference": float(ref.mean()),
                     "lower": int((got < ref).sum()), "photographs": len(got)})
        print(f"{shift:10s} {got.mean():7.4f} {ref.mean():9.4f} {got.mean() - ref.mean():+8.4f}"
              f"  {(got < ref).sum()} of {len(got)}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "folder": str(args.folder),
                                         "summary": rows, "per_photograph": scores}, indent=1))


if __name__ == "__main__":
    main()
