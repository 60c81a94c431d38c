"""PyTorch backend: eager inference straight from a training checkpoint (`model.pt` + its card
`model.json`), on the CPU or a CUDA GPU. For checking weights before they are exported; the
exported graphs compute the same function (model.InferenceModel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import BackendUnavailable, WorkerThreadBackend

INSTALL_HINT = "pip install 'retina-batch[train]' (PyTorch)"


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable(f"--backend torch needs PyTorch: {INSTALL_HINT}") from e
    return torch


def load_network(path: str | Path):
    """The AttentionUNet saved in a checkpoint (`model_config` + `state_dict`), in eval mode."""
    torch = import_torch()
    from ..model import AttentionUNet, UNetConfig

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = AttentionUNet(UNetConfig(**state["model_config"]))
        net.load_state_dict(state["state_dict"])
    except Exception as e:  # torch.load raises many types (pickle, zip, key, size mismatch)
        raise BackendUnavailable(f"{path} is not a retina-batch checkpoint ({e})") from e
    return net.eval()


class TorchBackend(WorkerThreadBackend):
    name = "torch"

    def __init__(self, model, batch_size: int = 4, device: str = "auto", threads: int = 0):
        super().__init__(model, batch_size=batch_size, device=device)
        self.threads = threads

    def _torch_device(self, torch) -> str:
        cuda = torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise BackendUnavailable("--device cuda: this PyTorch sees no CUDA GPU (install a "
                                     "CUDA build of torch, or use --device cpu)")
        return "cuda" if cuda and self.device != "cpu" else "cpu"

    def _load(self) -> None:
        torch = import_torch()
        from ..model import InferenceModel

        self.torch_device = self._torch_device(torch)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.module = InferenceModel(load_network(self.model_path)).to(self.torch_device).eval()
        self._torch = torch

    def accepts(self, size: int) -> bool:
        return size % 32 == 0  # eager PyTorch: any side the U-Net's downsamplings divide

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.torch_device))
            if self.torch_device == "cuda":
                torch.cuda.synchronize()  # so compute_seconds covers the GPU work
            return out.float().cpu().numpy()

    def _unload(self) -> None:
        del self.module

    def describe(self) -> dict:
        torch = import_torch()
        return {**super().describe(), "runtime": f"torch {torch.__version__}",
                "torch_device": getattr(self, "torch_device", None)}
