"""The `synth` and `bench` commands: thin shells over synth.write_synthetic and bench.bench."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_common import EXIT_INTERRUPTED, bench_model_options, err, fail, pixel_work_option


def _size(text: str) -> tuple[int, int]:
    from .synth import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        fail(f"--size: {e}")


def _int_list(option: str, text: str, low: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < low:
        fail(f"{option} {text!r}: expected comma-separated whole numbers >= {low}, e.g. 1,2,4,8")
    return values


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=quiet, transient=True)


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("-n", "count", default=100, show_default=True, type=click.IntRange(1),
              help="How many photographs.")
@click.option("--size", default="512x512", show_default=True, help="WIDTHxHEIGHT in pixels.")
@click.option("--format", "fmt", default="jpg", show_default=True,
              type=click.Choice(["jpg", "png"]), help="File format.")
@click.option("--quality", default=92, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same images.")
@click.option("--unique", type=click.IntRange(1),
              help="Draw only this many distinct images and repeat them (fast for 10,000s).")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False),
              help="Also write the drawn vessels as masks here (a ground truth for --truth).")
def synth(out, count, size, fmt, quality, seed, unique, masks_dir):
    """Write synthetic fundus photographs to OUT for scale tests without data.

    Circular field of view on a dark rim, optic disc, macula, branching vessel trees,
    illumination gradient, texture and noise; decode costs and mask densities close to real
    photographs of the same size (benchmarks/README.md compares them).
    """
    from .synth import write_synthetic

    width_height = _size(size)
    progress = _progress(err, False)
    task = progress.add_task("synth", total=count)
    try:
        with progress:
            paths = write_synthetic(out, count, width_height, fmt, seed=seed, quality=quality,
                                    unique=unique, masks=masks_dir,
                                    on_image=lambda done, total: progress.update(
                                        task, completed=done))
    except OSError as e:
        fail(f"cannot write to {out}: {e.strerror or e}")
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    total = sum(p.stat().st_size for p in paths)
    err.print(f"{count} images {width_height[0]}x{width_height[1]} {fmt} in {out} "
              f"({total / count / 1000:.0f} kB each)")


@click.command()
@click.argument("source", required=False, type=click.Path())
@click.option("--synthetic", type=click.IntRange(1),
              help="[input] Benchmark on N synthetic photographs instead of SOURCE.")
@click.option("--size", default="512x512", show_default=True,
              help="[input] Size of the synthetic photographs, WIDTHxHEIGHT.")
@click.option("--format", "fmt", default="jpg", show_default=True,
              type=click.Choice(["jpg", "png"]), help="[input] Synthetic file format.")
@click.option("--validation", is_flag=True,
              help="[input] Benchmark on the model card's validation photographs, scored "
                   "against their annotations (adds a Dice column).")
@click.option("--truth", type=click.Path(file_okay=False, exists=True),
              help="[input] Annotations paired by stem: adds each configuration's mean Dice "
                   "(from one more, untimed run).")
@bench_model_options
@click.option("--precision", "precisions", default="auto", show_default=True,
              help="[matrix] ONNX Runtime model precisions to measure, e.g. fp32,int8 "
                   "(alternating, so both see the same machine load).")
@click.option("--batch-size", "batch_sizes", default="2", show_default=True,
              help="[matrix] Batch sizes to measure, comma-separated (e.g. 1,2,4,8).")
@click.option("--workers", default="0", show_default=True,
              help="[matrix] Decode/writer threads to measure, comma-separated (0: one per core).")
@click.option("--decode", "decode", default="reduced", show_default=True,
              type=click.Choice(["reduced", "full", "both"]),
              help="[matrix] JPEG decoding at reduced size when large (as segment), full size, "
                   "or both for the comparison.")
@pixel_work_option
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 100),
              help="[run] Runs per configuration; the median is reported.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 100),
              help="[run] Run the whole matrix this many times, configurations alternating "
                   "(fairer on a machine whose load changes); runs are pooled.")
@click.option("--output", default="tmp", show_default=True, type=click.Choice(["tmp", "discard"]),
              help="[run] Write masks to a temporary folder (deleted after), or skip the writes.")
@click.option("--no-naive", is_flag=True, help="[run] Skip the naive one-image-at-a-time loop.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="[run] Write the full record (machine, settings, every figure) here.")
@click.option("--quiet", "-q", is_flag=True, help="[run] No progress or table.")
def bench(source, synthetic, size, fmt, validation, truth, backend, model, device, precisions,
          batch_sizes, workers, decode, pixel_work, jpeg_decode, repeat, rounds, output,
          no_naive, json_path, quiet):
    """Measure the segment pipeline: images/s, stage costs, latency, memory, CPU.

    Runs the real pipeline on SOURCE (folder, image or list) or on --synthetic N generated
    photographs, once per configuration (batch size x workers) in a fresh process, and reports
    end-to-end images/s, backend-only images/s on the same batches, their ratio (pipeline
    efficiency), the naive loop's images/s (same model, same run) and the speed-up over it.

    \b
    retina-batch bench --synthetic 32 --batch-size 1,2,4,8
    retina-batch bench ./images --workers 1,2 --json bench.json
    retina-batch bench --validation --precision fp32,int8
    """
    from .backends import BackendUnavailable
    from .bench import BenchError, validation_list
    from .bench import bench as run_bench
    from .io import InputError

    if [source is not None, synthetic is not None, validation].count(True) != 1:
        fail("give one input: a folder (SOURCE), --synthetic N or --validation")
    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    if not chosen or set(chosen) - {"auto", "fp32", "int8"}:
        fail(f"--precision {precisions!r}: expected a comma-separated list of auto, fp32, int8")
    reduced = {"reduced": (True,), "full": (False,), "both": (True, False)}[decode]
    progress = _progress(err, quiet)
    tasks: dict[str, int] = {}

    def on_progress(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done)

    def on_result(label: str, result: dict) -> None:
        if not quiet:
            progress.console.print(f"{label}: {result['end_to_end_ips']:.2f} images/s",
                                   highlight=False)

    with tempfile.TemporaryDirectory(prefix="retina-bench-") as tmp:
        try:
            if validation:
                source, truth = validation_list(model, Path(tmp), note=err.print)
            with progress:
                record = run_bench(source, synthetic=synthetic, size=_size(size), fmt=fmt,
                                   backend=backend, model=model, device=device,
                                   precisions=chosen, truth=truth,
                                   batch_sizes=_int_list("--batch-size", batch_sizes, 1),
                                   workers=_int_list("--workers", workers, 0), repeat=repeat,
                                   rounds=rounds,
                                   write=output == "tmp", reduced_decode=reduced,
                                   naive=not no_naive, on_progress=on_progress,
                                   on_result=on_result, pixel_work=pixel_work,
                                   jpeg_decode=jpeg_decode)
        except (InputError, BackendUnavailable, BenchError, ValueError) as e:
            fail(str(e))
        except OSError as e:
            fail(f"cannot write: {e}")
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    if not quiet:  # a wide table: do not squeeze it into 80 columns when piped to a file
        print_bench(record, Console() if Console().is_terminal else Console(width=150))


def print_bench(record: dict, console: Console) -> None:
    """The record as a table: one row per configuration, the naive loop first."""
    info, machine = record["input"], record["machine"]
    load = record["contention_before"]["load_average"]
    title = (f"{info['images']} x {info['width']}x{info['height']} {info['format']} "
             f"({'synthetic' if info['synthetic'] else info['source']}) on {machine['cpu_model']}"
             f", {machine['cores']} cores, load {load[0] if load else '?'}")
    table = Table(title=title, title_justify="left")
    scored = any("truth_dice" in r for r in record["results"])
    columns = ("configuration", "img/s", "pure img/s", "effic.", "x naive", "decode", "prep",
               "infer", "post", "measure", "write", "host ms", "p50 ms", "p95 ms", "peak RSS",
               "CPU")
    for name in columns + (("Dice",) if scored else ()):
        # The configuration names the row: never wrapped, the figures shrink instead.
        table.add_column(name, justify="left" if name == "configuration" else "right",
                         no_wrap=name == "configuration")
    rows = [(f"naive loop ({record['naive'].get('precision')}, batch 1)", record["naive"])] \
        if "naive" in record else []
    rows += [(_label(r["config"], r.get("precision")), r) for r in record["results"]]
    for label, r in rows:
        stage = r["stage_ms"]
        dice = (_num(r.get("truth_dice"), 4),) if scored else ()
        table.add_row(label, f"{r['end_to_end_ips']:.2f}", _num(r.get("pure_inference_ips")),
                      _num(r.get("efficiency")), _num(r.get("speedup_vs_naive")),
                      *(_ms(stage[k], k == r["bottleneck"]) for k in
                        ("decode", "preprocess", "infer", "postprocess", "measure",
                         "write")),
                      _num(r.get("host_ms_per_image")), _num(r["latency_ms"]["p50"], 0),
                      _num(r["latency_ms"]["p95"], 0),
                      f"{r['peak_rss_mb']:.0f} MB", f"{100 * r['cpu_utilisation']:.0f}%", *dice)
    console.print(table)
    backend = record.get("backend", {})
    models = sorted({r.get("model") or backend.get("model") for r in record["results"]})
    console.print(f"stage columns: mean ms per image (bold: largest); host ms: process CPU ms "
                  f"per image; backend "
                  f"{backend.get('runtime', backend.get('backend'))}, model "
                  f"{', '.join(map(str, models))}", highlight=False)
    if scored:
        console.print("Dice: mean against the annotations, from one more (untimed) run of each "
                      "configuration", highlight=False)
    if record["contention_before"]["training_processes"]:
        console.print("[yellow]note:[/yellow] a training run was using this machine: "
                      "figures are contended", highlight=False)


def _label(config: dict, precision: str | None) -> str:
    """'int8 b2 w2'; `precision` is what ran (an auto configuration says which it picked)."""
    asked = config.get("precision", "auto")
    ran = precision if asked == precision or not precision else f"{asked}: {precision}"
    text = f"{ran}, batch {config['batch_size']} workers {config['workers']}"
    return text if config["reduced_decode"] else text + " full decode"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float, bold: bool) -> str:
    return f"[bold]{value:.1f}[/bold]" if bold else f"{value:.1f}"
