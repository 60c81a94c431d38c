"""The network: shapes, padding, attention gates, the exported wrapper."""

import pytest

torch = pytest.importorskip("torch")

from retina_batch.model import (  # noqa: E402
    AttentionGate,
    AttentionUNet,
    InferenceModel,
    UNetConfig,
    count_parameters,
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
