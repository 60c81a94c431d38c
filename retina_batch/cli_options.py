"""Click options shared by several commands, so `segment` and `bench` cannot drift apart."""

from __future__ import annotations

import click

BACKENDS = ["auto", "onnxruntime", "tensorrt", "torch"]


def model_options(command):
    """--backend, --model, --device: which runtime runs which weights where."""
    for option in reversed([
        click.option("--backend", default="onnxruntime", show_default=True,
                     type=click.Choice(BACKENDS), help="[model] Runtime."),
        click.option("--model", type=click.Path(dir_okay=False),
                     help="[model] .onnx, .engine or .pt with its .json card "
                          "(default: shipped model)."),
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda"]), help="[model] Where to run."),
    ]):
        command = option(command)
    return command
