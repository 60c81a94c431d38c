"""`retina-batch export`: the click command over export.export (parse, call, print)."""

from __future__ import annotations

import json
import sys

import click

from .cli_common import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, err, fail


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="[outputs] Folder for model.onnx, model.fp16.onnx and their .json cards.")
@click.option("--size", metavar="MIN,OPT,MAX",
              help="[model] Square canvas sides the graphs are checked at and the engine "
                   "accepts (MIN..MAX), OPT being the working canvas; N or NxN for exactly one "
                   "(default: the card's working size W, as W,W,2W; e.g. 512,512,1024). "
                   "Multiples of 2**depth (16).")
@click.option("--batch", default="1,4,16", show_default=True, metavar="MIN,OPT,MAX",
              help="[engine] Batch sizes the engine accepts (MIN..MAX) and is tuned for (OPT).")
@click.option("--engine-dir", default="engines", show_default=True,
              type=click.Path(file_okay=False), help="[engine] Where the engine lands.")
@click.option("--workspace", "workspace_mib", type=click.IntRange(16), metavar="MiB",
              help="[engine] Limit TensorRT's build workspace (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="[engine] Timing cache file, reused and updated "
                   "(default: ENGINE_DIR/timing.<gpu>.<sm>.<trt>.cache).")
@click.option("--no-engine", is_flag=True, help="[engine] Only write the ONNX files.")
@click.option("--require-engine", is_flag=True,
              help="[engine] Exit 1 when no engine could be built (no TensorRT or GPU).")
@click.option("--parity-images", "parity_folder", type=click.Path(file_okay=False, exists=True),
              help="[checks] Photographs for the parity checks (default: the validation "
                   "images named in the card if present, else synthetic ones).")
@click.option("--parity-count", default=4, show_default=True, type=click.IntRange(1, 64),
              help="[checks] How many images the parity checks use.")
@click.option("--int8/--no-int8", default=None,
              help="[int8] Write model.int8.onnx (calibrated int8 for CPUs; exit 1 if its masks "
                   "agree with fp32 below Dice 0.99). Default: when calibration photographs "
                   "are at hand.")
@click.option("--calibration", type=click.Path(file_okay=False, exists=True),
              help="[int8] Photographs to calibrate int8 on (default: the card's training "
                   "photographs, when on this disk).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export(checkpoint, out, no_engine, as_json, **options):
    """Export a trained CHECKPOINT (.pt + its model.json card) for deployment.

    \b
    Writes OUT/model.onnx (fp32), OUT/model.fp16.onnx (mixed precision, for GPUs) and, when
    calibration photographs are at hand, OUT/model.int8.onnx (QDQ int8, for CPUs and TensorRT),
    each checked against its reference (PyTorch; fp32) with the figures in its card; then,
    where TensorRT and an NVIDIA GPU are present,
    ENGINE_DIR/<run>.<gpu>.sm<XY>.trt<version>.engine (+ .int8.engine) with .json sidecars.
    Without them the ONNX files are still written and the exit status is 0; an engine
    TensorRT could not build (its messages are shown) exits 1.
    Run it after every retraining, and on each GPU type that will run the engine.
    """
    from importlib.util import find_spec

    from rich.markup import escape

    # export.py imports torch and onnx only when exporting; check first for a one-line answer.
    missing = [name for name in ("torch", "onnx") if find_spec(name) is None]
    if missing:
        fail(f"export needs PyTorch and onnx ({', '.join(missing)} missing): "
             "pip install 'retina-batch[train]'")
    from .engine_build import EngineBuildError
    from .export import EngineUnavailable, ExportError, GraphRuleError, ParityError
    from .export import export as run_export
    try:
        summary = run_export(checkpoint, out, engine=not no_engine,
                             log=lambda text: err.print(escape(text)), **options)
    except (EngineUnavailable, ParityError, GraphRuleError, EngineBuildError) as e:
        fail(str(e), EXIT_SOME_FAILED)  # the ONNX files are written: not a misuse
    except ExportError as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if not k.endswith("_card")},
                              indent=2, default=str))
    else:
        _print_summary(summary, err)
    if summary.get("int8_skipped"):
        err.print(f"[yellow]{escape(summary['int8_skipped'])}[/yellow]", soft_wrap=True)
    if summary["engine"]:
        err.print(f"[green]engine[/green] {summary['engine']} (+ .json sidecar)")
    else:  # also with --json (on stderr): the one line that says why and what to install
        err.print(f"[yellow]{escape(summary['engine_skipped'])}[/yellow]", soft_wrap=True)
    if summary.get("int8_engine"):
        err.print(f"[green]INT8 engine[/green] {summary['int8_engine']} (+ .json sidecar)")
    elif summary["engine"] and summary.get("int8_engine_skipped"):
        err.print(f"[yellow]{escape(summary['int8_engine_skipped'])}[/yellow]", soft_wrap=True)
    sys.exit(EXIT_OK)


def _print_summary(summary: dict, err) -> None:
    from pathlib import Path

    from rich.table import Table

    folder = Path(summary["onnx"]).parent
    table = Table(title=f"exported to {folder}/ at {summary['size']}x{summary['size']}",
                  title_justify="left")
    for column in ("file", "checked against", "max |diff|", "mask Dice (worst)", "agreement"):
        table.add_column(column, justify="left" if column in ("file", "checked against")
                         else "right")
    for key, parity in (("onnx", summary["parity_fp32"]), ("onnx_fp16", summary["parity_fp16"]),
                        ("onnx_int8", summary.get("parity_int8"))):
        if parity is None:
            continue
        table.add_row(Path(summary[key]).name, parity["reference"], f"{parity['max_abs_diff']:.2e}",
                      f"{parity['mask_dice_min']:.4f}", f"{parity['mask_agreement']:.4%}")
    err.print(table)
    err.print(f"parity images: {summary['parity_fp32']['images']}")
    for side, fp32 in summary["parity_fp32"].get("canvases", {}).items():
        fp16 = summary["parity_fp16"]["canvases"][side]
        err.print(f"at {side}x{side}: fp32 max |diff| {fp32['max_abs_diff']:.2e}, fp16 mask "
                  f"Dice {fp16['mask_dice_min']:.4f} (one image)")
