"""What a run must do: every input of the source is checked against the ledger once, before
any image is decoded, and is either skipped (done), refused (its output name is taken) or
queued in the ledger as this run's work. The pipeline then reads its work list back from the
ledger, so neither the skip decisions nor the inputs seen are ever held in memory.

An input is done when the ledger says it was finished (status ok) from this very file (same
size and modification time) and every output this run asks for (mask, and --prob / --overlay
when given) was written by it and is on disk. Anything else is redone: a new or changed input,
a failed one, a kill between writing a file and recording it, an output asked for now that an
earlier run did not write.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .io import discover
from .layout import Layout, OutputError
from .ledger import Ledger, RunSettings
from .records import refresh_view


class SettingsMismatch(OutputError):
    """The output folder holds results of another model or threshold (usage error)."""


@dataclass
class Plan:
    """Inputs found in the source, by what the run does with them."""

    found: int = 0
    done: int = 0  # skipped: already finished
    todo: int = 0  # queued for this run
    refused: int = 0  # error rows: another input writes the same output name
    started: float = 0.0  # time.perf_counter() when the run began: img/s is measured from it


def open_ledger(layout: Layout, run: RunSettings, *, write: bool, overwrite: bool,
                writer: str = "main") -> Ledger:
    """The output folder's ledger, ready for `run`: started anew with --overwrite, otherwise
    checked against the run's model and threshold (SettingsMismatch), and its metrics view
    brought up to date first if a killed run left it behind. `write=False`: in memory."""
    ledger = Ledger(layout.out if write else None, writer)
    try:
        if overwrite:
            ledger.reset()
        else:
            check_settings(ledger, layout, run.model_sha256, run.model, run.threshold)
            if write and writer == "main" and ledger.view_stale():
                refresh_view(ledger, layout.metrics_path)
    except BaseException:
        ledger.close()
        raise
    ledger.begin(run)
    return ledger


def check_settings(ledger: Ledger, layout: Layout, model_sha256: str | None, model: str,
                   threshold: float) -> None:
    """Refuse to mix results of two models or thresholds in one output folder."""
    for made in ledger.settings():
        if (made["model_sha256"], made["threshold"]) != (model_sha256, threshold):
            raise SettingsMismatch(
                f"{layout.out} holds masks made by {_model(made['model'], made['model_sha256'])}"
                f" at threshold {made['threshold']:g}; this run uses "
                f"{_model(model, model_sha256)} at threshold {threshold:g}: add --overwrite to "
                f"redo every image with this run's settings, or choose another --out")


def _model(name: str | None, sha: str | None) -> str:
    return f"model {Path(name).name if name else '?'} (sha256 {(sha or '?')[:12]})"


def plan_run(source, layout: Layout, ledger: Ledger, run_id: str, *, overwrite: bool,
             stop: threading.Event, on_refused, started: float = 0.0,
             select: Callable[[str], bool] | None = None) -> Plan:
    """Check every input of `source` against the ledger and queue the ones to process.

    `on_refused(path, key, output, stat, message)` is called for an input whose output name
    another input already writes (the caller records its error row). `select(key)`: only the
    inputs it accepts are this run's (a shard's); the others are not even counted as found."""
    plan = Plan(started=started)
    for path, rel in discover(source, exclude=layout.folders()):
        if stop.is_set():
            break
        key = rel.as_posix()
        if select is not None and not select(key):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone since it was listed: not an input any more
        entry = ledger.get(key)
        if entry is not None and entry.queued == run_id:
            continue  # listed twice (a list file): one input
        plan.found += 1
        wanted = layout.outputs(rel)
        if not overwrite and ledger.done(entry, st.st_size, st.st_mtime_ns, wanted):
            plan.done += 1
            continue
        output = ledger.relative(wanted["mask"])
        if _refused(ledger, key, output, path, st, on_refused):
            plan.refused += 1
            continue
        # Only a missing extra output (e.g. an overlay asked for now): the row stays current
        # until the new one is recorded. New, changed, failed or mask gone: pending.
        keep = not overwrite and ledger.done(entry, st.st_size, st.st_mtime_ns,
                                             {"mask": wanted["mask"]})
        ledger.queue(key, os.path.abspath(path), output, st.st_size, st.st_mtime_ns,
                     keep_result=keep)
        plan.todo += 1
    ledger.commit()
    return plan


def _refused(ledger: Ledger, key: str, output: str, path, st, on_refused) -> bool:
    """Two inputs with one output name (a.jpg and a.png): the one found first keeps it."""
    other = ledger.claim(output, key)
    if other is None:
        return False
    on_refused(path, key, output, st, f"another input ({other.key}) also writes {output}; "
                                      f"rename one of them")
    return True
