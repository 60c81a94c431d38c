"""Finding image/mask pairs, grouping them by source photograph, and loading them for training.

Pairing rule: an image and a mask pair when their `pair_key`s are equal (file stem with
annotation markers such as `_training`, `_manual1`, `_1stHO`, `.ah`, `_mask` removed, compared
case-insensitively). Layouts understood (DATA_DIR or DATA_DIR/train):
  image/ + mask/     (Retina Blood Vessel: `image/N.png` with `mask/N.png`)
  images/ + masks/   (DRIVE: `images/21_training.tif` with `masks/21_manual1.gif`)
  images/ + vessels/ (LES-AV: `images/N.png` with `vessels/N.png`)
  also `1st_manual/` or `manual/` for masks.

Several data folders train one model (one per camera, say): each is a `Dataset` with its own
pairing and its own grouping rule, and its keys are prefixed with its name so that `1.png` of
one camera never collides with `1.png` of another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..io import list_images, pair_key, read_image, read_mask
from ..preprocess import FieldOfView, Letterbox, letterbox, prepare, to_rgb8

IMAGE_DIRS = ("image", "images", "img", "imgs")
MASK_DIRS = ("mask", "masks", "1st_manual", "manual", "label", "labels", "vessels")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message says why and what to fix."""


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path
    key: str


def _find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def find_pairs(data_dir: str | Path) -> list[Pair]:
    """All image/mask pairs under `data_dir`; raises DatasetError listing anything unpaired."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    for candidate in (root, root / "train", root / "training"):
        images, masks = _find_dir(candidate, IMAGE_DIRS), _find_dir(candidate, MASK_DIRS)
        if images and masks:
            break
    else:
        raise DatasetError(
            f"{root}: expected an image folder ({'/'.join(IMAGE_DIRS)}) beside a mask folder "
            f"({'/'.join(MASK_DIRS)}), directly or under train/")
    image_by_key = {pair_key(p): p for p in list_images(images)}
    mask_by_key = {pair_key(p): p for p in list_images(masks)}
    lonely_images = sorted(image_by_key.keys() - mask_by_key.keys())
    lonely_masks = sorted(mask_by_key.keys() - image_by_key.keys())
    if lonely_images or lonely_masks:
        def show(keys, table):
            names = [table[k].name for k in keys[:10]]
            return ", ".join(names) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
        problems = []
        if lonely_images:
            problems.append(f"images without a mask: {show(lonely_images, image_by_key)}")
        if lonely_masks:
            problems.append(f"masks without an image: {show(lonely_masks, mask_by_key)}")
        raise DatasetError(f"{root}: could not pair every file ({'; '.join(problems)}). "
                           "Images and masks pair by file stem without markers like "
                           "_training/_manual1/_mask.")
    if not image_by_key:
        raise DatasetError(f"{root}: no images found in {images}")
    return [Pair(image_by_key[k], mask_by_key[k], k) for k in sorted(image_by_key, key=_natural)]


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def group_of(key: str, rule: str) -> str:
    """Which source photograph a file comes from, by a `--group` rule.

    stem        every file is its own photograph
    div:K       int(key) // K (the Retina Blood Vessel set stores 4 copies per photograph)
    regex:PAT   the first capture group of PAT matched against the key
    """
    if rule == "stem":
        return key
    if rule.startswith("div:"):
        return str(int(key) // int(rule[4:]))
    if rule.startswith("regex:"):
        match = re.search(rule[6:], key)
        if not match:
            raise DatasetError(f"group rule {rule!r} does not match file {key!r}")
        return match.group(1) if match.groups() else match.group(0)
    raise DatasetError(f"unknown group rule {rule!r} (use auto, stem, div:K or regex:PATTERN)")


def resolve_group_rule(rule: str, pairs: list[Pair]) -> str:
    """`auto`: div:4 for the Retina Blood Vessel layout, else stem.

    That set names its files 0..N-1 with four copies (flips, rotation) of each photograph in a
    row; DRIVE's numbers (21..40, 01..20) are independent photographs and must stay `stem`.
    """
    if rule != "auto":
        return rule
    keys = sorted(int(p.key) for p in pairs) if all(p.key.isdigit() for p in pairs) else []
    copies_of_four = bool(keys) and keys == list(range(len(keys))) and len(keys) % 4 == 0
    return "div:4" if copies_of_four else "stem"


def split_by_group(pairs: list[Pair], rule: str, val_fraction: float, seed: int):
    """(train, val) with every photograph's copies on one side; val gets >= 1 photograph."""
    groups = sorted({group_of(p.key, rule) for p in pairs}, key=_natural)
    if val_fraction <= 0:
        return pairs, []
    if len(groups) < 2:
        raise DatasetError("need at least two source photographs to make a validation split")
    rng = np.random.default_rng(seed)
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(rng.permutation(groups)[:n_val].tolist())
    train = [p for p in pairs if group_of(p.key, rule) not in val_groups]
    val = [p for p in pairs if group_of(p.key, rule) in val_groups]
    return train, val


