"""Where the quality-control thresholds of retina_batch.qc come from.

    python benchmarks/qc_thresholds.py [--data ../shared/data] [--model-check]

1. The three image statistics (qc_brightness, qc_contrast, qc_sharpness) of the 122 real
   photographs in ../shared/data (20 DRIVE, 80 Retina Blood Vessel = the DRIVE photographs
   resized/flipped, 22 LES-AV from another camera) and of synthetic degradations of them: blur
   (Gaussian, sigma in grid pixels), darkening and over-exposure (x gain, clipped), contrast
   loss (towards the mean colour of the field of view). Printed: min / 5th percentile / median
   / max per statistic and condition.
2. With --model-check (minutes): the shipped model on the DRIVE and LES-AV photographs (they
   have manual masks) under every degradation through the real `segment` pipeline: mean Dice
   and predicted vessel density per condition, i.e. which degradations actually hurt the
   segmentation; and the predicted vessel density of all 122 good photographs (the range the
   vessel_density flags are set from).
3. The thresholds in retina_batch.qc.THRESHOLDS and the share of photographs each condition
   gets flagged with them: every good photograph must pass; the degradations that cost Dice
   must be flagged.

Degradations keep the dark rim outside the field of view dark (as in a real hazy or
mis-exposed photograph), so FOV detection sees what it would see in practice.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from retina_batch.io import index_by_key, list_images, pair_key, read_image, read_mask
from retina_batch.measure import GRID
from retina_batch.preprocess import detect_fov, to_rgb8
from retina_batch.qc import THRESHOLDS, image_quality, reasons

STATS = ("qc_brightness", "qc_contrast", "qc_sharpness")
CONDITIONS = [("good", 1.0)] + [("blur", s) for s in (1.0, 1.5, 2.0, 3.0)] \
    + [("dark", g) for g in (0.5, 0.3, 0.2, 0.12)] + [("bright", g) for g in (1.5, 2.0, 3.0)] \
    + [("contrast", c) for c in (0.5, 0.3, 0.2)]


def photographs(data: Path) -> list[tuple[str, Path, Path | None, Path | None]]:
    """(set, photograph, FOV mask or None, manual vessel mask or None) for every photograph."""
    drive, lesav = data / "drive-training", data / "les-av"
    truth = index_by_key(drive / "masks")
    out = [("drive", p, None, truth[pair_key(p)]) for p in list_images(drive / "images")]
    rbv = data / "retina-blood-vessel" / "train"
    out += [("rbv", p, None, rbv / "mask" / p.name) for p in list_images(rbv / "image")]
    fovs, vessels = index_by_key(lesav / "fov", fov=True), index_by_key(lesav / "vessels")
    out += [("les-av", p, fovs[pair_key(p)], vessels[pair_key(p)])
            for p in list_images(lesav / "images")]
    return out


def degrade(rgb: np.ndarray, fov: np.ndarray, kind: str, level: float) -> np.ndarray:
    """One synthetic degradation; `fov` (bool) keeps the rim as it was."""
    if kind == "good":
        return rgb
    if kind == "blur":  # level: sigma on the grid; the photograph is larger by `scale`
        x, y, w, h = cv2.boundingRect(fov.astype(np.uint8))
        return cv2.GaussianBlur(rgb, (0, 0), level * max(w, h) / GRID)
    f = rgb.astype(np.float32)
    if kind in ("dark", "bright"):
        out = f * level
    else:  # contrast: towards the mean colour inside the field of view
        mean = f[fov].mean(axis=0)
        out = np.where(fov[..., None], mean + level * (f - mean), f)
    return np.clip(out, 0, 255).astype(np.uint8)


def fov_of(rgb: np.ndarray, fov_file: Path | None) -> tuple[np.ndarray, bool]:
    if fov_file is not None:
        return read_mask(fov_file), True
    fov = detect_fov(rgb)
    return fov.mask.astype(bool), fov.found


def image_statistics(items) -> dict:
    """{condition: [row of the three statistics and fov_found]} for every photograph."""
    table = {c: [] for c in CONDITIONS}
    for _, path, fov_file, _ in items:
        rgb = to_rgb8(read_image(path))
        fov, _ = fov_of(rgb, fov_file)
        for kind, level in CONDITIONS:
            image = degrade(rgb, fov, kind, level)
            seen, found = fov_of(image, fov_file)  # what the pipeline would see
            table[(kind, level)].append({**image_quality(image, seen), "fov_found": found})
    return table


def model_check(items, table: dict) -> dict:
    """Segment every condition with the shipped model (real pipeline, with truth); adds
    dice and vessel_density to the rows of `table`; returns {condition: mean Dice}."""
    import retina_batch

    dice = {}
    work = Path(tempfile.mkdtemp(prefix="qc-thresholds-"))
    try:
        for kind, level in CONDITIONS:
            rows = _segment_condition(retina_batch, items, kind, level, work)
            for row, stats in zip(rows, table[(kind, level)], strict=True):
                stats.update(vessel_density=row.get("vessel_density"), dice=row.get("dice"))
            scored = [r["dice"] for r in rows if r.get("dice") is not None]
            dice[(kind, level)] = float(np.mean(scored))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dice


def _segment_condition(retina_batch, items, kind, level, work: Path) -> list[dict]:
    """Rows of `segment` for one condition, in the order of `items` (one folder per set, as
    the FOV masks and truth differ per set)."""
    by_name = {}
    for name in ("drive", "rbv", "les-av"):
        chosen = [it for it in items if it[0] == name]
        if not chosen:
            continue
        folder, truth = work / f"{kind}-{level}" / name, work / "truth" / name
        folder.mkdir(parents=True)
        truth.mkdir(parents=True, exist_ok=True)
        for _, path, fov_file, vessel_file in chosen:
            rgb = to_rgb8(read_image(path))
            image = degrade(rgb, fov_of(rgb, fov_file)[0], kind, level)
            cv2.imwrite(str(folder / f"{path.stem}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not (truth / f"{path.stem}.png").exists():
                cv2.imwrite(str(truth / f"{path.stem}.png"),
                            read_mask(vessel_file).astype(np.uint8) * 255)
        fov_dir = fov_file.parent if name == "les-av" else None
        rows = []
        retina_batch.segment(folder, work / "out" / f"{kind}-{level}" / name, truth_dir=truth,
                             fov_dir=fov_dir, on_row=rows.append)
        for row in rows:
            by_name[(name, Path(row["path"]).stem)] = row
    return [by_name[(it[0], it[1].stem)] for it in items]


def describe(values: list) -> str:
    v = np.array([x for x in values if x is not None], float)
    if not v.size:
        return "-"
    return " / ".join(f"{x:.3g}" for x in (v.min(), np.percentile(v, 5), np.median(v), v.max()))


def print_report(table: dict, dice: dict | None) -> None:
    columns = [*STATS] + (["vessel_density"] if dice else [])
    print("statistic per condition: min / 5th percentile / median / max over photographs\n")
    print("| condition | " + " | ".join(columns) + (" | mean Dice" if dice else "")
          + " | flagged | flags |")
    print("|---" * (len(columns) + (3 if dice else 2) + 1) + "|")
    for condition, rows in table.items():
        flagged = [reasons(r, r["fov_found"]) for r in rows]
        counts: dict[str, int] = {}
        for found in flagged:
            for reason in found:
                counts[reason] = counts.get(reason, 0) + 1
        label = condition[0] if condition[0] == "good" else f"{condition[0]} {condition[1]:g}"
        cells = [describe([r.get(c) for r in rows]) for c in columns]
        if dice:
            cells.append(f"{dice[condition]:.3f}")
        share = sum(bool(f) for f in flagged) / len(rows)
        top = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"| {label} | " + " | ".join(cells) + f" | {100 * share:.0f}% | {top} |")
    print("\nthresholds (retina_batch.qc.THRESHOLDS):")
    for name, value in THRESHOLDS.items():
        print(f"  {name}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model-check", action="store_true",
                        help="also segment every condition with the shipped model (minutes)")
    parser.add_argument("--sets", default="drive,rbv,les-av",
                        help="which photograph sets, comma-separated")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"no data folder {args.data}")
    wanted = set(args.sets.split(","))
    items = [it for it in photographs(args.data) if it[0] in wanted]
    print(f"{len(items)} photographs ({', '.join(sorted(wanted))}), "
          f"{len(CONDITIONS) - 1} degradations\n")
    table = image_statistics(items)
    dice = model_check(items, table) if args.model_check else None
    print_report(table, dice)


if __name__ == "__main__":
    main()
