"""The network: shapes, padding, attention gates, the exported wrapper."""

import pytest

torch = pytest.importorskip("torch")

from retina_batch.model import (  # noqa: E402
    AttentionGate,
    AttentionUNet,
    InferenceModel,
    UNetConfig,
    count_parameters,
    local_standardise,
    normalise,
    standardise,
)


@pytest.mark.parametrize("h,w", [(64, 64), (50, 77), (17, 33)])
def test_any_input_size_gives_one_logit_of_the_same_size(h, w):
    net = AttentionUNet(UNetConfig(width=4, depth=3)).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, h, w))
    assert out.shape == (2, 1, h, w)


def test_width_scales_parameters_quadratically():
    small = count_parameters(AttentionUNet(UNetConfig(width=8)))
    large = count_parameters(AttentionUNet(UNetConfig(width=16)))
    assert 3.5 < large / small < 4.1


def test_attention_gate_only_scales_the_skip_between_zero_and_itself():
    gate = AttentionGate(skip_ch=4, gate_ch=4, inter_ch=4).eval()
    x = torch.rand(1, 4, 8, 8) + 0.1
    out = gate(x, torch.randn(1, 4, 8, 8))
    assert out.shape == x.shape
    assert torch.all(out >= 0) and torch.all(out <= x)


def test_standardise_removes_brightness_and_contrast():
    x = torch.rand(2, 3, 16, 16)
    a, b = standardise(x), standardise(0.5 * x + 0.2)
    assert torch.allclose(a.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    # Equal up to the small epsilon that keeps flat images finite.
    assert torch.allclose(a, b, rtol=0.05, atol=1e-3)


def _textured(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A fundus-like texture in [0.2, 0.8]: fine structure on every scale below ~20 px."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return 0.2 + 0.6 * (0.7 * x + 0.3 * torch.rand(1, 3, h, w, generator=g))


def test_local_standardise_removes_a_smooth_gain_that_standardise_keeps():
    """A vignetted photograph (gain falling from 1 at the centre to 0.3 at the edge) gives
    nearly the locally standardised input of the evenly lit one (the gain still falls within
    a window); whole-image standardisation keeps the gradient."""
    x = _textured(256, 256)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256),
                            indexing="ij")
    gain = (1 - 0.7 * (xx**2 + yy**2) / 2).clamp(min=0.3)
    lit, dim = local_standardise(x), local_standardise(x * gain)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    local_error = (lit - dim)[inner].abs().mean()
    image_error = (standardise(x) - standardise(x * gain))[inner].abs().mean()
    assert local_error < 0.2 and image_error > 3 * local_error  # measured 0.14 and 0.54
    assert abs(float(lit[inner].mean())) < 0.05 and 0.8 < float(lit[inner].std()) < 1.2


@pytest.mark.parametrize("h,w", [(64, 64), (61, 83)])
def test_local_standardise_of_a_crop_is_the_canvas_s_away_from_the_crop_edge(h, w):
    """Training standardises 256 px crops and inference the whole canvas: locally, a crop sees
    the statistics the canvas gives it (whole-image statistics would differ crop by crop)."""
    x = _textured(192, 208, seed=1)
    whole = local_standardise(x)
    crop = local_standardise(x[..., 40:40 + h, 56:56 + w])
    inner = (slice(None), slice(None), slice(24, h - 24), slice(24, w - 24))
    assert crop.shape[-2:] == (h, w)
    assert (crop - whole[..., 40:40 + h, 56:56 + w])[inner].abs().max() < 0.15


def test_normalise_follows_the_config_and_refuses_an_unknown_one():
    x = _textured(32, 32)
    assert torch.equal(normalise(x, UNetConfig(norm="image")), standardise(x))
    assert torch.equal(normalise(x, UNetConfig(norm="local")), local_standardise(x))
    with pytest.raises(ValueError, match="image or local"):
        normalise(x, UNetConfig(norm="global"))


def test_inference_model_takes_uint8_nhwc_and_returns_probabilities():
    model = InferenceModel(AttentionUNet(UNetConfig(width=4))).eval()
    images = torch.randint(0, 256, (3, 48, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        prob = model(images)
    assert prob.shape == (3, 48, 40) and prob.dtype == torch.float32
    assert torch.all((prob >= 0) & (prob <= 1))
    # Images are independent: the first image's output does not depend on the others.
    with torch.no_grad():
        alone = model(images[:1])
    assert torch.allclose(alone[0], prob[0], atol=1e-5)
