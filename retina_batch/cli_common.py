"""What every command module shares: the error line, exit statuses, and common options.

Kept out of cli.py so that the command modules (cli_export, cli_bench) can import it at the
top: cli.py imports them, so importing cli.py from them would be circular.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False)

# Exit statuses scripts can rely on (documented in README).
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(message: str, status: int = EXIT_USAGE):
    """One red line on stderr and exit: how every user mistake ends (never a traceback)."""
    # Escaped: messages quote paths and install hints such as 'retina-batch[train]'.
    # soft_wrap: one line whatever the width (the terminal wraps it; logs and grep see one).
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    sys.exit(status)

BACKENDS = ["auto", "onnxruntime", "tensorrt", "torch"]


def model_options(command, backends=tuple(BACKENDS), backend_help="[model] Runtime."):
    """--backend, --model, --device: which runtime runs which weights where."""
    for option in reversed([
        click.option("--backend", default="onnxruntime", show_default=True,
                     type=click.Choice(list(backends)), help=backend_help),
        click.option("--model", type=click.Path(dir_okay=False),
                     help="[model] .onnx, .engine or .pt with its .json card "
                          "(default: shipped model)."),
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda"]), help="[model] Where to run."),
    ]):
        command = option(command)
    return command


def bench_model_options(command):
    """model_options plus `--backend none` (no inference: measures the host's own cost)."""
    return model_options(command, (*BACKENDS, "none"),
                         "[model] Runtime; none = no inference (zero maps), to measure the "
                         "host's cost per image (host_ms_per_image).")


def pixel_work_option(command):
    """--pixel-work: where the per-pixel work between decode and mask runs (pixel_work.py);
    --jpeg-decode: whether JPEGs are decoded there too."""
    command = click.option(
        "--jpeg-decode", default="auto", show_default=True, type=click.Choice(["auto", "host"]),
        help="[speed] With the pixel work on the device: auto decodes JPEGs there too where "
             "the backend can (nvJPEG on a CUDA GPU, with torchvision), host decodes every "
             "file on the host.")(command)
    return click.option(
        "--pixel-work", default="auto", show_default=True,
        type=click.Choice(["auto", "host", "device"]),
        help="[speed] Where letterbox, resize back, threshold and FOV masking run: host "
             "(OpenCV, any backend), device (the torch backend's device: each decoded "
             "photograph goes there once, its mask comes back), auto (device when that is a "
             "CUDA GPU, else host).")(command)
