"""PyTorch backend: inference straight from a training checkpoint (`model.pt` + its card
`model.json`), on the CPU or a CUDA GPU; the exported graphs compute the same function.

On the CPU it is eager fp32 (model.InferenceModel), for checking weights before they are
exported. On a CUDA GPU it is meant to run near the GPU's capacity without TensorRT:
- the fp16 graph's function (export.mixed_precision_model: BatchNorm folded in fp32, conv body
  in fp16, scaling, standardisation and sigmoid in fp32), weights in channels-last layout (the
  NHWC uint8 input permuted to NCHW already is channels-last), cuDNN autotuning;
- `streams` worker threads, each with its own CUDA stream and pinned host buffers, so the
  upload, compute and download of different batches overlap (several batches in flight);
- `segment_decoded`: the GPU-resident flow. Decoded uint8 photographs go to the GPU once;
  letterbox, inference, resize back to the original size, threshold and FOV run there
  (preprocess_gpu); only the uint8 masks (and probabilities if asked for) come back.

UNTESTED ON A GPU (none was available when this was written): the CUDA branches (fp16,
channels-last, streams, pinned buffers, nvJPEG) are written against the PyTorch 2.x and
torchvision.io docs; the same code paths run on the CPU in the tests. CUDA graphs and
torch.compile are not used (untried).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from .base import BackendUnavailable, DecodedResult, WorkerThreadBackend

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


class _Staging:
    """A thread's CUDA stream and growable pinned host buffers (uploads and downloads)."""

    def __init__(self, torch):
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, object] = {}

    def pinned(self, name: str, nbytes: int):
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, pin_memory=True)
            self.buffers[name] = buffer
        return buffer


