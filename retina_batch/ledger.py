"""The output folder's ledger: what was made for every input, by which model, from which file.

Layout inside the output folder OUT:

    OUT/.retina-batch/ledger-<writer>.sqlite    one file per writer process: 'main' (a plain
                                                run, the Ray driver), 'shard-I-of-N' (--shard),
                                                'ray-<actor id>' (a Ray write actor; folded
                                                into 'main' by `absorb` when its run is over)

A writer process owns exactly one ledger file and is the only process that ever writes it;
readers (resume checks, totals, the metrics.csv view, the settings check) read every
`ledger-*.sqlite` of the folder and, for an input found in several, believe the newest entry.
That is what lets `--shard I/N` processes, possibly on N machines sharing a network file system,
and Ray workers write into one OUT later: SQLite's file locking is unreliable on NFS, so no
two processes ever write the same file. (A reader on another host should read a writer's file
once that writer has finished, e.g. when merging at the end; SQLite cannot promise more there.)

Why SQLite: it is in the standard library, a lookup by key costs microseconds and a few
kilobytes of page cache however many inputs there are (a Python set of 10 million paths is
~1 GB), and a transaction is either on disk whole or not at all, so a `kill -9` at any moment
leaves the last committed state. Why the WAL journal: a commit appends to one file instead of
rewriting pages in place (cheap enough to commit every few dozen images with
synchronous=NORMAL; a kill loses at most the uncommitted rows, whose images are simply redone),
and readers in other processes of the same host see a consistent snapshot while the writer
goes on.

One row per input, keyed by its path relative to the input root (POSIX separators):

    key, path           the input relative to the root; the path as the run found it
    output              the mask's path relative to OUT (NULL for an input refused because
                        another input already writes that name)
    size, mtime_ns      of the input when it was found: a changed file is redone
    status              pending (found, no result yet) | ok | error
    outputs             JSON {kind: path relative to OUT} of what was written: mask, prob, overlay
    model_sha256,       what made the result (the settings check compares them with a new run's)
    threshold
    queued              the run that must (re)process this input; NULL once recorded
    run_id, recorded_ns who wrote the row and when (newest wins across ledger files)
    row                 the metrics row as JSON: any columns, so adding a column to the metrics
                        (records.METRIC_FIELDS) needs no schema change here

`settings` lists every (model, threshold) that made an ok row since the folder was last reset
(`--overwrite`); `meta` holds the schema version and whether metrics.csv is stale.
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_DIR = ".retina-batch"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    output TEXT,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '{}',
    model_sha256 TEXT,
    threshold REAL,
    queued TEXT,
    run_id TEXT NOT NULL,
    recorded_ns INTEGER NOT NULL,
    row TEXT
);
CREATE INDEX IF NOT EXISTS entries_by_output ON entries(output);
CREATE INDEX IF NOT EXISTS entries_queued ON entries(queued, key) WHERE queued IS NOT NULL;
CREATE TABLE IF NOT EXISTS settings (
    model_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,
    model TEXT,
    PRIMARY KEY (model_sha256, threshold)
);
"""

_COLUMNS = ("key, path, output, size, mtime_ns, status, outputs, model_sha256, threshold, "
            "queued, run_id, recorded_ns")


@dataclass
class Entry:
    """One input's state in the ledger (the metrics row itself is read only by `rows`)."""

    key: str
    path: str
    output: str | None
    size: int
    mtime_ns: int
    status: str
    outputs: dict = field(default_factory=dict)
    model_sha256: str | None = None
    threshold: float | None = None
    queued: str | None = None
    run_id: str = ""
    recorded_ns: int = 0

    @classmethod
    def from_row(cls, r: tuple) -> Entry:
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), *r[7:12])


@dataclass(frozen=True)
class RunSettings:
    """What this run makes results with: stamped on every row it records."""

    run_id: str
    model_sha256: str | None
    threshold: float
    model: str = ""


def ledger_files(folder: Path) -> list[Path]:
    """Every writer's ledger file in an output folder, in a stable order."""
    return sorted((Path(folder) / LEDGER_DIR).glob("ledger-*.sqlite"))


