"""`retina-batch merge OUT`: one metrics.csv and one summary.json for a folder written by
several ledger writers (`--shard I/N` processes, Ray workers, plain runs), read from every
writer's ledger file, the newest entry of each input winning.

Merge writes no ledger and changes no ledger file; it only reads them, so it can be run at any
time and again (it is the same view a plain `segment` run writes at its end). It is not run
automatically by the shards: a shard cannot know that the others have finished (they may run
on other machines, and SQLite promises a reader on another host only a finished writer's
file), and N shards finishing together would all rewrite the same metrics.csv. A scheduler
runs it once, after the last shard (`sbatch --dependency=afterok:JOB`, or after `wait` in a
shell loop); the README shows both.

What it checks, because no single process could: every shard I of N has finished a run
(its summary exists and says it was not interrupted) and left nothing pending, and every
current result was made with one model and threshold (two shards started at the same moment
with different settings both pass the check at the start of a run).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .card import write_json_atomic
from .layout import Layout, OutputError, check_writable
from .ledger import LEDGER_DIR, Ledger, ledger_files, writer_of
from .records import write_metrics_csv
from .resume import SettingsMismatch
from .shard import WRITER, summary_path
from .summary import FAILURES_LISTED, software_versions


class NothingToMerge(OutputError):
    """The folder holds no ledger (usage error)."""


def merge(out, metrics=None) -> dict:
    """Write OUT/metrics.csv (or `metrics`) and OUT/summary.json from every ledger file of OUT;
    returns the summary. Raises NothingToMerge, SettingsMismatch (usage errors)."""
    layout = Layout(Path(out), metrics=Path(metrics) if metrics else None)
    if not ledger_files(layout.out):
        raise NothingToMerge(f"{layout.out} holds no retina-batch ledger "
                             f"({LEDGER_DIR}/ledger-*.sqlite): nothing to merge; run "
                             f"`retina-batch segment SRC --out {layout.out}` first")
    check_writable(layout.metrics_path.parent)
    reader = Ledger.reader(layout.out)
    try:
        state = FolderState.read(reader)
        state.check_settings(layout.out)
        settings = state.settings_made(reader.settings())
        failures: list[dict] = []
        view = write_metrics_csv(_noting_failures(reader.rows(), failures), layout.metrics_path)
    finally:
        reader.close()
    summary = {
        "folder": state.totals(),
        "merged": True,
        "writers": state.writers(layout.out),
        "incomplete": state.incomplete(layout.out),
        "settings": settings,
        "failures": failures,
        "outputs": {"masks": str(layout.out), "metrics": str(layout.metrics_path),
                    "ledger": str(layout.ledger_dir)},
        "versions": software_versions(),
        "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if view["truth_images"]:
        summary["truth_means"], summary["truth_images"] = view["truth_means"], view["truth_images"]
    write_json_atomic(layout.summary_path, summary)
    return summary


def _noting_failures(rows, failures: list[dict]):
    """The rows, unchanged; the first failed ones are noted on the way (one pass)."""
    for row in rows:
        if row.get("status") == "error" and len(failures) < FAILURES_LISTED:
            failures.append({"path": row.get("path"), "message": row.get("message", "")})
        yield row


class FolderState:
    """One pass over every input's newest entry: states by writer, who made the results."""

    def __init__(self):
        self.by_writer: dict[str, Counter] = {}
        self.made: Counter = Counter()  # (model sha256, threshold) -> current ok results

    @classmethod
    def read(cls, reader: Ledger) -> FolderState:
        state = cls()
        for _key, _ns, status, sha, threshold, writer in reader.current():
            state.by_writer.setdefault(writer, Counter())[status] += 1
            if status == "ok":
                state.made[(sha, threshold)] += 1
        return state

    def totals(self) -> dict:
        total = sum(self.by_writer.values(), Counter())
        return {"done": total["ok"], "failed": total["error"], "pending": total["pending"]}

    def check_settings(self, out: Path) -> None:
        if len(self.made) <= 1:
            return
        found = "; ".join(f"{n} masks by model sha256 {(sha or '?')[:12]} at threshold {t:g}"
                          for (sha, t), n in self.made.most_common())
        raise SettingsMismatch(
            f"{out} holds masks of {len(self.made)} models or thresholds ({found}): re-run the "
            f"shards that used the other settings with the same --model/--threshold as the rest "
            f"and --overwrite, then merge again")

    def settings_made(self, stamped: list[dict]) -> list[dict]:
        names = {s["model_sha256"]: s["model"] for s in stamped}
        return [{"model_sha256": sha, "model": names.get(sha), "threshold": t, "masks": n}
                for (sha, t), n in self.made.most_common()]

    def writers(self, out: Path) -> dict:
        """Per writer: its current entries by state and its last run's figures (if it wrote a
        summary of its own: shards do, Ray workers and plain runs do not)."""
        found = {}
        for path in ledger_files(out):
            writer = writer_of(path)
            counts = self.by_writer.get(writer, Counter())
            found[writer] = {"done": counts["ok"], "failed": counts["error"],
                             "pending": counts["pending"], "last_run": _last_run(out, writer)}
        return found

    def incomplete(self, out: Path) -> list[dict]:
        """What is not finished: shards of an N that never finished a run or were interrupted,
        and any writer with pending inputs (killed). Each with the command that finishes it."""
        problems = []
        for count in sorted(_shard_counts(out)):
            for index in range(count):
                writer = f"shard-{index}-of-{count}"
                run = _last_run(out, writer)
                reason = ("has not finished a run" if run is None else
                          "was interrupted" if run["interrupted"] else None)
                pending = self.by_writer.get(writer, Counter())["pending"]
                if reason or pending:
                    problems.append({"writer": writer, "pending": pending,
                                     "problem": reason or f"{pending} inputs pending",
                                     "fix": f"re-run its command with --shard {index}/{count}"})
        for writer, counts in self.by_writer.items():
            if counts["pending"] and not WRITER.match(writer):
                problems.append({"writer": writer, "pending": counts["pending"],
                                 "problem": f"{counts['pending']} inputs pending",
                                 "fix": "re-run the segment command that wrote into this folder"})
        return problems


def _shard_counts(out: Path) -> set[int]:
    """The N of every shard writer that has a ledger file (one that recorded nothing yet is
    still a shard that must finish)."""
    return {int(m[2]) for p in ledger_files(out)
            if (m := WRITER.match(writer_of(p)))}


def _last_run(out: Path, writer: str) -> dict | None:
    try:
        run = json.loads(summary_path(out, writer).read_text())
    except (OSError, ValueError):
        return None
    return {key: run.get(key) for key in ("run_id", "inputs", "counts", "interrupted",
                                          "wall_seconds", "images_per_second", "ended")}
