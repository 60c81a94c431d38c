"""Beyond one process: `segment --shard I/N` and `segment --ray` (which runner segment uses),
and the `merge` command that makes one metrics.csv and summary.json of a sharded folder."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from .cli_common import EXIT_OK, EXIT_SOME_FAILED, err, fail


def segment_runner(shard: str | None, use_ray: bool, options: dict):
    """The function `segment` calls: the local pipeline (whole folder or one shard) or the Ray
    runner. Usage errors end here, in one line, before anything is loaded."""
    from .pipeline import segment
    from .shard import Shard

    if shard is not None and use_ray:
        fail("--shard and --ray do not go together: Ray spreads the work over its cluster by "
             "itself; use one or the other")
    if shard is not None:
        try:
            parsed = Shard.parse(shard)
        except ValueError as e:
            fail(str(e))
        if options.get("metrics"):
            fail("--metrics with --shard: a shard writes no metrics.csv; give --metrics to "
                 "`retina-batch merge` once every shard has finished")
        return functools.partial(segment, shard=parsed)
    if use_ray:
        try:
            from .ray_runner import segment_ray
        except ImportError as e:
            fail(f"--ray needs Ray Data ({e.name or 'ray'} is missing): "
                 "pip install 'retina-batch[ray]'")
        return segment_ray
    return segment


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--metrics", type=click.Path(dir_okay=False),
              help="Per-image CSV to write (default OUT/metrics.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def merge(out, metrics, as_json):
    """One metrics.csv and summary.json for OUT from every writer's ledger.

    Run it once every `segment --shard I/N` process writing into OUT has finished (it reads,
    and never changes, their ledger files; running it again is harmless). It says which shards
    have not finished, or were interrupted, and the command that completes them.

    \b
    Exit status: 0 every input done, 1 some images failed or some shards are not finished,
                 2 usage error.
    """
    from .layout import OutputError
    from .merge import merge as run_merge

    try:
        summary = run_merge(out, metrics)
    except OutputError as e:
        fail(str(e))
    for problem in summary["incomplete"]:
        err.print(f"[yellow]not finished:[/yellow] {problem['writer']} {problem['problem']}: "
                  f"{problem['fix']}", highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_merge(summary, Console())
    bad = summary["folder"]["failed"] or summary["folder"]["pending"] or summary["incomplete"]
    sys.exit(EXIT_SOME_FAILED if bad else EXIT_OK)


def _print_merge(summary: dict, console: Console) -> None:
    folder = summary["folder"]
    table = Table(title="retina-batch merge", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("folder", f"{folder['done']} done, {folder['failed']} failed, "
                  f"{folder['pending']} pending")
    for writer, info in summary["writers"].items():
        table.add_row(f"  {writer}", f"{info['done']} done, {info['failed']} failed, "
                      f"{info['pending']} pending")
    for key, value in summary.get("truth_means", {}).items():
        table.add_row(f"mean {key}", f"{value:.4f}")
    table.add_row("metrics", summary["outputs"]["metrics"])
    console.print(table)
