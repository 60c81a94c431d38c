"""Flip test-time augmentation: each view is mapped back before averaging."""

from concurrent.futures import Future

import numpy as np
import pytest

from retina_batch.backends.tta import FlipTTA


class ColumnRamp:
    """A fake backend whose output is NOT flip-equivariant: probability = column / (W - 1),
    plus the red channel / 255 at that pixel (which is)."""

    size, threshold, batch_size, name = 8, 0.5, 4, "fake"

    def __init__(self, fail_on_view: int | None = None):
        self.calls, self.fail_on_view = 0, fail_on_view

    def submit(self, batch):
        future = Future()
        self.calls += 1
        if self.calls - 1 == self.fail_on_view:
            future.set_exception(RuntimeError("device lost"))
            return future
        n, h, w, _ = batch.shape
        ramp = np.broadcast_to(np.arange(w, dtype=np.float32) / (w - 1), (n, h, w))
        future.set_result(0.5 * ramp + 0.5 * batch[..., 0].astype(np.float32) / 255)
        return future

    def describe(self):
        return {"backend": self.name}


def test_views_are_flipped_back_before_the_mean():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = FlipTTA(ColumnRamp()).infer(batch)
    # The equivariant part survives unchanged (each view's flip undone); the column ramp
    # averages with its mirror image to 0.5 everywhere.
    expected = 0.5 * 0.5 + 0.5 * batch[..., 0].astype(np.float32) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (2, 8, 8)


def test_four_views_and_attributes_of_the_inner_backend():
    inner = ColumnRamp()
    tta = FlipTTA(inner)
    tta.infer(np.zeros((1, 8, 8, 3), np.uint8))
    assert inner.calls == 4
    assert (tta.size, tta.threshold, tta.batch_size) == (8, 0.5, 4)
    assert tta.describe()["tta"] == "flips x4"


def test_a_failed_view_fails_the_batch():
    with pytest.raises(RuntimeError, match="device lost"):
        FlipTTA(ColumnRamp(fail_on_view=2)).infer(np.zeros((1, 8, 8, 3), np.uint8))
