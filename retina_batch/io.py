"""Finding, pairing, decoding and writing image files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".pnm", ".gif"}
)

# Annotation files are named after their photograph plus a marker: DRIVE `21_manual1.gif` for
# `21_training.tif`, STARE `im0001.ah.ppm`, CHASE_DB1 `Image_01L_1stHO.png`, HRF `01_h.tif` with
# `01_h.tif` in another folder. Stripping these markers from both names gives the pairing key.
_MARKERS = re.compile(
    r"(_manual\d?|_1stHO|_2ndHO|\.ah|\.vk|_mask|_gt|_label|_labels|_vessels?|_seg"
    r"|_training|_test)$",
    re.IGNORECASE,
)


def pair_key(path: str | os.PathLike) -> str:
    """The stem of an image or mask file with annotation markers removed, lower-cased."""
    stem = Path(path).name
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    while True:
        shorter = _MARKERS.sub("", stem)
        if shorter == stem or not shorter:
            return stem.lower()
        stem = shorter


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files ignored)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def read_image(path: str | os.PathLike, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Decode any supported file with OpenCV; raises ValueError with a reason on failure.

    np.fromfile + imdecode rather than imread: works with non-ASCII paths, and an empty or
    unreadable file gives one clear error instead of a silent None. A JPEG comes out in its
    displayed orientation (EXIF), like every other decode here (see `decode`).
    """
    data = _read_bytes(path)
    header = jpeg_header(data)
    return _decoded(data, flags, header[1] if header else 1)


def _read_bytes(path: str | os.PathLike) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ValueError("empty file (0 bytes)")
    return data


