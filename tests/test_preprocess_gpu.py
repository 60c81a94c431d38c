"""One geometry, two implementations: preprocess (OpenCV, host) and preprocess_gpu (PyTorch,
any device; here the CPU) give the same canvases and masks, on real photographs when
../shared/data is there and on synthetic ones always."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retina_batch import preprocess as host  # noqa: E402
from retina_batch import preprocess_gpu as device  # noqa: E402
from retina_batch.io import decode, encode  # noqa: E402
from retina_batch.metrics import Confusion, scores  # noqa: E402
from retina_batch.synth import synthesize  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "train" / "default" / "model.pt"
CANVAS = 512


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return scores(Confusion.of(a > 0, b > 0))["dice"]


def vessel_like(canvas: np.ndarray) -> np.ndarray:
    """A model-free 'probability' map with vessel-like structure: dark thin lines of the green
    channel, relative to their surroundings. Deterministic in the canvas, so any difference
    between the two canvases shows in it."""
    green = canvas[:, :, 1].astype(np.float32)
    return np.clip((cv2.GaussianBlur(green, (0, 0), 5) - green) / 12 + 0.3, 0, 1)


def write_synthetic(folder: Path, size: tuple[int, int], fmt: str, seed: int) -> Path:
    image = synthesize(*size, seed)[0]
    path = folder / f"synth{seed}.{fmt}"
    path.write_bytes(encode(f".{fmt}", image, [cv2.IMWRITE_JPEG_QUALITY, 92]
                            if fmt == "jpg" else []))
    return path


def photographs(tmp_path, shared) -> list[Path]:
    """A DRIVE TIFF (shrinks onto the canvas), a 512 px PNG (grows), an LES-AV photograph
    (reduced decode), and synthetic ones at two sizes (3504x2336: reduced decode 1/4)."""
    paths = [write_synthetic(tmp_path, (700, 605), "png", 1),
             write_synthetic(tmp_path, (3504, 2336), "jpg", 2)]
    if shared is not None:
        for pattern in ("drive-training/images/*.tif", "retina-blood-vessel/train/image/*.png",
                        "les-av/images/*.png"):
            paths += sorted(shared.glob(pattern))[:1]
    return paths


@pytest.fixture
def shared():
    from conftest import SHARED_DATA

    return SHARED_DATA if SHARED_DATA.is_dir() else None


def test_same_canvas_fov_and_mask_on_both_paths(tmp_path, shared):
    for path in photographs(tmp_path, shared):
        raw, size, _ = decode(path, CANVAS)
        rgb = host.to_rgb8(raw)
        fov = host.detect_fov(rgb)
        canvas, lb = host.letterbox(rgb, fov.box, CANVAS, size)
        prob = vessel_like(canvas)
        threshold = float(np.median(prob[prob > 0.3]))
        cpu = host.threshold_in_fov(prob, lb, fov.mask, threshold)

        image = torch.from_numpy(rgb)
        gfov = device.detect_fov(image)  # thumbnail made by torch
        assert gfov.box == fov.box and gfov.found == fov.found, path.name
        gcanvas, glb = device.letterbox(image, gfov.box, CANVAS, size)
        assert glb == lb  # the same plan: one implementation of the decisions
        difference = np.abs(gcanvas.numpy().astype(int) - canvas.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, path.name
        gpu = device.threshold_in_fov(torch.from_numpy(vessel_like(gcanvas.numpy())), glb,
                                      device.fov_on_device(gfov, rgb.shape[1::-1], "cpu"),
                                      threshold)
        assert np.array_equal(gpu.fov.numpy(), cpu.fov), path.name
        assert int(gpu.fov_area) == cpu.fov_area
        assert gpu.mask.shape == (size[1], size[0])
        assert 0.02 < cpu.vessel_pixels / cpu.fov_area < 0.6  # a mask worth comparing
        assert dice(gpu.mask.numpy(), cpu.mask) >= 0.999, path.name


def test_resampling_weights_reproduce_opencv():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)
    for h, w in ((150, 190), (128, 128), (37, 300)):  # shrinking, also by integer ratios
        want = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(int)
        got = device._to_uint8(device._resample(torch.from_numpy(image).float(), (h, w),
                                                device.area_weights)).numpy().astype(int)
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 1e-3, (h, w)
    for h, w in ((512, 480), (512, 512), (204, 302)):  # growing
        want = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(int)
        got = device._linear_u8(torch.from_numpy(image), (h, w)).numpy().astype(int)
        inner = slice(1, -1)  # OpenCV's clamped first and last rows take another path
        assert np.array_equal(got[inner], want[inner]), (h, w)
        assert np.abs(got - want).max() <= 1
    mask = (rng.random((37, 53)) > 0.5).astype(np.uint8)
    for w, h in ((565, 584), (53, 37), (20, 11), (3504, 2336)):
        want = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(device.fov_mask_at(torch.from_numpy(mask), (w, h)).numpy(), want)


def test_probabilities_back_on_the_original_grid_match(tmp_path):
    prob = cv2.GaussianBlur(np.random.default_rng(1).random((64, 64), np.float32), (0, 0), 2)
    lb = host.plan_letterbox((11, 3, 290, 190), (301, 203), 64, (903, 609))
    want = host.unletterbox(prob, lb)
    got = device.unletterbox(torch.from_numpy(prob), lb).numpy()
    assert got.shape == want.shape == (609, 903)
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.slow
def test_segment_decoded_gives_the_cpu_pipelines_masks(tmp_path, shared):
    """The torch backend's GPU-resident flow (run on the CPU here) against the host path with
    the same checkpoint: the shipped default model on real and synthetic photographs."""
    from retina_batch.backends import open_backend

    # a 3504x2336 JPEG (reduced decode, shrinks onto the canvas) and a 512 px PNG (grows)
    everything = photographs(tmp_path, shared)
    paths = [everything[1], next((p for p in everything if "retina-blood-vessel" in str(p)),
                                 everything[0])]
    images, sizes = [], []
    for path in paths:
        raw, size, _ = decode(path, CANVAS)
        images.append(host.to_rgb8(raw))
        sizes.append(size)
    with open_backend("torch", CHECKPOINT, batch_size=len(paths), device="cpu") as runner:
        future = runner.segment_decoded(images, sizes, keep_prob=True)
        results = future.result()
        assert future.compute_seconds > 0
        for path, rgb, size, got in zip(paths, images, sizes, results, strict=True):
            fov = host.detect_fov(rgb)
            canvas, lb = host.letterbox(rgb, fov.box, CANVAS, size)
            host.blank_outside(canvas, lb, fov.mask)
            want = host.threshold_in_fov(runner.infer(canvas[None])[0], lb, fov.mask,
                                         runner.threshold, keep_prob=True)
            assert got.mask.shape == want.mask.shape == (size[1], size[0])
            assert got.fov.box == fov.box and got.fov_area == want.fov_area
            assert got.vessel_pixels > 0.02 * got.fov_area
            assert dice(got.mask, want.mask) >= 0.999, path.name
            # Canvases within 1 grey level of each other: the probabilities agree to ~1e-3 at
            # 99.9 % of the pixels; the model amplifies it at a few (0.027 at worst here).
            difference = np.abs(got.prob - want.prob)
            assert difference.max() < 3e-2 and np.percentile(difference, 99.9) < 5e-3
        # Decoded on the device (nvJPEG hands tensors): the FOVs come from thumbnails made
        # there, for the batch at once; the same boxes and masks.
        tensors = runner.segment_decoded([torch.from_numpy(i) for i in images], sizes).result()
        for path, got, want in zip(paths, tensors, results, strict=True):
            assert got.fov.box == want.fov.box and got.fov_area == want.fov_area, path.name
            assert dice(got.mask, want.mask) >= 0.999, path.name


@pytest.mark.parametrize("side", [256, 1024])  # the photograph shrinks / grows onto it
def test_same_canvas_blank_outside_the_fov_on_both_paths(side):
    """Behind a grey, grainy rim both paths give the model a canvas that is zero outside the
    FOV, at the same pixels, and the photograph inside it."""
    rgb = cv2.cvtColor(synthesize(700, 605, 3)[0], cv2.COLOR_BGR2RGB)
    outside = host.detect_fov(rgb).mask == 0
    grain = np.random.default_rng(3).normal(30, 6, (np.count_nonzero(outside), 3))
    rgb[outside] = np.clip(grain, 0, 255).astype(np.uint8)
    fov = host.detect_fov(rgb)
    assert fov.found
    canvas, lb = host.letterbox(rgb, fov.box, side)
    before = canvas.copy()
    host.blank_outside(canvas, lb, fov.mask)
    image = torch.from_numpy(rgb)
    gcanvas, glb = device.letterbox(image, fov.box, side)
    device.blank_outside(gcanvas, glb, device.fov_on_device(fov, rgb.shape[1::-1], "cpu"))
    gcanvas = gcanvas.numpy()
    blanked = (canvas == 0).all(axis=2) & (before > 0).any(axis=2)
    assert blanked.mean() > 0.05  # the rim was there, and is gone
    assert np.array_equal((gcanvas == 0).all(axis=2), (canvas == 0).all(axis=2))
    assert np.abs(gcanvas.astype(int) - canvas.astype(int)).max() <= 1
