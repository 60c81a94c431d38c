"""`bench`: the real pipeline measured, with consistent figures, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from retina_batch.bench import STAGE_NAMES, _cores, bench
from retina_batch.cli import main
from retina_batch.synth import write_synthetic


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-images")
    write_synthetic(folder, 6, (160, 120), "jpg", seed=2)
    return folder


def _vm_hwm_mb() -> float | None:
    """This process's peak RSS read straight from /proc (None off Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) / 1024 for line in status.splitlines()
                if line.startswith("VmHWM:"))


def _check_result(r: dict, images: int, write: bool = True) -> None:
    assert r["images"] == images and r["errors"] == 0
    assert r["end_to_end_ips"] > 0 and len(r["end_to_end_runs"]) >= 1
    stages = r["stage_ms"]
    assert set(stages) == set(STAGE_NAMES)
    # Every stage takes time (one never timed would read 0); without writing, writing is free.
    assert all(stages[s] > 0 for s in STAGE_NAMES if write or s != "write")
    assert r["bottleneck"] == max(stages, key=stages.get)
    host = {k: v for k, v in stages.items() if k != "infer"}
    assert r["host_bottleneck"] == max(host, key=host.get)
    # An image's stages are disjoint intervals inside its latency window (decode start to row
    # recorded; infer counts its share of the batch), so the mean stage sum <= mean latency,
    # and with at most 20 latencies p95 >= their mean. Units: both in milliseconds.
    latency = r["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"]
    assert sum(stages.values()) <= latency["p95"] + 0.05
    # ...and no image takes longer than the whole run it was part of.
    slowest_run_s = images / min(r["end_to_end_runs"])
    assert latency["p95"] <= 1000 * slowest_run_s * 1.01
    assert r["peak_rss_mb"] >= r["rss_after_model_load_mb"] > 10
    # Not <= 1: on runs this short, worker threads' CPU time from just outside the timed window
    # is counted too (seen up to 1.15); a real accounting bug would be off by a factor of cores.
    assert 0 < r["cpu_utilisation"] <= 1.5
    # CPU time per image = the CPU share of the cores over an image's share of the wall time
    assert r["host_ms_per_image"] == pytest.approx(
        r["cpu_utilisation"] * _cores() * 1000 / r["end_to_end_ips"], rel=0.5)
    assert 0 <= r["vessel_fraction"] <= 1


def test_bench_in_process_has_every_figure(tiny_onnx, images):
    seen = []
    peak_before = _vm_hwm_mb()
    record = bench(images, model=tiny_onnx, batch_sizes=(1, 3), workers=(1,), repeat=2,
                   isolate=False, pure_images=4,
                   on_result=lambda label, result: seen.append(label))
    peak_after = _vm_hwm_mb()
    assert seen[0].startswith("naive") and len(seen) == 3
    assert record["input"]["images"] == 6 and record["input"]["format"] == "jpg"
    assert (record["input"]["width"], record["input"]["height"]) == (160, 120)
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu_model"]
    assert "onnxruntime" in record["machine"]["software"]
    assert record["backend"]["backend"] == "onnxruntime"
    assert record["contention_before"]["load_average"] is not None
    _check_result(record["naive"], 6)
    for r, bs in zip(record["results"], (1, 3), strict=True):
        _check_result(r, 6)
        assert r["config"] == {"precision": "auto", "batch_size": bs, "workers": 1,
                               "inflight": 2, "reduced_decode": True,
                               "pixel_work": "host",  # auto, and no GPU here
                               "jpeg_on_device": False}
        assert r["precision"] == "fp32"  # auto, and the tiny model has no int8 file
        assert len(r["end_to_end_runs"]) == 2
        # the ratios are the ratios of the reported figures
        assert r["efficiency"] == pytest.approx(r["end_to_end_ips"] / r["pure_inference_ips"],
                                                abs=2e-3)
        assert r["speedup_vs_naive"] == pytest.approx(
            r["end_to_end_ips"] / record["naive"]["end_to_end_ips"], abs=2e-3)
        assert r["pure_inference_images"] % bs == 0
        # the same model on the same images: the same masks as the naive loop
        assert r["vessel_fraction"] == pytest.approx(record["naive"]["vessel_fraction"],
                                                     abs=1e-4)
    if peak_before is not None:  # in process: the peaks it reports are this process's, in MiB
        # (Linux counts RSS per thread in batches of 64 pages: two readings can be ~1 MiB
        # apart; a wrong unit or process would be off by far more.)
        for r in (record["naive"], *record["results"]):
            assert peak_before - 4 <= r["rss_after_model_load_mb"] <= r["peak_rss_mb"] \
                <= peak_after + 4
    json.dumps(record)  # plain data all the way down


