"""Tiny models and images for tests: a width-4 Attention U-Net on a 64-pixel canvas."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from retina_batch.card import sha256, write_json_atomic

TINY_SIZE = 64


def tiny_card(weights: Path, size: int = TINY_SIZE, width: int = 4, norm: str = "image") -> dict:
    return {"card_version": 1, "name": "tiny", "architecture": "attention-unet",
            "model": {"width": width, "depth": 4, "in_channels": 3, "norm": norm},
            "working_size": size,
            "threshold": 0.5, "weights": weights.name, "sha256": sha256(weights)}


def write_tiny_checkpoint(folder: Path, size: int = TINY_SIZE, width: int = 4, seed: int = 0,
                          norm: str = "image"):
    """model.pt + model.json with random weights (BatchNorm running stats perturbed so the
    output is not flat)."""
    import torch

    from retina_batch.model import AttentionUNet, UNetConfig

    torch.manual_seed(seed)
    net = AttentionUNet(UNetConfig(width=width, norm=norm))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    torch.save({"model_config": net.config.to_dict(), "state_dict": net.state_dict(),
                "epoch": 0}, weights)
    write_json_atomic(folder / "model.json", tiny_card(weights, size, width, norm))
    return weights


def write_tiny_onnx(folder: Path, size: int = TINY_SIZE, width: int = 4) -> Path:
    """A tiny model exported the plain way (no export module), with its card."""
    import torch

    from retina_batch.model import AttentionUNet, InferenceModel, UNetConfig

    weights = write_tiny_checkpoint(folder, size, width)
    net = AttentionUNet(UNetConfig(width=width))
    net.load_state_dict(torch.load(weights)["state_dict"])
    model = InferenceModel(net).eval()
    path = folder / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, size, size, 3, dtype=torch.uint8),), str(path),
                      input_names=["images"], output_names=["probabilities"],
                      dynamic_axes={"images": {0: "n"}, "probabilities": {0: "n"}},
                      dynamo=False, opset_version=17)
    write_json_atomic(folder / "model.onnx.json", tiny_card(path, size, width))
    return path


def fundus_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A BGR image with a bright disc on black and a few dark lines: enough to find a FOV."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    centre, radius = (width // 2, height // 2), int(0.45 * min(width, height))
    cv2.circle(img, centre, radius, (40, 90, 180), -1)
    for _ in range(6):
        end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(img, centre, end, (20, 30, 90), max(1, min(width, height) // 100))
    return cv2.bitwise_and(img, img, mask=cv2.circle(np.zeros((height, width), np.uint8),
                                                     centre, radius, 255, -1))


def synthetic_canvases(seeds, size: int = TINY_SIZE) -> np.ndarray:
    """Synthetic fundus photographs prepared onto the canvas, as segment prepares them."""
    from retina_batch.export import synthetic_fundus

    return np.stack([synthetic_fundus(size, seed) for seed in seeds])


def write_tiny_int8(fp32: Path) -> Path:
    """model.int8.onnx + card beside a tiny model.onnx, made by the export step itself
    (calibrated on synthetic photographs; other synthetic ones for parity)."""
    from retina_batch.card import load_card
    from retina_batch.quantize import Calibration, export_int8

    calibration = Calibration(synthetic_canvases(range(100, 108)), ["synthetic"], "synthetic")
    made = export_int8(fp32, load_card(fp32), synthetic_canvases(range(4)), "4 synthetic",
                       calibration, log=lambda *a: None)
    return Path(made["onnx_int8"])
