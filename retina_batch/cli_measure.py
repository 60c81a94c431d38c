"""The `measure` command: a thin shell over measure_files.measure_folder."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_common import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, err, fail


@click.command()
@click.argument("masks", type=click.Path())
@click.option("--fov", "fov_dir", type=click.Path(file_okay=False),
              help="Field-of-view masks, paired by stem (e.g. N_mask.gif for N.png).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="The photographs, paired by stem: detect the field of view on them "
                   "(as segment does) when there are no FOV masks.")
@click.option("--out", "csv_path", type=click.Path(dir_okay=False),
              help="Write one row per mask (path, fov, measurements) to this CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print every row and the summary as JSON.")
def measure(masks, fov_dir, images_dir, csv_path, as_json):
    """Vessel measurements of every binary mask in MASKS (any tool's, or manual annotations).

    The same columns as segment's metrics.csv, on the same field-of-view-normalised grid (the
    FOV's bounding box scaled to 512 px), so predicted and manual masks compare directly:
    vessel_density, skeleton_density, branch_points, end_points, fractal_dimension,
    calibre_median_px, calibre_mean_px, tortuosity.

    \b
    Field of view: --fov masks, else detected on --images photographs, else the whole image.
    Exit status: 0 all measured, 1 some masks could not be measured, 2 usage error.
    """
    from .io import InputError, count_images
    from .measure_files import measure_folder, write_csv

    if fov_dir and images_dir:
        fail("give --fov (FOV masks) or --images (detect the FOV), not both")
    progress = Progress(TextColumn("[bold]measure"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True, disable=as_json)
    try:
        task = progress.add_task("measure", total=count_images(masks))
        with progress:
            result = measure_folder(masks, fov_dir=fov_dir, images_dir=images_dir,
                                    on_row=lambda row: progress.advance(task))
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    if csv_path:
        try:
            write_csv(result["rows"], csv_path)
        except OSError as e:
            fail(f"cannot write {csv_path}: {e.strerror or e}")
    for problem in result["errors"]:
        err.print(f"[red]error:[/red] {problem['path']}: {problem['error']}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_summary(result, csv_path)
    sys.exit(EXIT_SOME_FAILED if result["errors"] else EXIT_OK)


def _print_summary(result: dict, csv_path) -> None:
    table = Table(title=f"{result['images']} masks measured", title_justify="left")
    for name in ("measurement", "mean", "median", "min", "max"):
        table.add_column(name, justify="left" if name == "measurement" else "right")
    for column, s in result["summary"].items():
        table.add_row(column, *(f"{s[k]:.4g}" for k in ("mean", "median", "min", "max")))
    Console().print(table)
    if csv_path:
        err.print(f"per-mask rows: {csv_path}")