class TorchBackend(WorkerThreadBackend):
    name = "torch"

    def __init__(self, model, batch_size: int = 4, device: str = "auto", threads: int = 0,
                 streams: int = 2):
        super().__init__(model, batch_size=batch_size, device=device)
        self.threads = threads
        self.streams = max(1, streams)

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
        net = load_network(self.model_path)
        self.cuda = self.torch_device == "cuda"
        if self.cuda:
            from ..export import mixed_precision_model

            torch.backends.cudnn.benchmark = True  # fixed canvas: tune the convolutions once
            module = mixed_precision_model(net).to("cuda").to(memory_format=torch.channels_last)
            self.worker_threads = self.streams
            self.precision = "fp16 (mixed, as model.fp16.onnx)"
        else:
            module = InferenceModel(net)
            self.precision = "fp32"
        self.module = module.eval()
        self._torch = torch
        self._local = threading.local()

    # --- the Backend interface: canvases in, canvas probabilities out --------------------

    def accepts(self, size: int) -> bool:
        return size % 32 == 0  # eager PyTorch: any side the U-Net's downsamplings divide

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if not self.cuda:
                return self.module(torch.from_numpy(batch)).float().numpy()
            staging = self._staging()
            with torch.cuda.stream(staging.stream):
                x = self._upload(staging, "in", batch)
                probs = self.module(x.view(batch.shape)).float()
                out = self._download(staging, "out", probs)
                staging.stream.synchronize()  # releases the GIL: other streams run meanwhile
                return out.numpy().copy()  # the pinned buffer is reused by the next batch

    def _staging(self) -> _Staging:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = _Staging(self._torch)
        return staging

    def _upload(self, staging: _Staging, name: str, array: np.ndarray):
        """Host array -> device, through this thread's pinned buffer (truly asynchronous)."""
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        pinned = staging.pinned(name, flat.size)[:flat.size]
        pinned.numpy()[...] = flat
        return pinned.to("cuda", non_blocking=True).view(self._torch_dtype(array.dtype)) \
            .view(array.shape)

    def _download(self, staging: _Staging, name: str, tensor):
        """Device tensor -> a view of this thread's pinned buffer (valid after a sync)."""
        nbytes = tensor.numel() * tensor.element_size()
        pinned = staging.pinned(name, nbytes)[:nbytes].view(tensor.dtype).view(tensor.shape)
        pinned.copy_(tensor, non_blocking=True)
        return pinned

    def _torch_dtype(self, dtype):
        return {np.dtype(np.uint8): self._torch.uint8,
                np.dtype(np.float32): self._torch.float32}[np.dtype(dtype)]

    # --- the GPU-resident flow ----------------------------------------------------------
    def segment_decoded(self, images: list, sizes: list | None = None, fovs: list | None = None,
                        threshold: float | None = None, keep_prob: bool = False,
                        canvas: int | None = None):
        """Segment decoded photographs on the backend's device; returns a Future of a list of
        DecodedResult in input order (its `compute_seconds`: the whole batch's time).

        images: RGB uint8 H x W x 3, numpy arrays (decoded on the host) or torch tensors
        already on the device, or io.EncodedJpeg (decoded here: on a GPU with nvJPEG, the
        whole batch in one call; else on the host). A file that no decoder reads gets its
        exception in its result's place (the other images go on). sizes: the original
        (width, height) of each, when decoded at reduced size (None: as decoded). fovs: a
        preprocess.FieldOfView per image from FOV files, or None to detect it (from a
        thumbnail: made where the image is, decided on the host).
        threshold: default the card's. keep_prob: also return float32 probabilities.
        canvas: the side of the batch's square canvas (default the working size; one per
        batch, as the host path batches by canvas).
        """
        canvas = self.size if canvas is None else int(canvas)
        if len(images) > self.batch_size:
            raise ValueError(f"{self.name}: {len(images)} images > batch size {self.batch_size}")
        if not self.accepts(canvas):
            raise ValueError(f"{self.name}: the model does not take a {canvas} px canvas")
        return self.run_timed(self._worker, self._segment_decoded, list(images),
                              sizes or [None] * len(images), fovs or [None] * len(images),
                              self.threshold if threshold is None else float(threshold),
                              keep_prob, canvas)

    @property
    def decodes_jpeg(self) -> bool:
        """On a CUDA device with torchvision's nvJPEG: JPEGs are best decoded there."""
        return bool(getattr(self, "cuda", False)) and _has_torchvision()

    def _segment_decoded(self, images, sizes, fovs, threshold, keep_prob, canvas) -> list:
        torch = self._torch
        staging = self._staging() if self.cuda else None
        stream = torch.cuda.stream(staging.stream) if self.cuda else contextlib.nullcontext()
        with torch.inference_mode(), stream:
            images = self._decode_jpegs(images)
            good = [i for i, image in enumerate(images) if not isinstance(image, Exception)]
            if not good:
                return images
            fovs = self._device_fovs(images, fovs)
            prepared = [self._prepare(staging, k, images[i], sizes[i], fovs[i], canvas)
                        for k, i in enumerate(good)]
            canvases = torch.stack([canvas for canvas, _, _, _, _ in prepared])
            probs = self.module(canvases).float()
            results = list(images)
            for i, result in zip(good, self._finish(staging, prepared, probs, threshold,
                                                    keep_prob), strict=True):
                results[i] = result
            return results

    @staticmethod
    def _device_fovs(images: list, fovs: list) -> list:
        """The FOV of every image tensor that has none yet, for the whole batch at once
        (preprocess_gpu.detect_fovs: one fetch of the thumbnails per batch)."""
        from .. import preprocess_gpu as device

        todo = [i for i, (image, fov) in enumerate(zip(images, fovs, strict=True))
                if fov is None and not isinstance(image, (np.ndarray, Exception))]
        fovs = list(fovs)
        for i, fov in zip(todo, device.detect_fovs([images[i] for i in todo]), strict=True):
            fovs[i] = fov
        return fovs

    def _decode_jpegs(self, images: list) -> list:
        """io.EncodedJpeg entries decoded (others as they are): the batch's JPEGs in one
        nvJPEG call on a GPU; where that is missing or refuses the batch (one bad file fails
        the call), each file on its own, then on the host; an unreadable file becomes its
        ValueError."""
        from ..io import EncodedJpeg
        from ..preprocess import to_rgb8

        at = [i for i, image in enumerate(images) if isinstance(image, EncodedJpeg)]
        if not at:
            return images
        out = list(images)
        decoded = _nvjpeg([images[i].data for i in at]) if self.cuda else None
        for k, i in enumerate(at):
            if decoded is not None:
                out[i] = decoded[k]
                continue
            one = _nvjpeg([images[i].data]) if self.cuda and len(at) > 1 else None
            try:
                out[i] = one[0] if one else to_rgb8(images[i].decode())
            except ValueError as e:  # the host decode's reason, as the host flow reports it
                out[i] = e
        return out

    def _prepare(self, staging, index: int, image, size, fov, side: int):
        """(canvas, letterbox, FOV, FOV mask at decoded size, quality statistics) of one
        image, on the device."""
        from .. import preprocess as host
        from .. import preprocess_gpu as device
        from .. import qc_gpu

        decoded = (image.shape[1], image.shape[0])
        if isinstance(image, np.ndarray):
            if fov is None:  # the thumbnail on the host: the image is here already
                fov = host.fov_from_thumbnail(host.fov_thumbnail(image), decoded,
                                              full_mask=False)
            image = self._upload(staging, f"image{index}", image) if self.cuda \
                else self._torch.from_numpy(image)
        canvas, lb = device.letterbox(image, fov.box, side, size)
        fov_mask = device.fov_on_device(fov, decoded, canvas.device)
        device.blank_outside(canvas, lb, fov_mask)
        quality = qc_gpu.image_quality(image, fov_mask, fov.box, (canvas, lb.source_box))
        return canvas, lb, fov, fov_mask, quality

    def _finish(self, staging, prepared, probs, threshold, keep_prob) -> list:
        from .. import preprocess_gpu as device
        from ..qc import quality_columns

        torch = self._torch
        done = [device.threshold_in_fov(probs[i], lb, fov_mask, threshold, keep_prob)
                for i, (_, lb, _, fov_mask, _) in enumerate(prepared)]
        counts = torch.stack([torch.stack([d.fov_area, d.vessel_pixels]) for d in done])
        # An empty FOV box has no statistics: zeros with no pixels inside read as None.
        stats = torch.stack([q if q is not None else torch.zeros(4, dtype=torch.float64,
                                                                  device=probs.device)
                             for *_, q in prepared])
        if self.cuda:
            counts = self._download(staging, "counts", counts)
            stats = self._download(staging, "quality", stats)
            masks = [self._download(staging, f"mask{i}", d.mask) for i, d in enumerate(done)]
            fovs = [self._download(staging, f"fov{i}", d.fov) for i, d in enumerate(done)]
            probs = [self._download(staging, f"prob{i}", d.prob) if keep_prob else None
                     for i, d in enumerate(done)]
            staging.stream.synchronize()
        else:
            masks, fovs, probs = [d.mask for d in done], [d.fov for d in done], \
                [d.prob for d in done]
        counts, stats = counts.numpy().tolist(), stats.numpy().tolist()
        # Copies: on the GPU they are views of pinned buffers that the next batch reuses.
        return [DecodedResult(mask.numpy().copy(), None if prob is None else prob.numpy().copy(),
                              fov, lb, int(area), int(vessels), fov_mask.numpy().copy(),
                              quality_columns(*quality))
                for mask, fov_mask, prob, (_, lb, fov, _, _), (area, vessels), quality
                in zip(masks, fovs, probs, prepared, counts, stats, strict=True)]

    def _unload(self) -> None:
        del self.module

    def describe(self) -> dict:
        torch = import_torch()
        return {**super().describe(), "runtime": f"torch {torch.__version__}",
                "torch_device": getattr(self, "torch_device", None),
                "precision": getattr(self, "precision", None),
                "streams": self.worker_threads}


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def decode_jpegs(datas: list, device: str = "cuda") -> list | None:
    """JPEG files' bytes (uint8 numpy arrays) -> RGB uint8 H x W x 3 tensors decoded on the
    GPU (nvJPEG, through torchvision.io.decode_jpeg with device="cuda", batched, on the current
    CUDA stream); None when torchvision or a CUDA device is missing, and the caller decodes on
    the host. Raises RuntimeError when nvJPEG refuses a file. UNTESTED on a GPU."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    if device != "cuda" or not torch.cuda.is_available():
        return None
    tensors = [torch.from_numpy(np.ascontiguousarray(d)) for d in datas]
    decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return [image.permute(1, 2, 0) for image in decoded]  # C x H x W -> H x W x C (a view)


def _nvjpeg(datas: list) -> list | None:
    """decode_jpegs on the GPU, None where it cannot or refuses (the caller falls back)."""
    try:
        return decode_jpegs(datas, "cuda")
    except (RuntimeError, ValueError):  # torchvision's errors for a file nvJPEG refuses
        return None
