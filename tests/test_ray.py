"""`segment --ray` on a local Ray instance (2 CPUs): the same masks as the local pipeline, one
row per input, a re-run that redoes nothing, and a write actor killed in the middle of a batch
that Ray restarts and retries without losing or doubling anything. Skipped without Ray
(pip install 'retina-batch[ray]')."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from channel_model import write_channel_onnx
from click.testing import CliRunner
from kill_resume import check_folder, make_inputs
from test_resume import refused
from test_segment import rows_of, segment_cli

ray = pytest.importorskip("ray", reason="the Ray tests need pip install 'retina-batch[ray]'",
                          exc_type=ImportError)
pytest.importorskip("ray.data", reason="the Ray tests need Ray Data: 'retina-batch[ray]'",
                    exc_type=ImportError)

from retina_batch.cli import main  # noqa: E402
from retina_batch.ledger import LEDGER_DIR  # noqa: E402
from retina_batch.ray_runner import Pools, segment_ray  # noqa: E402

TESTS = Path(__file__).resolve().parent
SMALL = Pools(infer=1, infer_resources={"num_cpus": 0.5}, write=1)  # + 1 CPU to decode


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray instance for the module (starting one takes seconds), with the fault
    hook of ray_faults.py in every worker process."""
    faults = tmp_path_factory.mktemp("ray-faults")
    env = {"RETINA_BATCH_RAY_FAULTS": str(faults),
           "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the local instance's workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error",
             runtime_env={"worker_process_setup_hook": "ray_faults.setup"})
    yield faults
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def metrics_rows(folder: Path) -> Counter:
    """(input, status, width, height, vessel fraction) of every metrics.csv row, counted."""
    return Counter((r["path"], r["status"], r["width"], r["height"], r["vessel_fraction"])
                   for r in rows_of(folder / "metrics.csv"))


def masks(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")
            if not p.name.startswith(".")}


def test_ray_run_equals_the_local_run_and_a_rerun_redoes_nothing(ray_instance, tmp_path):
    # The channel model (probability = red / 255): every image's mask is its own, so a
    # prediction handed to the wrong image in a batch shows.
    tiny_onnx = write_channel_onnx(tmp_path / "model")
    src, out, local = tmp_path / "in", tmp_path / "out", tmp_path / "local"
    make_inputs(src, 12)
    (src / "broken.png").write_bytes(b"not an image")
    summary = segment_ray(src, out, model=tiny_onnx, pools=SMALL, prob_dir=tmp_path / "p")
    assert summary["counts"]["ok"] == 12 and summary["counts"]["error"] == 1
    assert segment_cli(tiny_onnx, src, local, "-q", "--prob", str(tmp_path / "local-p")
                       ).exit_code == 1  # the broken file
    assert masks(out) == masks(local) and len(masks(out)) == 12  # byte for byte: Dice 1.0
    assert masks(tmp_path / "p") == masks(tmp_path / "local-p")
    assert metrics_rows(out) == metrics_rows(local)  # one per input, the same status each

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = segment_ray(src, out, model=tiny_onnx, pools=SMALL, prob_dir=tmp_path / "p")
    assert again["counts"]["processed"] == 1 and again["counts"]["skipped"] == 12  # the error
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert metrics_rows(out) == metrics_rows(local)
    # The actors' ledger files were folded into the folder's own: one file, not one per actor.
    assert [p.name for p in (out / LEDGER_DIR).glob("ledger-*.sqlite")] == ["ledger-main.sqlite"]


def test_a_write_actor_killed_mid_batch_is_restarted_and_nothing_is_lost_or_doubled(
        ray_instance, tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    sizes = make_inputs(src, 16)
    (ray_instance / "kill-write-actor").touch()
    try:
        summary = segment_ray(src, out, model=tiny_onnx, pools=SMALL)
    finally:
        (ray_instance / "kill-write-actor").unlink()
    assert (ray_instance / "fired").exists()  # the kill happened
    assert summary["counts"]["ok"] == 16 and summary["folder"] == {
        "done": 16, "failed": 0, "pending": 0}
    assert check_folder(src, out, sizes) == []


def test_the_cli_runs_on_ray_and_refuses_what_ray_cannot_do(ray_instance, tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src, 3)
    result = CliRunner().invoke(main, ["segment", str(src), "--out", str(out), "--model",
                                       str(tiny_onnx), "--ray", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["ok"] == 3
    refused(segment_cli(tiny_onnx, src, out, "--ray", "--shard", "0/2"), "--shard and --ray")