def _connect(path: str | Path, read_only: bool = False,
             any_thread: bool = False) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True,
                               check_same_thread=not any_thread)
    db = sqlite3.connect(path, check_same_thread=not any_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable against process kills, fsync per checkpoint
    db.execute("PRAGMA cache_size=-16000")  # 16 MB of page cache, whatever the number of rows
    return db


class Ledger:
    """This writer's ledger file (read-write) and the folder's other ledger files (read-only).

    The interface the pipeline uses: `get` / `done` (resume), `queue` and `record` (writes),
    `queued` (this run's work list), `rows` (the metrics view), `totals`, `settings`.
    `folder=None` keeps the ledger in memory (runs that write no files, e.g. benchmarks).
    """

    COMMIT_EVERY, COMMIT_SECONDS = 256, 1.0

    def __init__(self, folder: Path | None, writer: str = "main", any_thread: bool = False):
        """`any_thread`: used from several threads, one at a time (the caller serialises;
        Ray runs an actor's calls on threads of its own)."""
        self.folder = Path(folder) if folder is not None else None
        self.writer, self._any_thread = writer, any_thread
        if self.folder is None:
            self.path = None
            self.db = _connect(":memory:")
        else:
            self.path = self.folder / LEDGER_DIR / f"ledger-{writer}.sqlite"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = _connect(self.path, any_thread=any_thread)
        self.db.executescript(_SCHEMA)
        version = self._meta("schema")
        if version is None:
            self._set_meta("schema", str(SCHEMA_VERSION))
        elif int(version) > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer retina-batch "
                               f"(ledger schema {version}); upgrade retina-batch")
        self.db.commit()
        self._open_others([p for p in (ledger_files(self.folder) if self.folder else [])
                           if p != self.path])
        self.run: RunSettings | None = None
        self._uncommitted, self._last_commit = 0, time.monotonic()
        self._settings_stamped = self._view_marked = False

    @classmethod
    def reader(cls, folder: Path) -> Ledger:
        """Every ledger file of `folder`, read-only: for `merge`, which writes no ledger (its
        own part is an empty in-memory one, so it creates no file and owns none)."""
        ledger = cls(None, writer="merge")
        ledger.folder = Path(folder)
        for db in ledger.others:
            db.close()
        ledger._open_others(ledger_files(ledger.folder))
        return ledger

    def _open_others(self, paths: list[Path]) -> None:
        """The other writers' files, read-only. A file whose writer is still creating it (a
        shard started at the same moment) has no schema yet and nothing to read: left out."""
        self.others, self.writers = [], [self.writer]
        for path in paths:
            db = _connect(path, read_only=True, any_thread=self._any_thread)
            if _has_schema(db):
                self.others.append(db)
                self.writers.append(writer_of(path))
            else:
                db.close()

    # --- reading (every ledger file of the folder) -----------------------------------------
    def get(self, key: str) -> Entry | None:
        """The newest entry for an input across the folder's ledger files, or None."""
        found = [r for db in self._all() for r in db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE key = ?", (key,))]
        return Entry.from_row(max(found, key=lambda r: r[11])) if found else None

    def done(self, entry: Entry | None, size: int, mtime_ns: int,
             wanted: dict[str, Path]) -> bool:
        """True when the ledger says this input is finished, from this very file (same size
        and modification time), and every wanted output (kind -> path) was written by it and
        is still there. Anything less and the input is processed again."""
        if entry is None or entry.status != "ok" or (entry.size, entry.mtime_ns) != (
                size, mtime_ns):
            return False
        return all(entry.outputs.get(kind) == self.relative(path) and _non_empty(path)
                   for kind, path in wanted.items())

    def claim(self, output: str, key: str) -> Entry | None:
        """Claim the mask name `output` for input `key`: returns the other input that already
        writes it and still exists (the claim is refused: the input found first keeps a name),
        or None. Entries of inputs that no longer exist give the name up and are forgotten.
        An index lookup: no set of names in memory."""
        for db in self._all():
            for r in db.execute(f"SELECT {_COLUMNS} FROM entries WHERE output = ? AND key != ?",
                                (output, key)).fetchall():
                if os.path.exists(r[1]):
                    return Entry.from_row(r)
                if db is self.db:
                    self.forget(r[0])
        return None

    def queued(self, run_id: str, page: int = 256) -> Iterator[Entry]:
        """This run's work list in key order, read a page at a time (memory stays flat)."""
        last = ""
        while True:
            batch = self.db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE queued = ? AND key > ? "
                "ORDER BY key LIMIT ?", (run_id, last, page)).fetchall()
            if not batch:
                return
            for r in batch:
                yield Entry.from_row(r)
            last = batch[-1][0]

    def rows(self) -> Iterator[dict]:
        """The current metrics row of every input that has a result, in key order: one per
        input whatever happened before (the newest entry wins across ledger files)."""
        for _key, _ns, status, row in self._newest(
                "SELECT key, recorded_ns, status, row FROM entries ORDER BY key"):
            if status != "pending":
                yield json.loads(row)

    def current(self) -> Iterator[tuple]:
        """(key, recorded_ns, status, model_sha256, threshold, writer) of every input's newest
        entry, in key order: what `merge` checks (settings, which writer left what pending)."""
        return self._newest("SELECT key, recorded_ns, status, model_sha256, threshold "
                            "FROM entries ORDER BY key", tagged=True)

    def totals(self) -> dict:
        """Inputs of the folder by state: done (ok), failed (error), pending (no result)."""
        counts = {"ok": 0, "error": 0, "pending": 0}
        if not self.others:  # one writer: let SQLite count
            for status, n in self.db.execute(
                    "SELECT status, COUNT(*) FROM entries GROUP BY status"):
                counts[status] = n
        else:
            for _key, _ns, status in self._newest(
                    "SELECT key, recorded_ns, status FROM entries ORDER BY key"):
                counts[status] += 1
        return {"done": counts["ok"], "failed": counts["error"], "pending": counts["pending"]}

    def settings(self) -> list[dict]:
        """Every (model, threshold) that made the folder's current ok rows. With one ledger file
        its settings table says so; with several, only what made each input's newest entry
        counts: a shard's --overwrite redoes its inputs without touching the other writers'
        files, and once every input is redone the old settings made nothing that is left."""
        found = {}
        for db in self._all():
            for sha, threshold, model in db.execute(
                    "SELECT model_sha256, threshold, model FROM settings"):
                found[(sha, threshold)] = {"model_sha256": sha, "threshold": threshold,
                                           "model": model}
        if self.others:
            live = {(sha, threshold) for _key, _ns, status, sha, threshold, _writer
                    in self.current() if status == "ok"}
            found = {k: v for k, v in found.items() if k in live}
        return sorted(found.values(), key=lambda s: (s["model_sha256"] or "", s["threshold"]))

    # --- writing (this writer's file only) ----------------------------------------------------
    def begin(self, run: RunSettings) -> None:
        self.run = run

    def queue(self, key: str, path: str, output: str, size: int, mtime_ns: int,
              keep_result: bool) -> None:
        """Put an input on this run's work list. `keep_result`: its current row and outputs stay
        valid until the new ones are recorded (only an output is missing, e.g. an overlay);
        otherwise it becomes pending (new, changed, or its files are gone)."""
        if keep_result and self._owns(key):
            self._write("UPDATE entries SET queued = ? WHERE key = ?", (self.run.run_id, key))
            return
        self._write(
            "INSERT OR REPLACE INTO entries (key, path, output, size, mtime_ns, status, "
            "outputs, queued, run_id, recorded_ns) VALUES (?, ?, ?, ?, ?, 'pending', '{}', ?, "
            "?, ?)", (key, path, output, size, mtime_ns, self.run.run_id, self.run.run_id,
                      time.time_ns()))

    def record(self, key: str, status: str, row: dict, outputs: dict[str, str] | None = None,
               input_stat: tuple[str, str | None, int, int] | None = None) -> None:
        """Store an input's result (status ok or error) and its metrics row, replacing what was
        there. `input_stat` = (path, output, size, mtime_ns) for an input that was never
        queued (refused at discovery); otherwise the queued entry's are kept."""
        run = self.run
        args = (status, json.dumps(outputs or {}), run.model_sha256 if status == "ok" else None,
                run.threshold if status == "ok" else None, run.run_id, time.time_ns(),
                json.dumps(row, default=_plain, separators=(",", ":")))
        if input_stat is None:
            self._write("UPDATE entries SET status = ?, outputs = ?, model_sha256 = ?, "
                        "threshold = ?, queued = NULL, run_id = ?, recorded_ns = ?, row = ? "
                        "WHERE key = ?", (*args, key))
        else:
            self._write(f"INSERT OR REPLACE INTO entries ({_COLUMNS}, row) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                        (key, *input_stat, *args))
        if status == "ok" and not self._settings_stamped:
            self._write("INSERT OR IGNORE INTO settings VALUES (?, ?, ?)",
                        (run.model_sha256, run.threshold, run.model))
            self._settings_stamped = True
        self.mark_view_stale()

    def absorb(self, path: Path) -> None:
        """Take over the entries and settings of a writer that is finished for good (a Ray
        write actor of a run that is over: Ray names them by actor id, so none ever reopens its
        file), then delete its file, so the folder does not gather one file per actor per run.
        Where both files hold an input, the newer entry is kept. A kill between the commit and
        the deletion leaves the same entries in two files: harmless, and absorbed again."""
        self.commit()
        name = writer_of(path)
        if name in self.writers[1:]:  # opened for reading at the start: let go of it first
            index = self.writers.index(name, 1)
            self.others.pop(index - 1).close()
            self.writers.pop(index)
        probe = _connect(path, read_only=True)
        readable = _has_schema(probe)
        probe.close()
        if readable:
            self._take_over(path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    def _take_over(self, path: Path) -> None:
        self.db.execute("ATTACH DATABASE ? AS finished", (str(path),))
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO entries SELECT f.* FROM finished.entries f LEFT JOIN "
                "entries m ON m.key = f.key WHERE m.key IS NULL OR f.recorded_ns > m.recorded_ns")
            self.db.execute("INSERT OR IGNORE INTO settings SELECT * FROM finished.settings")
            self.db.commit()
        finally:
            self.db.execute("DETACH DATABASE finished")
        self.mark_view_stale()
        self.commit()

    def forget(self, key: str) -> None:
        """Drop this writer's entry for an input (one that no longer exists on disk)."""
        self._write("DELETE FROM entries WHERE key = ?", (key,))

    def reset(self) -> None:
        """Forget everything this writer recorded (`--overwrite`: redo the whole folder)."""
        self.db.execute("DELETE FROM entries")
        self.db.execute("DELETE FROM settings")
        self.mark_view_stale()
        self.db.commit()

    # The metrics.csv view is rewritten from the ledger at the end of a run; a run killed
    # before that leaves the flag set, and the next run rewrites the view first.
    def mark_view_stale(self) -> None:
        if not self._view_marked:
            self._set_meta("view_stale", "1")
            self._view_marked = True

    def view_stale(self) -> bool:
        return self._meta("view_stale") == "1"

    def view_written(self, info: dict) -> None:
        """The view now matches the ledger; `info` (row count, folder score means) is kept
        for the summaries of runs that change nothing and so do not rewrite the view."""
        self._set_meta("view_stale", "0")
        self._set_meta("view", json.dumps(info))
        self._view_marked = False
        self.commit()

    def last_view(self) -> dict | None:
        info = self._meta("view")
        return json.loads(info) if info else None

    def commit(self) -> None:
        self.db.commit()
        self._uncommitted, self._last_commit = 0, time.monotonic()

    def close(self) -> None:
        self.commit()
        for db in self.others:
            db.close()
        if self.path is not None:
            _self_contained(self.db)
        self.db.close()

    # --- helpers ---------------------------------------------------------------------------
    def relative(self, path: Path) -> str:
        return relative_to(path, self.folder if self.folder is not None else Path.cwd())

    def _all(self) -> list[sqlite3.Connection]:
        return [self.db, *self.others]

    def _owns(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() \
            is not None

    def _newest(self, sql: str, tagged: bool = False) -> Iterator[tuple]:
        """(key, recorded_ns, ...) rows of every ledger file merged in key order, the newest
        one per key: O(number of files) memory however many rows. `tagged`: each row ends with
        the name of the writer whose file holds it."""
        streams = [db.execute(sql) for db in self._all()]
        if tagged:
            streams = [_tag(rows, name) for rows, name in zip(streams, self.writers, strict=True)]
        current = None
        for r in heapq.merge(*streams, key=lambda r: r[0]):
            if current is not None and r[0] != current[0]:
                yield current
                current = None
            if current is None or r[1] > current[1]:
                current = r
        if current is not None:
            yield current

    def _write(self, sql: str, args: tuple) -> None:
        self.db.execute(sql, args)
        self._uncommitted += 1
        if (self._uncommitted >= self.COMMIT_EVERY
                or time.monotonic() - self._last_commit > self.COMMIT_SECONDS):
            self.commit()

    def _meta(self, name: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return r[0] if r else None

    def _set_meta(self, name: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))


def writer_of(path: Path) -> str:
    """The writer name of a ledger file (ledger-<writer>.sqlite)."""
    return Path(path).stem.removeprefix("ledger-")


def _self_contained(db: sqlite3.Connection) -> None:
    """Move everything from the WAL into the database file when a writer is done, so that the
    file alone is the whole ledger, also while another process (a shard's reader) keeps the
    WAL from being deleted: a reader on another host (merge over a network file system) then
    finds nothing in a WAL written elsewhere. A no-op when there is nothing to move, so a run
    refused at the start leaves the file byte for byte as it was."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:  # busy: SQLite checkpoints on the last close instead
        pass


def _has_schema(db: sqlite3.Connection) -> bool:
    try:  # the schema version is stored (and committed) after every table was created
        return db.execute("SELECT 1 FROM meta WHERE name = 'schema'").fetchone() is not None
    except sqlite3.DatabaseError:
        return False


def _tag(rows, name: str) -> Iterator[tuple]:
    for r in rows:
        yield (*r, name)


def relative_to(path: Path, folder: Path) -> str:
    """How an output path is stored: relative to OUT, so a moved folder stays valid.
    (String operations for the common case, a path inside OUT: this runs once per input and
    output kind on every resume check.)"""
    path, base = os.path.abspath(path), os.path.abspath(folder)
    if path.startswith(base + os.sep):
        rel = path[len(base) + 1:]
    else:
        rel = os.path.relpath(path, base)
    return rel.replace(os.sep, "/") if os.sep != "/" else rel


def _non_empty(path: Path) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _plain(value):
    """JSON for the numpy scalars a metrics row may hold."""
    return value.item() if hasattr(value, "item") else str(value)
