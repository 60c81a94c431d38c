"""Where the output pixels land: reduced JPEG decoding at awkward sizes, EXIF orientation, and
the field of view, checked on the masks a user gets from `segment`.

The model is `channel_model`'s (probability = red / 255), so the right mask is known: the
photograph's red channel >= 128 inside the FOV, at the photograph's displayed size.

Orientation rule (io.decode): a JPEG's EXIF orientation is honoured whether the file is decoded
at full or at reduced size, so every output has the pixels and the width x height that a photo
viewer shows; other formats are used as stored.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from channel_model import write_channel_onnx

import retina_batch
from retina_batch.io import decode, reduction_for

SIZE = 64  # the channel model's canvas: JPEGs longer than 1.2 x 64 x 8 px decode at 1/8


@pytest.fixture(scope="module")
def red_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnx", reason="writing the test model needs the onnx package")
    return write_channel_onnx(tmp_path_factory.mktemp("channel-model"), SIZE)


def diagonal_fundus(width: int, height: int) -> np.ndarray:
    """BGR: a disc on black whose red channel ramps along both axes (the mask's edge is a
    diagonal line, so any flip or turn of the picture moves it)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 2] = (255 * (xx / width + 0.6 * yy / height) / 1.6).astype(np.uint8)
    img[..., 1] = 150
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 <= (0.45 * min(width, height)) ** 2
    img[~disc] = 0
    return img


def jpeg_bytes(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 EXIF segment holding only an Orientation tag (what a camera held
    sideways writes), inserted after the SOI marker."""
    tiff = (b"MM\x00\x2a" + (8).to_bytes(4, "big")  # big-endian TIFF header, IFD0 at 8
            + (1).to_bytes(2, "big")  # one entry: tag 0x0112 Orientation, SHORT, count 1
            + (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
            + orientation.to_bytes(2, "big") + b"\0\0" + (0).to_bytes(4, "big"))
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


# How a camera stores a picture it tags with each orientation: the inverse of what a viewer
# does to display it (EXIF 2.3, tag 0x0112; written out here independently of io.py).
STORE = {
    1: lambda a: a,
    3: lambda a: a[::-1, ::-1],  # viewer rotates 180
    6: lambda a: np.rot90(a, 1),  # viewer rotates 90 clockwise: stored turned anticlockwise
    8: lambda a: np.rot90(a, -1),  # viewer rotates 90 anticlockwise
    5: lambda a: a.swapaxes(0, 1),  # viewer transposes
}


def segment_masks(model: Path, folder: Path, out: Path, reduced: bool, **options) -> Path:
    summary = retina_batch.segment(folder, out, model=model, workers=1,
                                   reduced_decode=reduced, **options)
    assert summary["counts"]["ok"] == summary["counts"]["processed"] > 0, summary["failures"]
    return out


def read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.ndim == 2, path
    return mask > 0


# --- reduced decoding at sizes that are not multiples of 8 ------------------------------

@pytest.mark.parametrize("width, height", [(3500, 2333), (1620, 1444)])
def test_reduced_decode_gives_the_mask_of_a_full_decode(red_model, tmp_path, width, height):
    """JPEG DCT scaling rounds the decoded size up (3500 / 8 -> 438): the box found on the
    small picture must be scaled back by the true ratio, or the mask shifts and shrinks
    (agreement 0.84-0.89 with integer scaling)."""
    path = tmp_path / "in" / "eye.jpg"
    path.parent.mkdir()
    path.write_bytes(jpeg_bytes(diagonal_fundus(width, height)))
    assert decode(path, SIZE)[2] == reduction_for((width, height), SIZE) == 8  # reduced path
    reduced = read_mask(segment_masks(red_model, path.parent, tmp_path / "r", True) / "eye.png")
    full = read_mask(segment_masks(red_model, path.parent, tmp_path / "f", False) / "eye.png")
    assert reduced.shape == full.shape == (height, width)
    assert 0.1 < full.mean() < 0.5  # the photograph has both vessel and background
    assert np.mean(reduced == full) > 0.98  # measured 0.995-0.998


# --- EXIF orientation ----------------------------------------------------------------------

@pytest.mark.parametrize("orientation", sorted(STORE))
def test_decode_honours_exif_orientation_at_full_and_reduced_size(tmp_path, orientation):
    shown = diagonal_fundus(1000, 700)  # what the photographer saw
    path = tmp_path / "o.jpg"
    path.write_bytes(with_exif_orientation(
        jpeg_bytes(np.ascontiguousarray(STORE[orientation](shown))), orientation))
    full, size, factor = decode(path)
    assert factor == 1 and size == (1000, 700) and full.shape == shown.shape
    assert np.abs(full.astype(int) - shown).mean() < 2  # JPEG loss only
    small, size, factor = decode(path, SIZE)
    assert factor == 8 and size == (1000, 700)
    assert small.shape == (88, 125, 3)  # 700 / 8 and 1000 / 8, rounded up
    expected = cv2.resize(shown, (125, 88), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_orientation_matches_a_photo_viewer(tmp_path, orientation):
    """Pillow's exif_transpose as an independent viewer, for all eight orientations."""
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    stored = diagonal_fundus(400, 300)
    path = tmp_path / "o.jpg"
    path.write_bytes(with_exif_orientation(jpeg_bytes(stored), orientation))
    with Image.open(path) as im:
        viewer = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))[..., ::-1]
    for working_size in (None, 16):  # full decode, and 1/8 DCT scaling (400 / 8 >= 1.2 x 16)
        img, size, _ = decode(path, working_size)
        assert size == (viewer.shape[1], viewer.shape[0])
        up = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        assert np.abs(up.astype(int) - viewer).mean() < 4, working_size


