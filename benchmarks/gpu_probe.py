"""A lower bound for GPU inference of the default architecture: eager PyTorch, FP16,
channels-last, random weights (cost depends on the architecture only), 512x512 canvas; plus
pinned host-to-device copy bandwidth for uint8 batches. Prints one JSON line.

TensorRT FP16 (fused kernels) is expected to be faster than this; see benchmarks/README.md.

    PYTHONPATH=. python benchmarks/gpu_probe.py
"""

from __future__ import annotations

import json
import time


def images_per_second(net, torch, batch: int, rounds: int = 10) -> float:
    x = torch.randn(batch, 3, 512, 512, device="cuda", dtype=torch.half)
    x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            net(x)
        torch.cuda.synchronize()
    return round(rounds * batch / (time.perf_counter() - start), 1)


def copy_gb_per_second(torch, rounds: int = 20) -> float:
    host = torch.empty(64, 512, 512, 3, dtype=torch.uint8).pin_memory()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        host.cuda(non_blocking=True)
    torch.cuda.synchronize()
    return round(rounds * host.numel() / (time.perf_counter() - start) / 1e9, 1)


def main() -> None:
    import torch

    from retina_batch.model import AttentionUNet, UNetConfig

    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if out["cuda"]:
        torch.backends.cudnn.benchmark = True
        net = AttentionUNet(UNetConfig(width=16)).eval().cuda().half()
        net = net.to(memory_format=torch.channels_last)
        out["gpu"] = torch.cuda.get_device_name(0)
        for batch in (8, 32, 64):
            out[f"torch_fp16_bs{batch}_img_s"] = images_per_second(net, torch, batch)
        out["h2d_GB_s"] = copy_gb_per_second(torch)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
