"""What `segment` shows a person: a progress bar while it runs (stderr), a summary table at the
end (stdout, so `segment ... > log` keeps it)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .summary import images_per_second


class SegmentProgress:
    """Progress bar with images/s and ETA on stderr; prints one line per failed image.

    Images/s is summary.images_per_second's definition, live: images processed so far (skipped
    inputs excluded) over the wall time since the run began."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = Progress(
            TextColumn("[bold]segment"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=quiet)
        self.task = self.progress.add_task("segment", total=None, rate="-")
        self.processed, self.started = 0, time.perf_counter()
        self.model_line = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress.live.is_started:
            self.progress.stop()

    def opened(self, backend) -> None:
        """The model is loaded (said once the folder has accepted it, in `started_run`)."""
        info = backend.describe()
        reason = f" ({info['precision_reason']})" if info.get("precision_reason") else ""
        self.model_line = f"backend {info['backend']} ({info.get('runtime', '')}), " \
                          f"{info.get('precision', '')} model {info['model']}{reason}"

    def started_run(self, plan) -> None:
        """The inputs have been checked against the output folder: show the work left."""
        self.started = plan.started
        if not self.quiet:
            self.console.print(self.model_line, highlight=False)
            if plan.done:
                self.console.print(f"{plan.done} of {plan.found} images already done in this "
                                   f"folder; {plan.todo} to do", highlight=False)
        self.progress.update(self.task, total=plan.todo + plan.refused)
        self.progress.start()

    def row(self, row: dict) -> None:
        if row.get("status") == "error":
            self.console.print(f"[red]failed[/red] {row['path']}: {row.get('message')}",
                               highlight=False, soft_wrap=True)
        self.processed += 1
        self.progress.advance(self.task)
        rate = images_per_second(self.processed, time.perf_counter() - self.started)
        self.progress.update(self.task, rate=f"{rate:.2f}" if rate else "-")


def print_summary(summary: dict, console: Console) -> None:
    counts, folder = summary["counts"], summary["folder"]
    table = Table(title="retina-batch segment", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("images done", str(counts["ok"]))
    table.add_row("failed", f"[red]{counts['error']}[/red]" if counts["error"] else "0")
    table.add_row("skipped (already done)", str(counts["skipped"]))
    table.add_row("no field of view found", str(counts["no_fov"]))
    rate = summary.get("images_per_second")
    table.add_row("throughput", f"{rate:.2f} images/s ({counts['processed']} images in "
                  f"{summary['wall_seconds']:.1f} s)" if rate else "-")
    for stage, seconds in summary.get("mean_stage_seconds", {}).items():
        table.add_row(f"  {stage[:-2]} per image", f"{seconds * 1000:.1f} ms")
    for key, value in summary.get("truth_means", {}).items():
        table.add_row(f"mean {key}", f"{value:.4f}")
    table.add_row("folder", f"{folder['done']} done, {folder['failed']} failed, "
                  f"{folder['pending']} pending")
    table.add_row("masks", summary["outputs"]["masks"])
    table.add_row("metrics", summary["outputs"]["metrics"] or
                  "none from a shard: `retina-batch merge OUT` once all shards are done")
    if summary["outputs"].get("report"):
        table.add_row("report", summary["outputs"]["report"])
    if summary["interrupted"]:
        table.add_row("[yellow]interrupted[/yellow]", "re-run the same command to continue")
    console.print(table)
