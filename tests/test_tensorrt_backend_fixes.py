"""TensorRT backend behaviours fixed in issue 10, on fake tensorrt / cuda-python modules
(tests/fake_gpu.py): wait events that block, a context TensorRT could not create, the device
set on every thread that calls CUDA, and a failed enqueue that must not free a busy slot."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fake_gpu import H100, FakeTensorRT, Status, install

from retina_batch.backends import BackendUnavailable, open_backend
from retina_batch.card import sha256, write_json_atomic

SIZE = 16


@pytest.fixture
def engine(tmp_path):
    """A fake engine file with a sidecar for a 16 px canvas, batch 1..4."""
    path = tmp_path / "m.engine"
    path.write_bytes(b"PLAN")
    write_json_atomic(tmp_path / "m.engine.json", {
        "name": "fake", "working_size": SIZE, "threshold": 0.5, "sha256": sha256(path),
        "tensorrt": {**H100, "profile": {"min": 1, "opt": 2, "max": 4},
                     "canvas": {"min": SIZE, "opt": SIZE, "max": 2 * SIZE},
                     "rebuild": "retina-batch export x/model.pt --out y"}})
    return path


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_a_context_tensorrt_cannot_create_is_a_clear_error(engine, monkeypatch):
    trt = FakeTensorRT()
    trt.context_is_none = True
    _, cudart = install(monkeypatch, trt)
    with pytest.raises(BackendUnavailable, match="could not create an execution context"):
        open_backend("tensorrt", engine, batch_size=2)
    assert not cudart.leaked()


def test_wait_events_block_and_only_the_compute_pair_keeps_timing(engine, monkeypatch):
    _, cudart = install(monkeypatch)
    with open_backend("tensorrt", engine, batch_size=2, slots=3) as runner:
        flags = {name: [cudart.event_flags[getattr(slot, name)] for slot in runner._slots]
                 for name in ("uploaded", "started", "computed", "done")}
        future = runner.submit(batch(2))
        future.result()
    blocking, no_timing = cudart.cudaEventBlockingSync, cudart.cudaEventDisableTiming
    assert flags["done"] == [blocking | no_timing] * 3  # the host waits on these
    assert flags["uploaded"] == [no_timing] * 3  # only ordered against
    assert flags["started"] == flags["computed"] == [cudart.cudaEventDefault] * 3
    assert future.compute_seconds == pytest.approx(1.5e-3)  # elapsed started -> computed
    waited = [args[0] for _, args in cudart.calls("cudaEventSynchronize")]
    assert waited and all(cudart.event_flags[e] == blocking | no_timing for e in waited)
    assert not cudart.leaked()


def test_every_thread_that_calls_cuda_sets_the_device_first(engine, monkeypatch):
    _, cudart = install(monkeypatch)
    with open_backend("tensorrt", engine, batch_size=2, gpu=1) as runner:
        # one batch from the thread that opened the backend, one from another thread
        got = [runner.submit(batch(2, 1)).result()]
        with ThreadPoolExecutor(1, thread_name_prefix="caller") as other:
            got.append(other.submit(lambda: runner.submit(batch(2, 2)).result()).result())
    for seed, probs in zip((1, 2), got, strict=True):  # the fake engine's function came back
        assert np.allclose(probs, batch(2, seed).mean(axis=3) / 255.0)
    threads = {thread for thread, name, _ in cudart.log if name.startswith("cuda")}
    assert any(t.startswith("trt-collect") for t in threads)
    assert any(t.startswith("caller") for t in threads)
    for thread in threads:
        calls = [(name, args) for t, name, args in cudart.log if t == thread
                 and name.startswith("cuda") and not name.startswith("cudaGetDevice")]
        assert calls[0] == ("cudaSetDevice", (1,)), (thread, calls[:3])


def test_a_failed_enqueue_waits_for_the_gpu_before_its_slot_is_reused(engine, monkeypatch):
    trt = FakeTensorRT()
    _, cudart = install(monkeypatch, trt)
    with open_backend("tensorrt", engine, batch_size=2, slots=2) as runner:
        trt.execute_fails = True
        failed = runner.submit(batch(2))
        with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
            failed.result()
        # the upload was already enqueued: every stream is synchronised before submit returns
        names = [name for _, name, _ in cudart.log]
        after = names[names.index("execute_async_v3"):]
        synced = [args[0] for _, args in cudart.calls("cudaStreamSynchronize")]
        assert after.count("cudaStreamSynchronize") == 3 and set(synced) == set(runner._streams)
        trt.execute_fails = False
        for seed in (3, 4):  # both slots, the failed one included, work again
            probs = runner.submit(batch(1, seed)).result()
            assert np.allclose(probs, batch(1, seed).mean(axis=3) / 255.0)


def test_if_even_the_wait_fails_the_backend_refuses_further_batches(engine, monkeypatch):
    trt = FakeTensorRT()
    _, cudart = install(monkeypatch, trt)
    runner = open_backend("tensorrt", engine, batch_size=2)
    trt.execute_fails = True
    cudart.fail["cudaStreamSynchronize"] = Status.cudaErrorLaunchFailure
    with pytest.raises(RuntimeError, match="execute_async_v3"):
        runner.submit(batch(1)).result()
    trt.execute_fails = False
    with pytest.raises(RuntimeError, match="stopped after a CUDA failure.*LaunchFailure"):
        runner.submit(batch(1)).result()
    cudart.fail.clear()
    runner.close()


def test_a_working_size_outside_the_engine_canvas_is_refused(engine, monkeypatch):
    install(monkeypatch)
    card = json.loads(engine.with_name("m.engine.json").read_text())
    card["tensorrt"]["canvas"] = {"min": 32, "opt": 32, "max": 64}
    write_json_atomic(engine.with_name("m.engine.json"), card)
    with pytest.raises(BackendUnavailable, match="accepts canvases 32..64, not the working "
                                                 "size 16: rebuild with `retina-batch export"):
        open_backend("tensorrt", engine, batch_size=2)
