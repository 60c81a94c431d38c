"""What `segment` shows a person: a progress bar while it runs, a summary table at the end."""

from __future__ import annotations

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


class SegmentProgress:
    """Progress bar with images/s and ETA; prints one line per failed image."""

    def __init__(self, total: int, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.progress = Progress(
            TextColumn("[bold]segment"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=quiet)
        self.task = self.progress.add_task("segment", total=total, rate="-")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def opened(self, backend) -> None:
        """The run has really started (inputs checked, model loaded): show the bar."""
        info = backend.describe()
        if not self.quiet:
            reason = f" ({info['precision_reason']})" if info.get("precision_reason") else ""
            self.console.print(f"backend {info['backend']} ({info.get('runtime', '')}), "
                               f"{info.get('precision', '')} model {info['model']}{reason}",
                               highlight=False)
        self.progress.start()

    def row(self, row: dict) -> None:
        if row.get("status") == "error":
            self.console.print(f"[red]failed[/red] {row['path']}: {row.get('message')}",
                               highlight=False, soft_wrap=True)
        self.progress.advance(self.task)
        task = self.progress.tasks[0]
        if task.speed:
            self.progress.update(self.task, rate=f"{task.speed:.2f}")

    def skipped(self, n: int) -> None:
        self.progress.advance(self.task, n)


def print_summary(summary: dict, console: Console) -> None:
    counts = summary["counts"]
    table = Table(title="retina-batch segment", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("images done", str(counts["ok"]))
    table.add_row("failed", f"[red]{counts['error']}[/red]" if counts["error"] else "0")
    table.add_row("skipped (mask exists)", str(counts["skipped"]))
    table.add_row("no field of view found", str(counts["no_fov"]))
    rate = summary.get("images_per_second")
    table.add_row("throughput", f"{rate:.2f} images/s over {summary['wall_seconds']:.1f} s"
                  if rate else "-")
    for stage, seconds in summary.get("mean_stage_seconds", {}).items():
        table.add_row(f"  {stage[:-2]} per image", f"{seconds * 1000:.1f} ms")
    for key, value in summary.get("truth_means", {}).items():
        table.add_row(f"mean {key}", f"{value:.4f}")
    table.add_row("masks", summary["outputs"]["masks"])
    table.add_row("metrics", summary["outputs"]["metrics"])
    if summary["interrupted"]:
        table.add_row("[yellow]interrupted[/yellow]", "re-run the same command to continue")
    console.print(table)
