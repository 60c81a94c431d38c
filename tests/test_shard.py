"""`segment --shard I/N` and `merge`: N real processes into one output folder, each input done
by exactly one of them, one metrics.csv for the whole folder, masks identical to one run; a
killed shard re-run alone; the partition does not move old inputs when files are added."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from channel_model import write_channel_onnx
from click.testing import CliRunner
from kill_resume import (
    KILL_AFTER_FILE,
    check_folder,
    fault,
    make_inputs,
    segment_argv,
    start,
)
from test_resume import refused
from test_segment import rows_of, segment_cli, write
from tiny import fundus_like

from retina_batch.cli import main
from retina_batch.ledger import LEDGER_DIR
from retina_batch.shard import Shard, shard_of


def finish(argv) -> None:
    """Run `retina-batch ARGV` to the end in this process (concurrent and killed runs, which
    need processes of their own, use kill_resume.start)."""
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output


def shard_argv(model: Path, src: Path, out: Path, shard: str, *extra: str) -> list[str]:
    return segment_argv(model, src, out, "--shard", shard, *extra)


def merge_cli(out: Path, *extra: str):
    result = CliRunner().invoke(main, ["merge", str(out), *extra])
    assert "Traceback" not in result.output, result.output
    return result


def ledger_keys(out: Path, writer: str, status: str = "ok") -> set[str]:
    path = out / LEDGER_DIR / f"ledger-{writer}.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {k for (k,) in db.execute("SELECT key FROM entries WHERE status = ?", (status,))}


def mask_name(rel: str) -> str:
    return Path(rel).with_suffix(".png").as_posix()


# --- the whole story: three concurrent shards, merge, the same masks as one run ------------

def test_three_concurrent_shards_do_every_input_once_and_merge_to_one_run(tmp_path):
    # The channel model (probability = red / 255): each mask depends on its own photograph.
    tiny_onnx = write_channel_onnx(tmp_path / "model")
    src, out, single = tmp_path / "in", tmp_path / "out", tmp_path / "single"
    sizes = make_inputs(src, 24)
    procs = [start(shard_argv(tiny_onnx, src, out, f"{i}/3")) for i in range(3)]
    for proc in procs:  # all three started before any is waited for: they run at once
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    # A shard writes its own ledger and summary, never the folder's metrics.csv / summary.json.
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()
    done = [ledger_keys(out, f"shard-{i}-of-3") for i in range(3)]
    assert all(done), [len(d) for d in done]  # every shard had work
    assert sum(map(len, done)) == len(sizes) and set().union(*done) == set(sizes)
    for i in range(3):
        shard_summary = json.loads((out / LEDGER_DIR / f"summary-shard-{i}-of-3.json").read_text())
        assert shard_summary["counts"]["ok"] == len(done[i]) == shard_summary["inputs"]

    result = merge_cli(out)
    assert result.exit_code == 0, result.output
    assert check_folder(src, out, sizes) == []  # one ok row per input, every mask, totals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["incomplete"] == [] and len(summary["settings"]) == 1
    assert {w: info["done"] for w, info in summary["writers"].items()} == {
        f"shard-{i}-of-3": len(done[i]) for i in range(3)}

    finish(segment_argv(tiny_onnx, src, single))
    for rel in sizes:
        assert (out / mask_name(rel)).read_bytes() == (single / mask_name(rel)).read_bytes(), rel


def test_a_killed_shard_is_reported_by_merge_and_completes_when_rerun_alone(tiny_onnx,
                                                                           tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    sizes = make_inputs(src, 18)
    for i in (0, 2):
        finish(shard_argv(tiny_onnx, src, out, f"{i}/3"))
    # Shard 1 is killed once its 3rd mask is on disk, before that image is recorded.
    killed = start(shard_argv(tiny_onnx, src, out, "1/3"), fault(KILL_AFTER_FILE, 3))
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    others = {i: (out / LEDGER_DIR / f"ledger-shard-{i}-of-3.sqlite").read_bytes()
              for i in (0, 2)}

    result = merge_cli(out)
    assert result.exit_code == 1
    assert "shard-1-of-3" in result.stderr and "--shard 1/3" in result.stderr
    assert "shard-0-of-3" not in result.stderr and "shard-2-of-3" not in result.stderr
    assert json.loads((out / "summary.json").read_text())["folder"]["pending"] > 0

    finish(shard_argv(tiny_onnx, src, out, "1/3"))
    for i, before in others.items():  # the re-run touched no other shard's ledger
        assert (out / LEDGER_DIR / f"ledger-shard-{i}-of-3.sqlite").read_bytes() == before
    assert merge_cli(out).exit_code == 0
    assert check_folder(src, out, sizes) == []


# --- the partition -------------------------------------------------------------------------

def test_adding_files_moves_no_old_input_to_another_shard(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(0, 20, 2):
        write(src / f"{i:03d}.png", fundus_like(70, 60, seed=i))
    finish(shard_argv(tiny_onnx, src, out, "0/2"))
    first = ledger_keys(out, "shard-0-of-2")
    # New files sort between the old ones (an index-based split would shift every old input).
    for i in range(1, 20, 2):
        write(src / f"{i:03d}.png", fundus_like(70, 60, seed=i))
    finish(shard_argv(tiny_onnx, src, out, "0/2"))
    finish(shard_argv(tiny_onnx, src, out, "1/2"))
    summary = json.loads((out / LEDGER_DIR / "summary-shard-0-of-2.json").read_text())
    assert summary["counts"]["skipped"] == len(first)  # the old ones: still shard 0's, done
    zero, one = ledger_keys(out, "shard-0-of-2"), ledger_keys(out, "shard-1-of-2")
    assert first <= zero and one and not zero & one and len(zero | one) == 20
    assert merge_cli(out).exit_code == 0
    assert Counter(Path(r["path"]).name for r in rows_of(out / "metrics.csv")) == Counter(
        f"{i:03d}.png" for i in range(20))


def test_the_partition_is_balanced_and_keeps_one_mask_name_in_one_shard():
    keys = [f"site{i % 7}/{i:05d}.jpg" for i in range(3000)]
    for n in (2, 3, 8):
        sizes = Counter(shard_of(k, n) for k in keys)
        assert set(sizes) == set(range(n))
        assert all(abs(size - len(keys) / n) < 0.15 * len(keys) / n for size in sizes.values())
    for key in keys[:300]:  # a.jpg and a.png write the same mask: they must share a process
        stem = key.removesuffix(".jpg")
        for n in (2, 3, 7):
            assert shard_of(f"{stem}.png", n) == shard_of(key, n) == shard_of(f"{stem}.TIF", n)


def test_inputs_with_one_mask_name_stay_in_one_shard(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    pairs = [f"eye{i}" for i in range(4)]
    for i, stem in enumerate(pairs):
        write(src / f"{stem}.jpg", fundus_like(80, 70, seed=i))
        write(src / f"{stem}.png", fundus_like(80, 70, seed=10 + i))
    for i in range(3):
        start(shard_argv(tiny_onnx, src, out, f"{i}/3")).communicate(timeout=300)
    held = {f"shard-{i}-of-3": ledger_keys(out, f"shard-{i}-of-3", "ok")
            | ledger_keys(out, f"shard-{i}-of-3", "error") for i in range(3)}
    for stem in pairs:  # both files of a pair were decided by one process
        assert [w for w, keys in held.items() if {f"{stem}.jpg", f"{stem}.png"} <= keys], held
    merge_cli(out)
    rows = rows_of(out / "metrics.csv")
    assert len(rows) == 8
    for stem in pairs:  # exactly one of them writes the mask
        assert sorted(r["status"] for r in rows if Path(r["path"]).stem == stem) == [
            "error", "ok"]


# --- usage errors and the settings check ---------------------------------------------------

@pytest.mark.parametrize("spec", ["3/3", "x", "1/0", "-1/3", "1/2/3", "", "a/b"])
def test_a_bad_shard_is_a_one_line_usage_error(tiny_onnx, tmp_path, spec):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(70, 60))
    refused(segment_cli(tiny_onnx, src, tmp_path / "out", "--shard", spec), "--shard")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [
    (("--ray",), ("--shard and --ray",)),
    (("--metrics", "m.csv"), ("--metrics", "merge")),
])
def test_shard_with_options_it_cannot_honour_is_refused(tiny_onnx, tmp_path, extra, words):
    src = tmp_path / "in"
    write(src / "a.png", fundus_like(70, 60))
    refused(segment_cli(tiny_onnx, src, tmp_path / "out", "--shard", "0/2", *extra), *words)
    assert not (tmp_path / "out").exists()


def test_spec_parsing_accepts_every_valid_shard():
    assert [Shard.parse(f"{i}/4") for i in range(4)] == [Shard(i, 4) for i in range(4)]
    assert Shard.parse(" 2 / 5 ") == Shard(2, 5) and Shard.parse("0/1").writer == "shard-0-of-1"


def test_another_threshold_in_another_shard_is_refused_and_merge_refuses_a_mix(tiny_onnx,
                                                                               tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(8):
        write(src / f"{i}.png", fundus_like(70, 60, seed=i))
    finish(shard_argv(tiny_onnx, src, out, "0/2"))
    refused(segment_cli(tiny_onnx, src, out, "--shard", "1/2", "--threshold", "0.3"),
            "threshold 0.5", "threshold 0.3")
    assert not ledger_keys(out, "shard-1-of-2")
    # --overwrite lets shard 1 redo ITS inputs at 0.3: the folder is now a mix, merge refuses.
    finish(shard_argv(tiny_onnx, src, out, "1/2", "--threshold", "0.3", "--overwrite"))
    refused(merge_cli(out), "2 models or thresholds", "--overwrite")
    finish(shard_argv(tiny_onnx, src, out, "0/2", "--threshold", "0.3", "--overwrite"))
    assert merge_cli(out).exit_code == 0
    assert {r["threshold"] for r in rows_of(out / "metrics.csv")} == {"0.3"}


def test_shards_that_redo_every_input_with_overwrite_free_the_folder_for_plain_runs(
        tiny_onnx, tmp_path):
    """A plain run's ledger still lists threshold 0.5 after both shards redid their inputs at
    0.3 with --overwrite (a shard resets only its own file): only what made the current rows
    counts, so a plain run at 0.3 resumes, and one at 0.5 is refused."""
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        write(src / f"{i}.png", fundus_like(70, 60, seed=i))
    finish(segment_argv(tiny_onnx, src, out))
    for i in range(2):
        finish(shard_argv(tiny_onnx, src, out, f"{i}/2", "--threshold", "0.3", "--overwrite"))
    result = segment_cli(tiny_onnx, src, out, "--threshold", "0.3", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["skipped"] == 6
    refused(segment_cli(tiny_onnx, src, out), "threshold 0.3", "threshold 0.5")


# --- merge on its own, and plain runs in a sharded folder ---------------------------------

def test_merge_of_a_folder_without_a_ledger_is_a_usage_error(tmp_path):
    refused(merge_cli(tmp_path / "nothing"), "no retina-batch ledger", "segment")
    assert not (tmp_path / "nothing").exists()


def test_merge_lists_failed_images_and_exits_1(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        write(src / f"{i}.png", fundus_like(70, 60, seed=i))
    (src / "broken.png").write_bytes(b"not a png")
    for i in range(2):
        assert CliRunner().invoke(main, shard_argv(tiny_onnx, src, out, f"{i}/2")).exit_code \
            in (0, 1)
    result = merge_cli(out, "--json", "--metrics", str(tmp_path / "all.csv"))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["folder"] == {"done": 4, "failed": 1, "pending": 0}
    assert [Path(f["path"]).name for f in summary["failures"]] == ["broken.png"]
    with open(tmp_path / "all.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_a_plain_run_after_shards_shows_their_results_in_its_metrics(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        write(src / f"{i}.png", fundus_like(70, 60, seed=i))
    finish(segment_argv(tiny_onnx, src, out))
    first = {r["run_id"] for r in rows_of(out / "metrics.csv")}
    finish(shard_argv(tiny_onnx, src, out, "0/1", "--overwrite"))  # redoes all, own ledger
    result = segment_cli(tiny_onnx, src, out, "--json", "-q")
    assert json.loads(result.stdout)["counts"] == {"ok": 0, "error": 0, "skipped": 4,
                                                   "no_fov": 0, "processed": 0}
    rows = rows_of(out / "metrics.csv")
    assert len(rows) == 4 and not {r["run_id"] for r in rows} & first