@pytest.mark.parametrize("orientation", [6, 3])
def test_masks_of_a_rotated_jpeg_are_in_the_orientation_a_viewer_shows(
        red_model, tmp_path, orientation):
    """The same picture stored turned with an EXIF tag, or stored upright: the same masks,
    whether the JPEG is decoded at full or at reduced size."""
    shown = diagonal_fundus(1620, 1444)
    (tmp_path / "tagged").mkdir()
    (tmp_path / "upright").mkdir()
    (tmp_path / "tagged" / "eye.jpg").write_bytes(with_exif_orientation(
        jpeg_bytes(np.ascontiguousarray(STORE[orientation](shown))), orientation))
    (tmp_path / "upright" / "eye.jpg").write_bytes(jpeg_bytes(shown))
    expected = read_mask(segment_masks(red_model, tmp_path / "upright", tmp_path / "u", False)
                         / "eye.png")
    for reduced in (True, False):
        got = read_mask(segment_masks(red_model, tmp_path / "tagged", tmp_path / f"t{reduced}",
                                      reduced) / "eye.png")
        assert got.shape == expected.shape == (1444, 1620)
        assert np.mean(got == expected) > 0.98, (reduced, np.mean(got == expected))


# --- the field of view ---------------------------------------------------------------------

def test_predictions_outside_a_circular_fov_are_zero(tmp_path):
    """p >= 1 everywhere in the frame (a model that adds 1 to the red channel: the canvas is
    blank outside the FOV, so p would not be 1 there otherwise), a circular FOV mask given
    with --fov: the mask must be exactly that circle. (A rectangular FOV would not tell FOV
    masking from cropping to its bounding box: the corners of the box are what this checks.)"""
    everywhere = write_channel_onnx(tmp_path / "model", SIZE, bias=1.0)
    width, height = 160, 120
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 2] = 255
    fov = np.zeros((height, width), np.uint8)
    cv2.circle(fov, (70, 64), 45, 255, -1)
    for folder, name, image in (("in", "21_training.png", img),
                                ("fov", "21_training_mask.png", fov)):
        (tmp_path / folder).mkdir()
        assert cv2.imwrite(str(tmp_path / folder / name), image)
    out = segment_masks(everywhere, tmp_path / "in", tmp_path / "out", True,
                        fov_dir=tmp_path / "fov")
    assert np.array_equal(read_mask(out / "21_training.png"), fov > 0)
