"""`kill -9` at any moment, then the same command again: exactly one ok row and one complete mask
of its own size per input, nothing partial (tests/kill_resume.py does the same with more kills).

One kill lands at a random moment; two land deterministically, through fault injection in a
fresh process: in the middle of writing a file, and between writing an image's files and
recording it in the ledger (the moment that used to lose metrics rows for ever).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
from kill_resume import (
    KILL_AFTER_FILE,
    KILL_IN_WRITE,
    PNG_END,
    check_folder,
    check_mask,
    fault,
    kill_at_random,
    make_inputs,
    masks_written,
    segment_argv,
    start,
)
from test_segment import rows_of


def finish(argv) -> None:
    proc = start(argv)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr


def test_kill_at_a_random_moment_then_rerun(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    sizes = make_inputs(src, 150)
    argv = segment_argv(tiny_onnx, src, out)
    seed = random.randrange(2**32)
    outcome = kill_at_random(start(argv), out, random.Random(seed), todo=len(sizes))
    assert outcome.startswith("killed"), (seed, outcome)
    assert 0 < masks_written(out) < len(sizes), (seed, outcome)
    finish(argv)
    assert check_folder(src, out, sizes) == [], f"seed {seed}"


@pytest.mark.parametrize("prelude", [KILL_IN_WRITE, KILL_AFTER_FILE],
                         ids=["in-the-middle-of-a-write", "files-written-row-not-recorded"])
def test_deterministic_kill_then_rerun(tiny_onnx, tmp_path, prelude):
    """Each image writes its probability map, then its mask: the 8th file is the 4th image's
    mask, killed half-way through writing it, or once it is written and before the image's
    row is recorded."""
    src, out, prob = tmp_path / "in", tmp_path / "out", tmp_path / "prob"
    sizes = make_inputs(src, 12)
    by_name = {Path(rel).with_suffix(".png").as_posix(): size for rel, size in sizes.items()}
    argv = segment_argv(tiny_onnx, src, out, "--prob", str(prob))
    proc = start(argv, fault(prelude, 8))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    written = {folder: [p for p in folder.rglob("*.png") if not p.name.startswith(".")]
               for folder in (out, prob)}
    assert len(written[out]) == 3 + (prelude == KILL_AFTER_FILE), written
    for folder, paths in written.items():  # under its final name, a file is always complete
        for path in paths:
            assert check_mask(path, by_name[path.relative_to(folder).as_posix()]) == [] \
                if folder == out else path.read_bytes().endswith(PNG_END), path
    finish(argv)
    assert check_folder(src, out, sizes) == []
    for name in by_name:
        assert (prob / name).read_bytes().endswith(PNG_END), name


def test_a_run_after_a_kill_first_rewrites_the_metrics_view(tiny_onnx, tmp_path):
    """A run killed after recording results but before rewriting metrics.csv leaves the view
    behind the ledger; the next run rewrites it before anything else, so a second kill cannot
    leave it behind for good."""
    from retina_batch.ledger import Ledger, RunSettings

    src, out = tmp_path / "in", tmp_path / "out"
    sizes = make_inputs(src, 3)
    argv = segment_argv(tiny_onnx, src, out)
    finish(argv)
    # What the killed run committed: a newer result for one input (here written directly).
    ledger = Ledger(out)
    entry = ledger.get("clinic0/0000.jpg")
    ledger.begin(RunSettings("killed-run", entry.model_sha256, entry.threshold))
    ledger.record(entry.key, "ok", {"path": entry.path, "status": "ok", "run_id": "killed-run"},
                  entry.outputs)
    ledger.close()
    (src / "clinic1" / "0001.png").touch()  # work for the next run, which is killed at once
    proc = start(argv, fault(KILL_AFTER_FILE, 1))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    rows = {r["path"]: r["run_id"] for r in rows_of(out / "metrics.csv")}
    assert rows[entry.path] == "killed-run" and len(rows) == len(sizes)
