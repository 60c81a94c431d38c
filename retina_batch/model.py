"""Attention U-Net (Oktay et al. 2018, arXiv:1804.03999) for retinal vessel segmentation.

A plain U-Net whose skip connections pass through additive attention gates: the decoder's
coarser features decide which encoder pixels get through, which suppresses the bright optic
disc rim and lesion edges that a plain U-Net tends to call vessels.

`InferenceModel` wraps the network with what every backend must compute identically: uint8 NHWC
RGB in, per-image standardisation, sigmoid, probabilities N x H x W out. It is what gets exported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    width: int = 16  # channels of the first level; each level down doubles it
    depth: int = 4  # number of 2x downsamplings
    in_channels: int = 3
    # Input standardisation (`normalise`): "image" (whole canvas, the shipped models) or
    # "local" (a ~72 px neighbourhood: also removes vignetting and uneven illumination).
    norm: str = "image"

    @property
    def multiple(self) -> int:
        """Input sides must be divisible by this (the model pads otherwise)."""
        return 2**self.depth

    def to_dict(self) -> dict:
        return asdict(self)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU: the unit of every U-Net level."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention: alpha = sigmoid(psi(relu(W_x x + W_g g))); returns x * alpha.

    `g` (the gating signal from the decoder) is already at the skip's resolution here because
    we upsample before gating, a common simplification that keeps shapes trivial.
    """

    def __init__(self, skip_ch: int, gate_ch: int, inter_ch: int):
        super().__init__()
        self.w_x = nn.Sequential(nn.Conv2d(skip_ch, inter_ch, 1, bias=False),
                                 nn.BatchNorm2d(inter_ch))
        self.w_g = nn.Sequential(nn.Conv2d(gate_ch, inter_ch, 1, bias=False),
                                 nn.BatchNorm2d(inter_ch))
        self.psi = nn.Sequential(nn.Conv2d(inter_ch, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(F.relu(self.w_x(x) + self.w_g(g)))
        return x * alpha


class UpBlock(nn.Module):
    """Upsample the deeper features, gate the skip with them, concatenate, convolve."""

    def __init__(self, deep_ch: int, skip_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(deep_ch, skip_ch, 2, stride=2)
        self.gate = AttentionGate(skip_ch, skip_ch, max(skip_ch // 2, 4))
        self.conv = ConvBlock(2 * skip_ch, skip_ch)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(deep)
        return self.conv(torch.cat([self.gate(skip, up), up], dim=1))


class AttentionUNet(nn.Module):
    """Normalised float NCHW in, one vessel logit channel out, same H x W."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth + 1)]
        self.encoders = nn.ModuleList(
            [ConvBlock(config.in_channels, widths[0])]
            + [ConvBlock(widths[i], widths[i + 1]) for i in range(config.depth)]
        )
        self.decoders = nn.ModuleList(
            [UpBlock(widths[i + 1], widths[i]) for i in reversed(range(config.depth))]
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.config.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)[..., :h, :w]


def standardise(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-image, per-channel zero mean / unit variance over H x W (float NCHW in [0, 1]).

    Instead of fixed dataset statistics: removes most of the brightness, contrast and colour
    differences between cameras before the network sees the image.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


# local_standardise: statistics on a grid of LOCAL_CELL px cells, averaged over LOCAL_SPAN x
# LOCAL_SPAN cells (a ~72 px window on the 512 canvas: wider than the widest vessel and the
# optic disc's rim, narrower than the falloff of a vignetted periphery) and spread back
# bilinearly. Pooling on the coarse grid keeps it to a few % of the network's cost.
LOCAL_CELL = 8
LOCAL_SPAN = 9


def local_standardise(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per-channel zero mean / unit variance within a neighbourhood of each pixel (float NCHW
    in [0, 1]): invariant to a smooth multiplicative gain over the image (a vignetted or
    unevenly lit photograph), where `standardise` is invariant only to a global one. `eps`
    (a 0.01 floor on the local standard deviation) keeps flat regions' noise from being
    amplified."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % LOCAL_CELL, (-w) % LOCAL_CELL
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
    cells = F.avg_pool2d(torch.cat([padded, padded * padded], dim=1), LOCAL_CELL)
    pooled = F.avg_pool2d(cells, LOCAL_SPAN, stride=1, padding=LOCAL_SPAN // 2,
                          count_include_pad=False)
    mean, mean_sq = pooled.chunk(2, dim=1)
    std = torch.sqrt(torch.clamp(mean_sq - mean * mean, min=0.0) + eps)
    stats = F.interpolate(torch.cat([mean, std], dim=1), size=padded.shape[-2:],
                          mode="bilinear", align_corners=False)[..., :h, :w]
    mean, std = stats.chunk(2, dim=1)
    return (x - mean) / std


def normalise(x: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """The input standardisation `config.norm` names (training, export and every backend)."""
    if config.norm == "local":
        return local_standardise(x)
    if config.norm == "image":
        return standardise(x)
    raise ValueError(f"unknown input normalisation {config.norm!r} (image or local)")


def unit_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1], casting FIRST.

    The order matters for TensorRT: its ONNX parser accepts a uint8 network input only when
    the input's sole consumer is a Cast (no uint8 intermediate tensor; NVIDIA/TensorRT#3985),
    so a Transpose before the Cast makes every engine build fail. graph_rules checks it.
    """
    return images.float().permute(0, 3, 1, 2) * (1.0 / 255.0)


class InferenceModel(nn.Module):
    """uint8 N x H x W x 3 RGB -> float32 vessel probabilities N x H x W (the exported graph).

    Fully convolutional: any H, W that are multiples of 2**depth run without padding."""

    def __init__(self, net: AttentionUNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(normalise(unit_nchw(images), self.net.config))
        return torch.sigmoid(logits.float())[:, 0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
