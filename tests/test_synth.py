"""Synthetic fundus photographs: a field of view the pipeline finds, realistic vessel density,
deterministic with a seed, and the `synth` command."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from retina_batch.cli import main
from retina_batch.io import decode
from retina_batch.preprocess import detect_fov, to_rgb8
from retina_batch.synth import parse_size, synthesize, write_synthetic


# At 128 px most vessels are thinner than a pixel and only the trunks reach the mask.
@pytest.mark.parametrize("size, low", [((128, 128), 0.005), ((512, 512), 0.04),
                                       ((900, 600), 0.04)])
def test_field_of_view_is_detected_and_vessels_are_realistic(size, low):
    image, vessels = synthesize(*size, seed=3)
    assert image.shape == (size[1], size[0], 3) and image.dtype == np.uint8
    fov = detect_fov(to_rgb8(image))
    assert fov.found
    h, w = vessels.shape
    expected = np.pi * (0.47 * min(w, h)) ** 2 / (w * h)  # the drawn circle's share
    assert fov.mask.mean() == pytest.approx(expected, rel=0.1)
    # Drawn vessels inside the FOV: up to ~20 % of the retina (DRIVE manual masks: ~12 %).
    fraction = vessels.sum() / fov.mask.sum()
    assert low < fraction < 0.2
    assert not vessels[fov.mask == 0].any()
    inside = image[fov.mask > 0].astype(float)
    # fundus colours: red brightest, blue darkest, dark rim outside
    assert inside[:, 2].mean() > inside[:, 1].mean() > inside[:, 0].mean()
    assert image[fov.mask == 0].mean() < 15
    # vessels are darker than the retina right beside them, in the green channel
    ring = cv2.dilate(vessels.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    ring &= ~vessels & (fov.mask > 0)
    assert image[..., 1][vessels].mean() < image[..., 1][ring].mean() - 5


def test_same_seed_same_image_other_seed_other_image():
    a, ma = synthesize(256, 256, seed=7)
    b, mb = synthesize(256, 256, seed=7)
    c, _ = synthesize(256, 256, seed=8)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_write_synthetic_files_repeats_and_masks(tmp_path):
    paths = write_synthetic(tmp_path / "img", 5, (200, 150), "png", seed=1, unique=2,
                            masks=tmp_path / "masks")
    assert [p.name for p in paths] == [f"synth_{i:05d}.png" for i in range(5)]
    assert paths[2].read_bytes() == paths[0].read_bytes()  # repeats of the 2 unique images
    assert paths[1].read_bytes() != paths[0].read_bytes()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "synth_00000.png", "synth_00001.png"]
    img, (w, h), factor = decode(paths[0])
    assert (w, h, factor) == (200, 150, 1)
    again = write_synthetic(tmp_path / "again", 1, (200, 150), "png", seed=1)
    assert again[0].read_bytes() == paths[0].read_bytes()


def test_jpeg_quality_changes_size(tmp_path):
    low = write_synthetic(tmp_path / "low", 1, (256, 256), "jpg", quality=50)[0]
    high = write_synthetic(tmp_path / "high", 1, (256, 256), "jpg", quality=95)[0]
    assert low.stat().st_size < high.stat().st_size
    assert cv2.imread(str(high)).shape == (256, 256, 3)


def test_parse_size():
    assert parse_size("512x384") == (512, 384)
    assert parse_size("256") == (256, 256)
    for bad in ("x", "12", "512x", "axb", "1x2x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_synth_command(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "o"), "-n", "2", "--size",
                                       "160x120", "--format", "png", "--seed", "4"])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "o").iterdir())
    assert len(files) == 2 and cv2.imread(str(files[0])).shape == (120, 160, 3)


def test_synth_command_bad_size_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "o"), "--size", "big"])
    assert result.exit_code == 2
    assert "--size" in result.output and "Traceback" not in result.output