@dataclass(frozen=True)
class Dataset:
    """One data folder: its photographs, how they group, and the licence it comes with."""

    name: str
    root: Path
    pairs: list[Pair]
    group_rule: str
    licence: str


def dataset_name(root: Path) -> str:
    """`les-av` for ../les-av, `retina-blood-vessel` for ../retina-blood-vessel/train."""
    root = root.resolve()
    return root.parent.name if root.name.lower() in ("train", "training") else root.name


def licence_of(root: Path) -> str:
    """The data folder's licence file, quoted in the model card (a model trained on data with a
    research-only licence must say so); where there is none, the card says that instead."""
    for folder in (root, root.parent):
        for path in sorted(folder.glob("LICEN[CS]E*")):
            text = " ".join(path.read_text(errors="replace").split())
            return f"{path.name}: {text[:600]}"
    return "no licence file in the data folder; check the source's terms"


def open_datasets(data_dirs: list[str | Path], group: str = "auto") -> list[Dataset]:
    """Each folder paired and grouped on its own (`auto` is resolved per folder)."""
    datasets, names = [], set()
    for data_dir in data_dirs:
        root = Path(data_dir)
        pairs = find_pairs(root)
        name = dataset_name(root)
        while name in names:  # two folders with the same name: keep both apart
            name += "+"
        names.add(name)
        datasets.append(Dataset(name, root, pairs, resolve_group_rule(group, pairs),
                                licence_of(root)))
    return datasets


@dataclass
class Sample:
    """One photograph on the working canvas, ready for augmentation or validation."""

    key: str
    image: np.ndarray  # canvas x canvas x 3 uint8 RGB
    target: np.ndarray  # canvas x canvas float32 in [0, 1]
    fov: np.ndarray  # canvas x canvas uint8 0/1
    letterbox: Letterbox
    truth: np.ndarray  # original-size bool mask, for scoring in the original pixel grid
    dataset: str = ""


def load_sample(pair: Pair, canvas: int, dataset: str = "") -> Sample:
    rgb = to_rgb8(read_image(pair.image))
    truth = read_mask(pair.mask)
    if truth.shape != rgb.shape[:2]:
        raise DatasetError(f"{pair.mask.name}: mask is {truth.shape[1]}x{truth.shape[0]} but "
                           f"{pair.image.name} is {rgb.shape[1]}x{rgb.shape[0]}")
    image, lb, fov = prepare(rgb, canvas)
    target, _ = letterbox(truth.astype(np.float32), fov.box, canvas)
    fov_canvas, _ = letterbox(fov.mask, fov.box, canvas, interpolation=cv2.INTER_NEAREST)
    key = f"{dataset}/{pair.key}" if dataset else pair.key
    return Sample(key, image, np.clip(target, 0, 1), fov_canvas, lb, truth, dataset)


__all__ = ["Pair", "Sample", "Dataset", "DatasetError", "FieldOfView", "find_pairs", "group_of",
           "resolve_group_rule", "split_by_group", "load_sample", "open_datasets"]
