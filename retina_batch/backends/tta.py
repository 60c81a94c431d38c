"""Flip test-time augmentation (`segment --tta`): the mean of the predictions on the image and
its horizontal, vertical and double flips, mapped back.

A wrapper, not a backend of its own: it works with every runtime, and the runtime sees four
ordinary batches. Four times the inference cost; what it buys on unseen cameras is measured in
train/default/README.md.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

# (axis to flip in an N x H x W x C batch) per view; None is the image itself. A flip is its
# own inverse, so each view's prediction is mapped back by the same flip on N x H x W.
FLIPS = (None, (2,), (1,), (1, 2))


class FlipTTA:
    """Wraps an opened backend; same `submit` / attributes, four views per batch."""

    tta = True  # the output folder records that its masks were made with TTA

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # size, threshold, batch_size, card, name, ... of the inner
        return getattr(self.inner, name)

    def submit(self, batch: np.ndarray) -> Future:
        views = [self.inner.submit(np.ascontiguousarray(batch if axes is None
                                                       else np.flip(batch, axes)))
                 for axes in FLIPS]
        done: Future = Future()
        remaining = [len(views)]

        def collect(_):
            remaining[0] -= 1
            if remaining[0]:
                return
            try:
                maps = [v.result() if axes is None else np.flip(v.result(), axes)
                        for v, axes in zip(views, FLIPS, strict=True)]
            except BaseException as e:  # one failed view fails the batch, as without TTA
                done.set_exception(e)
                return
            done.compute_seconds = sum(getattr(v, "compute_seconds", 0.0) for v in views)
            done.set_result(np.mean(maps, axis=0, dtype=np.float32))

        for view in views:
            view.add_done_callback(collect)
        return done

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch).result()

    def describe(self) -> dict:
        return {**self.inner.describe(), "tta": "flips x4"}
