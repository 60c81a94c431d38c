"""Faults the pipeline must survive, injected on purpose (never left to timing luck): a backend
that fails a batch, a file write that fails half-way, a disk that fills up, a symlink loop."""

from __future__ import annotations

import builtins
import errno
import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from test_segment import (
    PNG_END,
    RedChannelBackend,
    assert_mask,
    files_under,
    rows_of,
    segment_cli,
    write,
)
from tiny import fundus_like

import retina_batch.io
from retina_batch.pipeline import Options, Pipeline


def images(src: Path, n: int) -> list[str]:
    names = [f"{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        write(src / name, fundus_like(64 + i, 48, seed=i))
    return names


# --- a backend that fails ------------------------------------------------------------------

class FailsOneBatch(RedChannelBackend):
    """The second batch fails: as a future that raises (CUDA out of memory in the middle of a
    run), or when submitted."""

    batch_size = 2

    def __init__(self, at_submit: bool = False):
        self.calls, self.at_submit = 0, at_submit

    def submit(self, batch: np.ndarray) -> Future:
        self.calls += 1
        if self.calls != 2:
            return super().submit(batch)
        if self.at_submit:
            raise RuntimeError("device lost")
        future: Future = Future()
        future.set_exception(RuntimeError("CUDA error: out of memory"))
        return future


@pytest.mark.parametrize("at_submit", [False, True], ids=["future-raises", "submit-raises"])
def test_a_failed_batch_becomes_error_rows_and_the_run_goes_on(tmp_path, at_submit):
    src, out = tmp_path / "in", tmp_path / "out"
    names = images(src, 6)
    summary = Pipeline(FailsOneBatch(at_submit), Options(out=out, workers=1)).run(src)
    assert summary["counts"]["ok"] == 4 and summary["counts"]["error"] == 2
    rows = {Path(r["path"]).name: r for r in rows_of(out / "metrics.csv")}
    failed = {n for n, r in rows.items() if r["status"] == "error"}
    assert failed == {"2.png", "3.png"}  # the second batch, in the work list's order
    message = "device lost" if at_submit else "CUDA error: out of memory"
    assert all(rows[n]["message"] == f"infer: {message}" for n in failed)
    assert files_under(out) == sorted(
        [n for n in names if n not in failed] + ["metrics.csv", "report.html", "summary.json"])
    # The next run does the two failed images and only them.
    summary = Pipeline(RedChannelBackend(), Options(out=out, workers=1)).run(src)
    assert (summary["counts"]["ok"], summary["counts"]["skipped"]) == (2, 4)
    assert [r["status"] for r in rows_of(out / "metrics.csv")] == ["ok"] * 6


# --- a write that fails half-way -------------------------------------------------------------

def half_then_fail(target: Path):
    """An `open` for retina_batch.io that, for the file written as `target` (under its final
    or a temporary name), writes half of the bytes and then fails as a full disk would."""

    class HalfThenFail:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        path = Path(path)
        if "w" in mode and path.parent == target.parent and target.name in path.name:
            return HalfThenFail(f)
        return f

    return fake_open


@pytest.mark.parametrize("kind", ["prob", "overlay", "mask"])
def test_a_write_that_fails_half_way_leaves_nothing_and_is_redone(tiny_onnx, tmp_path,
                                                                  monkeypatch, kind):
    src, out = tmp_path / "in", tmp_path / "out"
    folders = {"mask": out, "prob": tmp_path / "prob", "overlay": tmp_path / "over"}
    images(src, 4)
    target = folders[kind] / ("1.jpg" if kind == "overlay" else "1.png")
    args = ("--prob", str(folders["prob"]), "--overlay", str(folders["overlay"]), "--json")
    monkeypatch.setattr(retina_batch.io, "open", half_then_fail(target), raising=False)
    result = segment_cli(tiny_onnx, src, out, *args, workers=1)
    assert result.exit_code == 1, result.output
    (failed,) = json.loads(result.stdout)["failures"]
    assert Path(failed["path"]).name == "1.png"
    assert failed["message"] == "write: [Errno 28] No space left on device"
    # Nothing under the final name (no truncated file), no temporary left behind either:
    # the folder holds the other three images' files and nothing else.
    assert not target.exists()
    if kind != "mask":  # the mask is written last: a failed image has none
        assert not (out / "1.png").exists()
    others = [f"{i}{target.suffix}" for i in (0, 2, 3)]
    assert files_under(folders[kind]) == sorted(
        others + (["metrics.csv", "report.html", "summary.json"] if kind == "mask" else []))

    monkeypatch.undo()
    result = segment_cli(tiny_onnx, src, out, *args, workers=1)
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["counts"]
    assert (counts["ok"], counts["skipped"]) == (1, 3)
    assert target.read_bytes().endswith(PNG_END if kind != "overlay" else b"\xff\xd9")
    assert [r["status"] for r in rows_of(out / "metrics.csv")] == ["ok"] * 4


def test_write_atomic_on_a_full_disk_keeps_the_old_file_whole(tmp_path):
    """A real short write (RLIMIT_FSIZE makes write() fail with EFBIG past 4 KiB), in a
    process of its own: the file under the final name keeps its old bytes."""
    target = tmp_path / "mask.png"
    target.write_bytes(b"old mask")
    code = f"""
import resource, signal
from retina_batch.io import write_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    write_atomic({str(target)!r}, bytes(100_000))
except OSError as e:
    print(e.errno)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == str(errno.EFBIG), proc.stderr
    assert target.read_bytes() == b"old mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


# --- a symlink loop in the input ------------------------------------------------------------

def test_symlink_loops_in_the_input_are_skipped_and_other_links_followed(tiny_onnx, tmp_path):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    write(src / "a.png", fundus_like(60, 50))
    write(src / "sub" / "b.png", fundus_like(61, 51))
    write(elsewhere / "c.png", fundus_like(62, 52))
    (src / "sub" / "loop").symlink_to(src)  # back to an ancestor: would never end
    (src / "self").symlink_to("self")  # a link to itself: ELOOP on stat
    (src / "linked").symlink_to(elsewhere)  # an ordinary link to a folder: followed
    result = segment_cli(tiny_onnx, src, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "out") == [
        "a.png", "linked/c.png", "metrics.csv", "report.html", "sub/b.png", "summary.json"]
    assert_mask(tmp_path / "out" / "linked" / "c.png", (62, 52))
