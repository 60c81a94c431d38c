"""The `retina-batch` command line: parse options, call the library, print results.

Every command is a thin shell over a plain Python function, so anything the CLI does can be
done from a notebook or a test. User mistakes end in one red line and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import click
from rich.console import Console

from . import __version__
from .cli_common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    err,
    fail,
    model_options,
    pixel_work_option,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="retina-batch")
def main():
    """Retinal vessel segmentation for whole folders of fundus photographs.

    \b
    retina-batch segment ./images --out ./masks     segment with the shipped model
    retina-batch train DATA_DIR --out runs/x        train an Attention U-Net
    retina-batch export runs/x/model.pt --out DIR   ONNX (fp32, fp16) + TensorRT engine
    retina-batch bench                              measure throughput and stage costs
    retina-batch measure MASKS --images DIR         vessel measurements of any masks
    retina-batch merge ./masks                      one metrics.csv after --shard runs
    """


def _scale_range(ctx, param, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("use MIN,MAX, e.g. 0.75,1.33") from None
    if not 0 < low <= high:
        raise click.BadParameter(f"{value}: need 0 < MIN <= MAX, e.g. 0.75,1.33")
    return low, high


@main.command()
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: model.pt, model.json, metrics.csv, curves.png, last.pt.")
@click.option("--width", default=16, show_default=True, help="[model] Channels of level 1.")
@click.option("--depth", default=4, show_default=True, help="[model] Downsampling levels.")
@click.option("--size", default=512, show_default=True,
              help="[model] Working canvas side; the field of view is scaled to fill it.")
@click.option("--crop", default=256, show_default=True, help="[data] Training crop side.")
@click.option("--group", default="auto", show_default=True,
              help="[data] Which files share a source photograph: auto, stem, div:K, "
                   "regex:PATTERN. auto = div:4 for files named 0..N-1 (4 copies per photograph).")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="[data] Fraction of photographs held out for validation (of each folder).")
@click.option("--balance", default="datasets", show_default=True,
              type=click.Choice(["datasets", "images"]),
              help="[data] Draw training crops from each data folder equally, or from each "
                   "photograph equally.")
@click.option("--scale", callback=_scale_range, metavar="MIN,MAX",
              help="[data] Range of the random scale augmentation (log-uniform; default "
                   "0.75,1.33; 0.7,2.0 was measured and cost DRIVE accuracy).")
@click.option("--illumination", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="[data] Probability of a smooth random illumination (gain) field on a crop; "
                   "0 = off, as in the shipped recipe.")
@click.option("--epochs", default=56, show_default=True, help="[schedule] Epochs.")
@click.option("--steps", "steps_per_epoch", default=48, show_default=True,
              help="[schedule] Optimiser steps per epoch.")
@click.option("--batch-size", default=8, show_default=True, help="[schedule] Crops per step.")
@click.option("--lr", default=3e-3, show_default=True, help="[schedule] Peak learning rate.")
@click.option("--loss", default="bce+dice", show_default=True,
              type=click.Choice(["bce+dice", "bce"]),
              help="[schedule] Training loss: BCE + soft Dice, or BCE alone.")
@click.option("--norm", default="image", show_default=True, type=click.Choice(["image", "local"]),
              help="[model] Input standardisation: over the whole canvas, or within a ~72 px "
                   "neighbourhood (removes vignetting and uneven illumination; not yet shipped).")
@click.option("--seed", default=0, show_default=True, help="[run] Random seed.")
@click.option("--device", default="auto", show_default=True, help="[run] auto, cpu, cuda.")
@click.option("--threads", default=0, help="[run] PyTorch CPU threads (0: all cores).")
@click.option("--resume", is_flag=True, help="[run] Continue from OUT/last.pt.")
def train(data_dirs, out_dir, resume, **options):
    """Train an Attention U-Net on fundus photographs with vessel masks.

    Each DATA_DIR (one per camera or dataset; several train one model) holds image/ + mask/,
    images/ + masks/ (DRIVE style) or images/ + vessels/ (LES-AV style), directly or under
    train/. Images pair with masks by file stem, ignoring markers such as _training and
    _manual1. Validation is held out and reported per folder. Ctrl-C saves the last finished
    epoch; --resume continues from it.
    """
    try:
        from .training.augment import AugmentConfig
        from .training.dataset import DatasetError
        from .training.loop import train as run_training
    except ImportError as e:
        fail(f"training needs PyTorch ({e.name} is missing): pip install 'retina-batch[train]'")
    scale, illumination = options.pop("scale"), options.pop("illumination")
    augment = {"scale": scale} if scale else {}
    if illumination:
        augment["illumination"] = illumination
    if augment:
        options["augment"] = AugmentConfig(**augment)
    try:
        card = run_training(list(data_dirs), out_dir, resume=resume, log=err.print, **options)
    except DatasetError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow]: finished epochs are saved in {out_dir}/last.pt;"
                  f" continue with --resume")
        sys.exit(EXIT_INTERRUPTED)
    val = card["validation"]
    if "dice" not in val:  # --val-fraction 0
        err.print(f"no validation held out: the last epoch's weights "
                  f"({card['training']['epoch']}) at threshold {card['threshold']}; "
                  f"weights {out_dir}/model.pt")
        return
    err.print(f"best epoch {card['training']['epoch']}: val Dice {val['dice']:.4f}, "
              f"AUC {val['auc']:.4f} at threshold {card['threshold']}; "
              f"weights {out_dir}/model.pt")


def _canvas_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("use auto or a side in pixels, e.g. 768") from None


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="[outputs] Mask folder: OUT/<relative path>.png, 0/255, original size; "
                   "also its ledger (OUT/.retina-batch), metrics.csv and summary.json.")
@click.option("--prob", "prob_dir", type=click.Path(file_okay=False),
              help="[outputs] Also write probability maps (16-bit PNG, p x 65535) here.")
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False),
              help="[outputs] Also write JPEG overlays (vessels in green) here.")
@click.option("--metrics", type=click.Path(dir_okay=False),
              help="[outputs] Per-image CSV (default OUT/metrics.csv): one row per input, "
                   "rewritten from the ledger at the end of every run.")
@click.option("--truth", "truth_dir", type=click.Path(file_okay=False),
              help="[outputs] Ground-truth masks, paired by stem: adds Dice, IoU, AUC, ...")
@click.option("--fov", "fov_dir", type=click.Path(file_okay=False),
              help="[model] Field-of-view masks paired by stem (default: detected).")
@model_options
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "int8"]),
              help="[model] ONNX Runtime: the int8 model beside the fp32 one, or fp32. auto: "
                   "int8 on CPUs with VNNI/AMX when its masks match fp32's (Dice >= 0.99).")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="[model] Vessel probability threshold (default: the model card's).")
@click.option("--size", default="auto", show_default=True, callback=_canvas_size,
              help="[model] Working canvas side in pixels, or auto: the model's own size, "
                   "1.5x that for photographs of 2400 px and more (fine vessels).")
@click.option("--tta", is_flag=True,
              help="[model] Average the predictions of the image and its three flips "
                   "(4x the inference cost).")
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(1, 256),
              help="[speed] Images per backend call.")
@click.option("--workers", default=0, type=click.IntRange(0, 256),
              help="[speed] Decode and writer threads (0: one per core).")
@pixel_work_option
@click.option("--overwrite", is_flag=True,
              help="[run] Redo every image, also into a folder made with another model or "
                   "threshold.")
@click.option("--json", "as_json", is_flag=True, help="[run] Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="[run] No progress bar or table.")
@click.option("--shard", metavar="I/N",
              help="[scale] Take only shard I of N (0 <= I < N; a stable split by path): N such "
                   "processes share OUT, then `retina-batch merge OUT`.")
@click.option("--ray", "use_ray", is_flag=True,
              help="[scale] Run on Ray (the cluster at RAY_ADDRESS, else a local instance); "
                   "needs pip install 'retina-batch[ray]'.")
def segment(source, as_json, quiet, shard, use_ray, **options):
    """Segment every fundus photograph in SOURCE into vessel masks.

    SOURCE is a folder (walked recursively; the output tree mirrors it), one image, or a
    .txt/.csv list of paths. Formats: PNG, JPEG, TIFF (8/16-bit), BMP, PPM/PGM, GIF.
    Re-running the same command continues where it stopped: an image is skipped only when the
    folder's ledger says it was finished from the same file and its outputs are on disk
    (--overwrite redoes everything). Inputs are never written.

    \b
    stdout: the summary table (or --json); stderr: progress, the model used, failed images.
    Exit status: 0 all images done, 1 some images failed (see metrics.csv),
                 2 usage error, 130 interrupted (what was in flight is written).
    """
    from .backends import BackendUnavailable
    from .cli_scale import segment_runner
    from .io import InputError
    from .layout import OutputError
    from .report import SegmentProgress, print_summary

    run_segment = segment_runner(shard, use_ray, options)
    progress = SegmentProgress(console=err, quiet=quiet or as_json)
    stop = threading.Event()
    previous = _stop_on_signals(stop)
    try:
        with progress:
            summary = run_segment(source, on_row=progress.row, on_open=progress.opened,
                                  on_start=progress.started_run, stop=stop, **options)
    except (InputError, BackendUnavailable, FileNotFoundError, OutputError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write output: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C, or one while the model was loading
        fail("interrupted before the run could finish its summary", EXIT_INTERRUPTED)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        print_summary(summary, Console())
    if summary["interrupted"]:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_SOME_FAILED if summary["counts"]["error"] else EXIT_OK)


@main.command()
@click.argument("pred_dir", type=click.Path(file_okay=False))
@click.argument("truth_dir", type=click.Path(file_okay=False))
@click.option("--prob", "prob_dir", type=click.Path(file_okay=False),
              help="Probability maps (8- or 16-bit PNG) for ROC AUC, paired by stem.")
@click.option("--fov", "fov_dir", type=click.Path(file_okay=False),
              help="Field-of-view masks, paired by stem: adds fov_* scores.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="The photographs, to detect the field of view when there are no FOV masks.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Write per-image scores to this CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def evaluate(pred_dir, truth_dir, csv_path, as_json, **options):
    """Score masks in PRED_DIR against ground-truth masks in TRUTH_DIR.

    Files pair by stem, ignoring markers such as _training, _manual1, _1stHO, .ah, _mask.
    Reports Dice, IoU, sensitivity, specificity, accuracy (and ROC AUC with --prob), per image
    and mean, over the whole image and, with --fov or --images, inside the field of view.
    """
    from rich.table import Table

    from .evaluate import evaluate as run_evaluate
    from .evaluate import write_csv
    from .io import InputError

    try:
        result = run_evaluate(pred_dir, truth_dir, **options)
    except InputError as e:
        fail(str(e))
    if csv_path:
        write_csv(result, csv_path)
    for problem in result["errors"]:
        err.print(f"[red]error:[/red] {problem['path']}: {problem['error']}")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        table = Table(title=f"{result['images']} images scored (FOV: {result['fov']})",
                      title_justify="left")
        table.add_column("score")
        table.add_column("mean", justify="right")
        for key, value in result["mean"].items():
            table.add_row(key, f"{value:.4f}")
        Console().print(table)
        if result["unmatched"]:
            err.print(f"{len(result['unmatched'])} masks had no ground truth, e.g. "
                      f"{result['unmatched'][0]}")
    sys.exit(EXIT_SOME_FAILED if result["errors"] else EXIT_OK)


def _stop_on_signals(stop: threading.Event) -> dict:
    """Ctrl-C and SIGTERM (kill, job schedulers) set `stop`: the pipeline takes no new images,
    writes what is in flight and the summary, and the command exits 130. A second Ctrl-C
    interrupts at once. Returns the previous handlers, to restore."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    return previous


from .cli_export import export  # noqa: E402

main.add_command(export)

from .cli_bench import bench, synth  # noqa: E402

main.add_command(synth)
main.add_command(bench)

from .cli_measure import measure  # noqa: E402

main.add_command(measure)

from .cli_scale import merge  # noqa: E402

main.add_command(merge)

if __name__ == "__main__":
    main()