def _decoded(data: np.ndarray, flags: int, orientation: int) -> np.ndarray:
    # OpenCV applies EXIF orientation for some flags and not for others (never for
    # IMREAD_UNCHANGED): always ask for the stored pixels and turn them here, one rule for all.
    img = cv2.imdecode(data, flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError("not a readable image (unknown format or corrupt data)")
    return orient(img, orientation)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A ground-truth mask as bool H x W (> 127 in the brightest channel is vessel)."""
    img = read_image(path)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 3:
        img = img.max(axis=2)
    return img > 127


# --- discovery ---------------------------------------------------------------------------

LIST_EXTENSIONS = frozenset({".txt", ".csv", ".lst"})


class InputError(ValueError):
    """The input argument itself is unusable (missing, empty, unreadable list)."""


def _walk(root: Path, exclude: frozenset[Path] = frozenset(),
          ancestors: frozenset[tuple[int, int]] = frozenset()):
    """Image files under root, depth first, sorted at every level: a stable, lazy order.

    Folders in `exclude` (resolved paths: the run's own output folders) are not entered.
    Symbolic links are followed, except one that leads back to a folder being walked (a loop
    would never end): `ancestors` holds the (device, inode) of the folders above, O(depth).
    """
    try:
        st = os.stat(root)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    here = (st.st_dev, st.st_ino)
    if here in ancestors:
        return
    ancestors = ancestors | {here}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = not is_dir and entry.is_file()
        except OSError:  # a link to itself, or a chain too long to follow: not an input
            continue
        if is_dir:
            if not exclude or Path(entry.path).resolve() not in exclude:
                yield from _walk(Path(entry.path), exclude, ancestors)
        elif is_file and is_image_file(entry.name):
            yield Path(entry.path)


def _read_list(list_file: Path) -> list[Path]:
    """Paths from a text list (one per line) or a CSV (a `path` column, else the first one)."""
    import csv

    with open(list_file, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip() and not r[0].startswith("#")]
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index("path")
        rows = rows[1:]
    else:
        column = 0
    base = list_file.parent
    return [(base / r[column].strip()) if not Path(r[column].strip()).is_absolute()
            else Path(r[column].strip()) for r in rows if len(r) > column]


def discover(source: str | os.PathLike, exclude=()):
    """(path, relative output path) for every image of a directory tree, image or list file.

    Relative paths mirror the input tree; for a list file they are relative to the list's
    folder (absolute entries outside it keep their full path below the output folder).
    Folders in `exclude` are skipped when walking a tree, so `segment images --out
    images/masks` does not segment its own masks on the next run.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    if source.is_dir():
        skip = frozenset(Path(d).resolve() for d in exclude)
        return ((p, p.relative_to(source)) for p in _walk(source, skip))
    if source.suffix.lower() in LIST_EXTENSIONS:
        base = source.parent.resolve()

        def relative(p: Path) -> Path:
            resolved = p.resolve()
            return (resolved.relative_to(base) if resolved.is_relative_to(base)
                    else Path(*resolved.parts[1:]))

        return ((p, relative(p)) for p in _read_list(source))
    if is_image_file(source):
        return iter([(source, Path(source.name))])
    raise InputError(f"{source}: not a folder, an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                     f"or a list of paths ({', '.join(sorted(LIST_EXTENSIONS))})")


def count_images(source: str | os.PathLike, exclude=()) -> int:
    """How many images `discover` will yield (a cheap walk, for progress bars)."""
    return sum(1 for _ in discover(source, exclude))


def _is_fov_file(path: Path) -> bool:
    return Path(path).stem.lower().endswith("_mask")


def index_by_key(folder: str | os.PathLike | None, fov: bool = False) -> dict[str, Path]:
    """Image files of a folder tree by pairing key ({} for None): ground truth, FOV masks,
    probability maps to pair with the images of a run.

    DRIVE-style folders can hold both `21_manual1.gif` (vessels) and `21_training_mask.gif`
    (field of view), which share the key "21": ground truth prefers the vessel annotation and
    FOV masks (`fov=True`) prefer the `_mask` file, whatever the sort order.
    """
    if folder is None:
        return {}
    index: dict[str, Path] = {}
    for p, _ in discover(folder):
        key = pair_key(p)
        held = index.get(key)
        if held is None or (_is_fov_file(p) == fov and _is_fov_file(held) != fov):
            index[key] = p
    return index


# --- decoding ----------------------------------------------------------------------------

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_EXIF_ORIENTATION_TAG = 0x0112


class JpegHeader(NamedTuple):
    size: tuple[int, int]  # (width, height) as stored
    orientation: int  # EXIF 1-8; 1 (as stored) when there is no tag
    frame: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...
    components: int  # 1 grey, 3 colour, 4 CMYK


def jpeg_header(data: np.ndarray) -> JpegHeader | None:
    """A JPEG's frame header and EXIF orientation, without decoding; None if not a JPEG."""
    buf = data[: 1 << 20].tobytes()  # headers (EXIF thumbnails included) fit in 1 MiB
    if buf[:2] != b"\xff\xd8":
        return None
    i, orientation = 2, 1
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            i += 1
            continue
        marker = buf[i + 1]
        if marker in _JPEG_SOF:
            height, width = int.from_bytes(buf[i + 5:i + 7], "big"), \
                int.from_bytes(buf[i + 7:i + 9], "big")
            return JpegHeader((width, height), orientation, marker, buf[i + 9])
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(buf[i + 2:i + 4], "big")
        if marker == 0xE1 and buf[i + 4:i + 10] == b"Exif\0\0":
            orientation = _exif_orientation(buf[i + 10:i + 2 + length])
        i += 2 + length
    return None


def jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) as stored in a JPEG's frame header; None if not a JPEG."""
    header = jpeg_header(data)
    return header[0] if header else None


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of IFD0 of an EXIF block (a little TIFF file); 1 if absent/odd."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == _EXIF_ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)  # SHORT, left-justified
            return value if 1 <= value <= 8 else 1
    return 1


# EXIF orientation -> the operation that turns the stored pixels into what a viewer shows.
_ORIENT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.flip(cv2.transpose(a), -1),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels -> displayed pixels for an EXIF orientation (1-8)."""
    turn = _ORIENT.get(orientation)
    return turn(img) if turn else img


def displayed_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) a viewer shows: orientations 5-8 turn the picture by 90 degrees."""
    return stored[::-1] if orientation >= 5 else stored


_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4,
            2: cv2.IMREAD_REDUCED_COLOR_2}


def reduction_for(size: tuple[int, int], working_size: int, margin: float = 1.2) -> int:
    """The largest JPEG DCT scaling (1, 2, 4, 8) that keeps the longer side >= margin * working."""
    longer = max(size)
    for factor in (8, 4, 2):
        if longer / factor >= margin * working_size:
            return factor
    return 1


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes for a device that decodes it (nvJPEG, pixel_work.DevicePixels): the
    host has read the file and its headers, nothing more."""

    data: np.ndarray  # the whole file, uint8
    size: tuple[int, int]  # (width, height): as stored, which is as displayed (orientation 1)

    def decode(self) -> np.ndarray:
        """Decoded on the host as `decode` would: where the device cannot (no nvJPEG, a file
        it refuses). Raises ValueError with a reason for an unreadable file."""
        return _decoded(self.data, cv2.IMREAD_UNCHANGED, 1)


# What a device decoder takes as it is: Huffman-coded baseline, extended and progressive frames
# (nvJPEG's), grey or colour, in stored orientation. Anything else (lossless, arithmetic coding,
# CMYK, EXIF-turned) is decoded on the host, where the rules above already hold.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})


def _device_decodable(header: JpegHeader | None) -> bool:
    return header is not None and header.frame in _DEVICE_FRAMES and \
        header.components in (1, 3) and header.orientation == 1


def decode(path: str | os.PathLike, working_size: int | None = None, keep_jpeg: bool = False):
    """(image as decoded, original (width, height), reduction factor) for one file.

    Large JPEGs are decoded at 1/2, 1/4 or 1/8 size (DCT scaling, several times faster) when
    that still leaves more pixels than the working canvas needs; the original size is kept
    so outputs are written at full size.

    keep_jpeg: a JPEG that a device decoder takes and that would be decoded at full size comes
    back undecoded, as an EncodedJpeg (the GPU decodes it with its batch).

    Orientation rule: a JPEG's EXIF orientation is honoured on both paths, so the image (and
    every output made from it) has the pixels and the width x height that a photo viewer
    shows; other formats are used as stored.
    """
    data = _read_bytes(path)
    header = jpeg_header(data)
    orientation = header[1] if header else 1
    factor = reduction_for(header[0], working_size) if header and working_size else 1
    if keep_jpeg and factor == 1 and _device_decodable(header):
        return EncodedJpeg(data, header.size), header.size, 1
    if factor > 1:
        try:
            img = _decoded(data, _REDUCED[factor], orientation)
        except ValueError:
            img = None  # e.g. a truncated file: the full decode below says why
        if img is not None:
            return img, displayed_size(header[0], orientation), factor
    img = _decoded(data, cv2.IMREAD_UNCHANGED, orientation)
    return img, (img.shape[1], img.shape[0]), 1


# --- writing -----------------------------------------------------------------------------

def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `.NAME.partial` beside the target, then rename over it.

    A crash or kill leaves at most a hidden .partial file (overwritten by the next run that
    writes this image), never a truncated PNG under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:  # disk full, I/O error: the target stays as it was, no debris
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    if not ok:
        raise ValueError(f"could not encode {ext}")
    return buf.tobytes()


# Binary masks as 1-bit greyscale PNG (RLE, fastest zlib level): OpenCV and libpng-based readers
# expand it to 0/255 8-bit, PIL opens it as mode "1". Encoding cost per mask, process CPU on this
# machine (benchmarks/README.md, host cost): 512x512 ~0.5 ms against ~0.8 ms for the 8-bit PNG
# written before, 3504x2336 ~9 ms against ~19 ms; files are also smaller.
MASK_PNG_PARAMS = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1,
                   cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


def read_probability(path: str | os.PathLike) -> np.ndarray:
    """A stored probability map (16-bit PNG from `segment --prob`, or 8-bit as written before
    2026-12-08) as float32 p in [0, 1]."""
    levels = read_image(path)
    if levels.ndim == 3:
        levels = levels.max(axis=2)
    if levels.dtype == np.uint16:
        return levels.astype(np.float32) / 65535
    if levels.dtype == np.uint8:
        return levels.astype(np.float32) / 255
    raise ValueError(f"{Path(path).name}: not an 8- or 16-bit probability map")


def encode_mask(mask: np.ndarray) -> bytes:
    """A 2-D mask (any nonzero value is vessel) as a 1-bit PNG."""
    return encode(".png", mask.astype(np.uint8, copy=False), MASK_PNG_PARAMS)