def test_bench_synthetic_in_subprocess_with_full_decode(tiny_onnx):
    record = bench(synthetic=3, size=(700, 500), model=tiny_onnx, batch_sizes=(2,),
                   repeat=1, reduced_decode=(True, False), naive=False, write=False,
                   pure_images=2)
    assert record["input"]["synthetic"] and record["input"]["images"] == 3
    assert "naive" not in record
    reduced, full = record["results"]
    assert reduced["config"]["reduced_decode"] and not full["config"]["reduced_decode"]
    for r in (reduced, full):
        _check_result(r, 3, write=False)
        assert r["speedup_vs_naive"] is None
    assert record["settings"]["isolated"] and not record["settings"]["write"]


def test_bench_command_json_and_table(tiny_onnx, images, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", str(images), "--model", str(tiny_onnx),
                                       "--batch-size", "2", "--workers", "1", "--repeat", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "naive loop" in result.output and "batch 2 workers 1" in result.output
    record = json.loads(out.read_text())
    assert [r["config"]["batch_size"] for r in record["results"]] == [2]


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "2", "--batch-size", "1,x"], "--batch-size"),
    (["--synthetic", "2", "--batch-size", "0"], "--batch-size"),
    (["--synthetic", "2", "--workers", "-1"], "--workers"),
    (["--synthetic", "2", "--size", "huge"], "--size"),
    (["--synthetic", "2", "--precision", "fp32,fp16"], "--precision"),
    (["--synthetic", "2", "--validation"], "one input"),
    ([], "--synthetic"),
    (["nowhere/at/all"], "not found"),
])
def test_bench_command_user_mistakes_are_one_line(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_bench_without_inference_reports_the_hosts_cpu_ms_per_image(images, tmp_path):
    """--backend none: zero maps, no model run, everything else as in segment; the figure is
    the process's CPU time per image, so it is bounded by wall time x threads that can run."""
    record = bench(images, backend="none", batch_sizes=(2,), workers=(1,), repeat=2,
                   isolate=False, pure_images=2)
    assert record["backend"]["backend"] == "none"
    cores = record["machine"]["cores"]
    for r, threads in ((record["naive"], 1), (record["results"][0], cores)):
        assert r["images"] == 6 and r["errors"] == 0
        assert r["vessel_fraction"] == 0  # zero maps: no vessel anywhere
        wall_ms = 1000 / r["end_to_end_ips"]
        assert 0 < r["host_ms_per_image"] <= 1.3 * wall_ms * threads
    # each run's figure is its CPU seconds over its images; the record gives their median
    from retina_batch.bench import Config, _job, measure

    job = _job("pipeline", images, 6, Config(2, 1), backend="none", model=None, device="cpu",
               repeat=3, inflight=2, write=True, pure_images=2, pure_repeat=1)
    runs = measure(job)["runs"]
    for run in runs:
        rounding = 1000 * 5e-4 / run["images"] + 1e-3  # cpu_seconds is kept to 1 ms
        assert run["cpu_ms_per_image"] == pytest.approx(1000 * run["cpu_seconds"]
                                                        / run["images"], abs=rounding)
    result = CliRunner().invoke(main, ["bench", "--synthetic", "2", "--size", "96x80",
                                       "--backend", "none", "--repeat", "1", "--no-naive",
                                       "--json", str(tmp_path / "b.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["host_ms_per_image"] > 0


def test_no_inference_backend_stands_for_an_instant_device_in_the_gpu_resident_flow(
        images, tmp_path, monkeypatch):
    """--backend none --pixel-work device: the host's share of the GPU-resident flow. Every
    image goes through segment_decoded (no canvases made on the host), comes back as what a
    device returns (empty mask and FOV mask at the original size, quality columns left to the
    device), and is written like any other. JPEGs go undecoded, as to a GPU with nvJPEG: the
    host decodes nothing (its FOV then comes from a stand-in thumbnail), a PNG is decoded
    on the host as before."""
    import threading

    import cv2
    import numpy as np

    from retina_batch import io, segment
    from retina_batch.backends.none import NoInferenceBackend
    from retina_batch.io import read_mask
    from retina_batch.ledger import Ledger

    rows, decoded_in = {}, {"host": [], "device": []}
    original = io._decoded
    for flow in ("host", "device"):
        with monkeypatch.context() as patch:
            if flow == "device":  # canvases made on the host would fail their batch
                patch.setattr(NoInferenceBackend, "submit", None)
            patch.setattr(io, "_decoded", lambda *a, flow=flow: decoded_in[flow].append(
                threading.current_thread().name) or original(*a))
            summary = segment(images, tmp_path / flow, backend="none", pixel_work=flow)
        assert summary["counts"]["ok"] == 6 and summary["settings"]["pixel_work"] == flow
        rows[flow] = {r["path"]: r for r in Ledger.reader(tmp_path / flow).rows()}
    for path, row in rows["device"].items():
        host = rows["host"][path]
        assert (row["width"], row["height"], row["canvas"]) == \
               (host["width"], host["height"], host["canvas"])
        assert row["fov_found"] and 0.4 < row["fov_area"] / host["fov_area"] < 1.2
        assert row["qc_sharpness"] is None and host["qc_sharpness"] is not None
        mask = read_mask(tmp_path / "device" / row["output"])
        assert mask.shape == (row["height"], row["width"]) and not np.any(mask)
    # the pipeline's decode threads decoded every photograph in the host flow, none in the
    # device flow (the report's thumbnails are decoded after the run, in this thread)
    assert sum(name.startswith("decode") for name in decoded_in["host"]) == 6
    assert not any(name.startswith("decode") for name in decoded_in["device"])
    png = tmp_path / "png"
    png.mkdir()
    first = sorted(images.iterdir())[0]
    cv2.imwrite(str(png / "a.png"), cv2.imread(str(first)))
    summary = segment(png, tmp_path / "png-device", backend="none", pixel_work="device")
    row = next(Ledger.reader(tmp_path / "png-device").rows())
    assert summary["counts"]["ok"] == 1 and row["fov_area"] == rows["host"][str(first)]["fov_area"]
    for jpeg_decode, on_device in (("auto", True), ("host", False)):
        record = bench(images, backend="none", batch_sizes=(2,), workers=(1,), repeat=1,
                       isolate=False, pure_images=2, naive=False, pixel_work="device",
                       jpeg_decode=jpeg_decode)
        result = record["results"][0]
        assert result["config"]["pixel_work"] == "device" and result["errors"] == 0
        assert result["config"]["jpeg_on_device"] is on_device
        assert result["images"] == 6 and result["host_ms_per_image"] > 0


def test_segment_does_not_offer_the_no_inference_backend(tmp_path):
    result = CliRunner().invoke(main, ["segment", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--backend", "none"])
    assert result.exit_code == 2 and "none" in result.output


def test_bench_precisions_alternate_and_are_scored(tiny_pair, tmp_path):
    """--precision fp32,int8: the innermost matrix dimension (fp32 and int8 runs alternate),
    each configuration naming the file it ran; --truth adds a Dice from an untimed run."""
    images, truth = tmp_path / "images", tmp_path / "truth"
    write_synthetic(images, 3, (96, 96), "png", seed=1, masks=truth)
    order = []
    record = bench(images, model=tiny_pair, batch_sizes=(1, 2), workers=(1,),
                   precisions=("fp32", "int8"), truth=truth, repeat=1, rounds=2,
                   isolate=False, naive=False, pure_images=2,
                   on_progress=lambda label, d, t: order.append(label) if d == t else None)
    ran = [(r["config"]["batch_size"], r["precision"], Path(r["model"]).name)
           for r in record["results"]]
    assert ran == [(1, "fp32", "model.onnx"), (1, "int8", "model.int8.onnx"),
                   (2, "fp32", "model.onnx"), (2, "int8", "model.int8.onnx")]
    # round 1 of every configuration, then round 2: the rounds interleave
    assert [label.split("(")[-1] for label in order] == ["round 1/2)"] * 4 + ["round 2/2)"] * 4
    for r in record["results"]:
        _check_result(r, 3)
        assert len(r["end_to_end_runs"]) == 2  # one per round, pooled
        assert r["truth_images"] == 3 and 0 <= r["truth_dice"] <= 1
    # the same model at two batch sizes: the same masks, so the same Dice
    assert record["results"][0]["truth_dice"] == record["results"][2]["truth_dice"]


def test_bench_command_validation_needs_the_cards_photographs(tiny_onnx):
    result = CliRunner().invoke(main, ["bench", "--validation", "--model", str(tiny_onnx)])
    assert result.exit_code == 2 and "validation photographs are not on this disk" in \
        " ".join(result.output.split())
