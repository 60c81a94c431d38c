"""The ledger on its own: done?, record, rows, totals, the work list, several writers' files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from retina_batch.ledger import Ledger, RunSettings, ledger_files


def run(ledger: Ledger, run_id: str = "r1", sha: str = "abc", threshold: float = 0.45):
    ledger.begin(RunSettings(run_id, sha, threshold, "m.onnx"))
    return ledger


def put(ledger: Ledger, out: Path, key: str, status: str = "ok", size=10, mtime=5,
        kinds=("mask",), **row) -> dict:
    """Queue an input and record a result for it, writing its output files."""
    ledger.queue(key, f"/in/{key}", f"{key}.png", size, mtime, keep_result=False)
    outputs = {}
    for kind in kinds:
        path = out / kind / f"{key}.png" if kind != "mask" else out / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        outputs[kind] = ledger.relative(path)
    row = {"path": f"/in/{key}", "status": status, **row}
    ledger.record(key, status, row, outputs)
    return row


def test_done_needs_an_ok_row_the_same_file_and_every_wanted_output(tmp_path):
    ledger = run(Ledger(tmp_path))
    put(ledger, tmp_path, "a", kinds=("mask", "prob"))
    mask, prob = tmp_path / "a.png", tmp_path / "prob" / "a.png"
    entry = ledger.get("a")
    assert ledger.done(entry, 10, 5, {"mask": mask, "prob": prob})
    assert not ledger.done(entry, 11, 5, {"mask": mask})  # input changed size
    assert not ledger.done(entry, 10, 6, {"mask": mask})  # ... or modification time
    assert not ledger.done(entry, 10, 5, {"mask": mask, "overlay": tmp_path / "o" / "a.jpg"})
    assert not ledger.done(entry, 10, 5, {"mask": mask, "prob": tmp_path / "p2" / "a.png"})
    assert not ledger.done(None, 10, 5, {"mask": mask})
    prob.write_bytes(b"")  # an empty file is not a written output
    assert not ledger.done(entry, 10, 5, {"mask": mask, "prob": prob})
    mask.unlink()
    assert not ledger.done(entry, 10, 5, {"mask": mask})
    put(ledger, tmp_path, "b", status="error")
    assert not ledger.done(ledger.get("b"), 10, 5, {"mask": tmp_path / "b.png"})


def test_rows_hold_one_current_row_per_input_and_survive_reopening(tmp_path):
    ledger = run(Ledger(tmp_path))
    put(ledger, tmp_path, "b", status="error", message="decode: bad")
    put(ledger, tmp_path, "a", dice=0.5)
    put(ledger, tmp_path, "b", message="")  # retried, now ok
    ledger.queue("c", "/in/c", "c.png", 1, 1, keep_result=False)  # found, not processed
    ledger.close()
    ledger = Ledger(tmp_path)
    rows = list(ledger.rows())
    assert [(r["path"], r["status"]) for r in rows] == [("/in/a", "ok"), ("/in/b", "ok")]
    assert rows[0]["dice"] == 0.5
    assert ledger.totals() == {"done": 2, "failed": 0, "pending": 1}
    assert ledger.settings() == [{"model_sha256": "abc", "threshold": 0.45, "model": "m.onnx"}]
    ledger.close()
    assert [p.name for p in ledger_files(tmp_path)] == ["ledger-main.sqlite"]


def test_a_row_keeps_columns_the_code_does_not_know_yet(tmp_path):
    """Issue 13 adds measurement and qc columns: rows are JSON, so no migration."""
    ledger = run(Ledger(tmp_path))
    put(ledger, tmp_path, "a", qc="blurred", fractal_dimension=1.41)
    (row,) = ledger.rows()
    assert row["qc"] == "blurred" and row["fractal_dimension"] == 1.41


def test_queued_pages_through_the_work_list_while_results_are_recorded(tmp_path):
    ledger = run(Ledger(tmp_path))
    keys = [f"k{i:02d}" for i in range(23)]
    for key in reversed(keys):
        ledger.queue(key, f"/in/{key}", f"{key}.png", 1, 1, keep_result=False)
    ledger.queue("other", "/in/other", "other.png", 1, 1, keep_result=False)
    ledger.begin(RunSettings("r2", "abc", 0.45))
    for key in keys:
        ledger.queue(key, f"/in/{key}", f"{key}.png", 1, 1, keep_result=False)
    seen = []
    for entry in ledger.queued("r2", page=4):
        seen.append(entry.key)
        ledger.record(entry.key, "ok", {"path": entry.path})
    assert seen == keys  # in key order, each once; "other" belongs to run r1
    assert list(ledger.queued("r2")) == []


def test_keep_result_leaves_the_row_current_until_the_new_one_is_recorded(tmp_path):
    ledger = run(Ledger(tmp_path))
    put(ledger, tmp_path, "a", vessel_fraction=0.1)
    ledger.begin(RunSettings("r2", "abc", 0.45))
    ledger.queue("a", "/in/a", "a.png", 10, 5, keep_result=True)  # e.g. an overlay asked for
    assert [r["vessel_fraction"] for r in ledger.rows()] == [0.1]
    assert ledger.totals()["done"] == 1
    ledger.queue("a", "/in/a", "a.png", 11, 5, keep_result=False)  # the photograph changed
    assert list(ledger.rows()) == [] and ledger.totals()["pending"] == 1


def test_an_output_name_belongs_to_the_input_found_first_while_it_exists(tmp_path):
    ledger = run(Ledger(tmp_path))
    first = tmp_path / "a.jpg"
    first.write_bytes(b"x")
    ledger.queue("a.jpg", str(first), "a.png", 1, 1, keep_result=False)
    assert ledger.claim("a.png", "a.jpg") is None
    assert ledger.claim("a.png", "a.png").key == "a.jpg"
    first.unlink()  # gone: its entry gives the name up and leaves the ledger
    assert ledger.claim("a.png", "a.png") is None
    assert ledger.get("a.jpg") is None


def test_readers_read_every_writers_file_and_believe_the_newest_entry(tmp_path):
    """The layout shards and Ray workers will use: one file per writer, readers read all."""
    main = run(Ledger(tmp_path), "r1")
    put(main, tmp_path, "a", vessel_fraction=0.1)
    put(main, tmp_path, "b", status="error")
    main.close()
    shard = run(Ledger(tmp_path, writer="shard-1-of-2"), "r2", threshold=0.45)
    put(shard, tmp_path, "b", vessel_fraction=0.2)  # b retried by the other writer: ok now
    put(shard, tmp_path, "c", vessel_fraction=0.3)
    shard.close()
    reader = Ledger(tmp_path)
    assert [r["path"] for r in reader.rows()] == ["/in/a", "/in/b", "/in/c"]
    assert [r.get("vessel_fraction") for r in reader.rows()] == [0.1, 0.2, 0.3]
    assert reader.totals() == {"done": 3, "failed": 0, "pending": 0}
    assert reader.get("b").status == "ok" and reader.get("b").run_id == "r2"
    assert len(ledger_files(tmp_path)) == 2
    # The reader never writes another writer's file.
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.others[0].execute("DELETE FROM entries")


def test_a_writers_file_without_its_schema_yet_is_left_out(tmp_path):
    """A shard that has just created its file (zero bytes, no tables yet) while another process
    opens the folder: the reader leaves that file out instead of failing on it."""
    main = run(Ledger(tmp_path), "r1")
    put(main, tmp_path, "a")
    main.close()
    newborn = ledger_files(tmp_path)[0].with_name("ledger-shard-0-of-2.sqlite")
    newborn.touch()
    reader = Ledger(tmp_path, writer="shard-1-of-2")
    assert reader.writers == ["shard-1-of-2", "main"]
    assert [r["path"] for r in reader.rows()] == ["/in/a"]
    assert reader.totals() == {"done": 1, "failed": 0, "pending": 0}
    reader.close()


def test_reset_forgets_this_writers_results(tmp_path):
    ledger = run(Ledger(tmp_path))
    put(ledger, tmp_path, "a")
    ledger.reset()
    assert ledger.get("a") is None and ledger.settings() == [] and ledger.view_stale()


def test_an_in_memory_ledger_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ledger = run(Ledger(None))
    ledger.queue("a", "/in/a", "a.png", 1, 1, keep_result=False)
    ledger.record("a", "ok", {"path": "/in/a"})
    assert ledger.totals()["done"] == 1
    ledger.close()
    assert list(tmp_path.iterdir()) == []
