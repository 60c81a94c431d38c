"""`bench`: the segment pipeline, measured.

For each configuration (batch size x decode/writer threads) the REAL pipeline (pipeline.Pipeline,
the code `segment` runs) processes the same images `repeat` times, and the same process then
measures the backend alone on pre-decoded batches of those images. A naive loop (one image at a
time: pipeline.load, backend infer of a batch of 1, pipeline.finish; no overlap) runs the same
model on the same images in the same bench run, so every result is also a ratio.

Each configuration runs in a fresh process (`python -m retina_batch.bench JOB.json`), so its
peak RSS and CPU time are its own. Figures:

    end_to_end_ips      images/s of the whole pipeline, median of the repeats
    pure_inference_ips  images/s of backend.infer on pre-decoded batches, same batch size,
                        median of runs alternating with the pipeline runs
    efficiency          end_to_end / pure_inference (1.0: the host work is completely hidden)
    speedup_vs_naive    end_to_end / naive loop end_to_end
    stage_ms            mean per-image time of decode, preprocess, infer, postprocess, measure,
                        write;
                        bottleneck names the largest, host_bottleneck the largest but infer
    latency_ms          p50/p95 from the start of an image's decode to its row being recorded
    truth_dice          with `truth`: mean Dice against the annotations, from one more pipeline
                        run after the timed ones (scoring costs time; it is not in any figure)
    peak_rss_mb         peak RSS (VmHWM) of the configuration's process after the repeats
    cpu_utilisation     process CPU seconds / (wall seconds x cores), over the pipeline repeats
    host_ms_per_image   process CPU milliseconds per image (every thread), median of the
                        repeats: with `--backend none` (zero maps, no inference) it is what the
                        host costs per image, so cores x 1000 / host_ms_per_image is the image
                        rate those host cores can feed a GPU
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import BackendUnavailable
from .pipeline import Item, Options, Pipeline
from .records import STAGES
from .summary import software_versions

STAGE_NAMES = tuple(s[:-2] for s in STAGES)  # decode, preprocess, ..., measure, write


class BenchError(RuntimeError):
    """A configuration could not be measured (its process failed); the message says why."""


@dataclass(frozen=True)
class Config:
    batch_size: int = 2
    workers: int = 0  # decode and writer threads each; 0 = one per core
    reduced_decode: bool = True
    precision: str = "auto"  # fp32 / int8 file of an ONNX model (backends.precision)

    @property
    def label(self) -> str:
        text = (f"{self.precision}, batch {self.batch_size}, "
                f"workers {self.workers or os.cpu_count()}")
        return text if self.reduced_decode else text + ", full-size decode"


# --- measuring one configuration (runs inside the worker process) ------------------------

class _TimedPipeline(Pipeline):
    """The pipeline unchanged, plus the moment each image's decode starts (for latency)."""

    def load(self, item: Item) -> Item:
        item.row["bench_start"] = time.perf_counter()
        return super().load(item)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(1000 * float(p50), 2), "p95": round(1000 * float(p95), 2)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, not ru_maxrss: ru_maxrss survives
    fork + exec, so a worker started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def _cpu_seconds() -> float:
    """CPU time of the whole process, every thread (os.times ticks at 10 ms: too coarse)."""
    return time.process_time()


class _Rows:
    """Running per-stage sums of the ok rows: constant memory however many images run (a
    list of rows would grow with the run and show up in the peak RSS being measured)."""

    def __init__(self):
        self.ok = self.errors = 0
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.vessels = 0.0

    def add(self, row: dict) -> None:
        if row.get("status") != "ok":
            self.errors += 1
            return
        self.ok += 1
        for stage in STAGES:
            self.sums[stage] += row.get(stage, 0.0)
        self.vessels += row["vessel_fraction"]

    def stage_ms(self) -> dict:
        return {name: round(1000 * self.sums[stage] / self.ok, 3) if self.ok else None
                for name, stage in zip(STAGE_NAMES, STAGES, strict=True)}

    def vessel_fraction(self) -> float | None:
        return round(self.vessels / self.ok, 5) if self.ok else None


class _Progress:
    """Progress lines on stdout for the parent process, at most a few per second."""

    def __init__(self, total: int, emit):
        self.total, self.done, self.emit, self.last = total, 0, emit, 0.0

    def __call__(self, row=None) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.emit and (now - self.last > 0.25 or self.done == self.total):
            self.last = now
            self.emit(self.done, self.total)


def _run_pipeline(runner, job: dict, out: Path, progress) -> dict:
    rows = _Rows()
    latencies: list[float] = []

    def on_row(row: dict) -> None:
        if row.get("status") == "ok":
            latencies.append(time.perf_counter() - row["bench_start"])
        rows.add(row)
        progress()

    options = Options(out=out / "masks", metrics=out / "metrics.csv", workers=job["workers"],
                      inflight=job["inflight"], write=job["write"], overwrite=True,
                      reduced_decode=job["reduced_decode"], report=False,
                      pixel_work=job["pixel_work"], jpeg_decode=job["jpeg_decode"])
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    summary = _TimedPipeline(runner, options, on_row).run(job["source"])
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    ok = summary["counts"]["ok"]
    return {"images": ok, "errors": summary["counts"]["error"],
            "wall_s": round(summary["wall_seconds"], 4),
            "images_per_second": summary["images_per_second"],
            "stage_ms": rows.stage_ms(), "latencies": latencies,
            "vessel_fraction": rows.vessel_fraction(),
            "cpu_seconds": round(cpu, 3), "cpu_utilisation": round(cpu / wall / _cores(), 3),
            "cpu_ms_per_image": round(1000 * cpu / ok, 3) if ok else None,
            "settings": summary["settings"]}


def _run_naive(runner, job: dict, out: Path, progress) -> dict:
    """One image at a time with the pipeline's own stage functions: no threads, no overlap."""
    import cv2

    from .io import discover

    pipe = Pipeline(runner, Options(out=out / "masks", write=job["write"],
                                    reduced_decode=job["reduced_decode"], overwrite=True,
                                    pixel_work="host"))  # it hands canvases to `infer`
    rows, latencies = _Rows(), []
    level, threads = cv2.utils.logging.getLogLevel(), cv2.getNumThreads()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    cv2.setNumThreads(1)  # as inside the pipeline: the only difference is the overlap
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        for path, rel in discover(job["source"]):
            start = time.perf_counter()
            item = Item(Path(path), Path(rel))
            item.row.update(path=str(path))
            item = pipe.load(item)
            if item.row.get("status") != "error":
                t = time.perf_counter()
                prob = runner.infer(item.canvas[None])[0]
                item.row["infer_s"] = time.perf_counter() - t
                item = pipe.finish(item, prob)
            if item.row.get("status") == "ok":
                latencies.append(time.perf_counter() - start)
            rows.add(item.row)
            progress()
    finally:
        cv2.utils.logging.setLogLevel(level)
        cv2.setNumThreads(threads)
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"images": rows.ok, "errors": rows.errors, "wall_s": round(wall, 4),
            "images_per_second": round(rows.ok / wall, 3) if wall > 0 else None,
            "stage_ms": rows.stage_ms(), "latencies": latencies,
            "vessel_fraction": rows.vessel_fraction(),
            "cpu_seconds": round(cpu, 3), "cpu_utilisation": round(cpu / wall / _cores(), 3),
            "cpu_ms_per_image": round(1000 * cpu / rows.ok, 3) if rows.ok else None}


def _score_run(runner, job: dict, out: Path) -> dict:
    """One untimed pipeline run with the annotations: mean Dice and AUC of the masks."""
    rows = []
    options = Options(out=out / "scored", metrics=out / "scored.csv", workers=job["workers"],
                      truth_dir=Path(job["truth"]), overwrite=True,
                      reduced_decode=job["reduced_decode"])
    Pipeline(runner, options, rows.append).run(job["source"])
    scored = [r for r in rows if r.get("status") == "ok" and "dice" in r]
    if not scored:
        return {"truth_images": 0}
    return {"truth_images": len(scored),
            "truth_dice": round(statistics.fmean(r["dice"] for r in scored), 5),
            "truth_auc": round(statistics.fmean(r["auc"] for r in scored), 5)}


def _pure_batches(runner, job: dict) -> list[np.ndarray]:
    """Pre-decoded batches of the first images for backend-only timing, same batch size.

    The canvases are made by the pipeline's own `load`; a sample suffices because inference
    cost does not depend on the pixels (every canvas has the working size)."""
    from .io import discover

    pipe = Pipeline(runner, Options(out=Path(tempfile.gettempdir()), write=False,
                                    reduced_decode=job["reduced_decode"], pixel_work="host"))
    canvases = []
    for path, rel in discover(job["source"]):
        item = pipe.load(Item(Path(path), Path(rel)))
        if item.canvas is not None:
            canvases.append(item.canvas)
        if len(canvases) >= job["pure_images"]:
            break
    size = runner.batch_size
    keep = max(size, len(canvases) // size * size)  # whole batches (one at least)
    canvases = (canvases * (-(-keep // max(len(canvases), 1))))[:keep]
    return [np.stack(canvases[i:i + size]) for i in range(0, keep, size)]


def _pure_run(runner, batches: list[np.ndarray]) -> float:
    images = sum(len(b) for b in batches)
    start = time.perf_counter()
    for batch in batches:
        runner.infer(batch)
    return images / (time.perf_counter() - start)


def _warm_pipeline() -> None:
    """The pipeline's one-time costs (skimage's import on the first vessel measurement,
    ~0.2 s) belong to a run's start, not to its images: pay them before the first timed run,
    or a short input's first run (and the median of two) would carry them."""
    from .measure import measure_mask

    measure_mask(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))


def measure(job: dict, emit=None) -> dict:
    """Measure one configuration (job: see `_job`) in this process; returns plain data.

    Pipeline runs and backend-only runs alternate, so a machine whose load changes during the
    measurement (other users, a training run) slows both alike and their ratio stays fair."""
    from .backends import open_backend

    naive = job["mode"] == "naive"
    progress = _Progress(job["images"] * job["repeat"], emit)
    out = Path(tempfile.mkdtemp(prefix="retina-bench-"))
    pure: list[float] = []
    try:
        with open_backend(job["backend"], job["model"], batch_size=1 if naive
                          else job["batch_size"], device=job["device"],
                          precision=job["precision"]) as runner:
            warm = np.zeros((runner.batch_size, runner.size, runner.size, 3), np.uint8)
            runner.infer(warm)  # first-call allocations are not part of any figure
            _warm_pipeline()
            batches = [] if naive else _pure_batches(runner, job)
            rss_open = _peak_rss_mb()
            runs = []
            for i in range(max(job["repeat"], 0 if naive else job["pure_repeat"])):
                if i < job["repeat"]:
                    runs.append((_run_naive if naive else _run_pipeline)(runner, job, out,
                                                                        progress))
                if batches and i < job["pure_repeat"]:
                    pure.append(_pure_run(runner, batches))
            peak = _peak_rss_mb()
            backend = runner.describe()
            scores = _score_run(runner, job, out) if job.get("truth") and not naive else {}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"runs": runs, "peak_rss_mb": peak, "rss_after_model_load_mb": rss_open,
            "backend": backend, "scores": scores, "pure": None if naive else {
                "images": sum(len(b) for b in batches),
                "images_per_second": round(statistics.median(pure), 3),
                "runs": [round(x, 3) for x in pure]}}


# --- the parent: inputs, one process per configuration, the record -----------------------

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu_model": cpu, "cores": _cores(),
            "logical_cpus": os.cpu_count(), "memory_gib": memory,
            "platform": platform.platform(), "software": software_versions()}


def contention() -> dict:
    """What else is using this machine: load average and training runs (their figures are
    contended; see benchmarks/README.md)."""
    training = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if "retina-batch train" in cmd and "bash -c" not in cmd:
            training.append(int(proc.name))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"load_average": [round(x, 2) for x in load] if load else None,
            "training_processes": sorted(training)}


def _job(mode: str, source: Path, images: int, config: Config, *, backend, model, device,
         repeat, inflight, write, pure_images, pure_repeat, truth=None,
         pixel_work="auto", jpeg_decode="auto") -> dict:
    return {"mode": mode, "source": str(source), "images": images, "backend": backend,
            "model": str(model) if model else None, "device": device,
            "precision": config.precision, "truth": str(truth) if truth else None,
            "batch_size": config.batch_size, "workers": config.workers, "inflight": inflight,
            "reduced_decode": config.reduced_decode, "repeat": repeat, "write": write,
            "pure_images": pure_images, "pure_repeat": pure_repeat, "pixel_work": pixel_work,
            "jpeg_decode": jpeg_decode}


def _in_subprocess(job: dict, on_progress=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="retina-bench-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.Popen([sys.executable, "-m", "retina_batch.bench", str(job_file),
                                 str(result_file)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("progress ") and on_progress:
                done, total = line.split()[1:3]
                on_progress(int(done), int(total))
        stderr = proc.stderr.read()
        if proc.wait() != 0 or not result_file.exists():
            tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            # A usage error raised in the worker (BackendUnavailable: ...) reads as the same
            # one line `segment` prints, without the traceback's qualified class name.
            usage = tail[0].startswith(f"{BackendUnavailable.__module__}.BackendUnavailable: ")
            raise BenchError(tail[0].split(": ", 1)[1] if usage
                             else f"{job['mode']} run failed: {tail[0]}")
        return json.loads(result_file.read_text())


def _summarise(raw: dict, config: Config | None, naive_ips: float | None) -> dict:
    runs = raw["runs"]
    ips = statistics.median(r["images_per_second"] or 0.0 for r in runs)
    stage = {name: round(statistics.fmean(r["stage_ms"][name] or 0.0 for r in runs), 3)
             for name in STAGE_NAMES}
    latencies = [x for r in runs for x in r["latencies"]]
    result = {
        "end_to_end_ips": round(ips, 3),
        "end_to_end_runs": [r["images_per_second"] for r in runs],
        "images": runs[0]["images"], "errors": runs[0]["errors"],
        "stage_ms": stage,
        "bottleneck": max(stage, key=stage.get),
        # the costliest stage besides inference: what limits a pipeline whose backend is fast
        "host_bottleneck": max((k for k in stage if k != "infer"), key=stage.get),
        "latency_ms": _percentiles(latencies),
        "peak_rss_mb": raw["peak_rss_mb"],
        "rss_after_model_load_mb": raw["rss_after_model_load_mb"],
        "cpu_utilisation": round(statistics.fmean(r["cpu_utilisation"] for r in runs), 3),
        "host_ms_per_image": _median_or_none([r["cpu_ms_per_image"] for r in runs]),
        "vessel_fraction": runs[0]["vessel_fraction"],
        "precision": raw["backend"].get("precision"), "model": raw["backend"].get("model"),
        **raw.get("scores", {}),
    }
    if config is not None:
        pure = raw["pure"]["images_per_second"]
        result = {"config": {"precision": config.precision, "batch_size": config.batch_size,
                             "workers": runs[0]["settings"]["workers"],
                             "inflight": runs[0]["settings"]["inflight"],
                             "reduced_decode": config.reduced_decode,
                             "pixel_work": runs[0]["settings"]["pixel_work"],
                             "jpeg_on_device": runs[0]["settings"]["jpeg_on_device"]}, **result,
                  "pure_inference_ips": pure, "pure_inference_images": raw["pure"]["images"],
                  "efficiency": round(ips / pure, 3) if pure else None,
                  "speedup_vs_naive": round(ips / naive_ips, 3) if naive_ips else None}
    return result


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


# `bench --validation` for a model trained on every photograph (--val-fraction 0, as the
# shipped one): this many of its training photographs, spread over its data folders.
TRAINED_ON_SAMPLE = 20


def validation_list(model, folder: Path, note=None) -> tuple[Path, Path]:
    """`bench --validation`: a folder (in `folder`) of the model card's validation photographs
    and one of their annotations, as links named <dataset>--<stem> so that truth pairs by name
    even when two datasets of the card both have a `1.png`. A card that held nothing out
    gives TRAINED_ON_SAMPLE of its training photographs instead, and says so through `note`:
    right for speed and int8-vs-fp32 comparisons, not an accuracy figure."""
    from .backends.base import default_model
    from .card import card_pairs, load_card
    from .export import spread

    card = load_card(Path(model) if model else default_model())
    pairs = [p for p in card_pairs(card, "val") if p[1] is not None]
    if not pairs and not card.get("training", {}).get("images_val"):
        pairs = spread([p for p in card_pairs(card, "train") if p[1] is not None],
                       TRAINED_ON_SAMPLE)[:TRAINED_ON_SAMPLE]
        if pairs and note:
            note(f"--validation: the model held no photographs out; {len(pairs)} of its "
                 f"training photographs instead (their Dice is not an accuracy figure)")
    if not pairs:
        raise BenchError("--validation: the model card's validation photographs are not on "
                         f"this disk (training data: {card.get('training', {}).get('data')})")
    images, masks = Path(folder) / "validation" / "images", Path(folder) / "validation" / "masks"
    for target in (images, masks):
        target.mkdir(parents=True)
    for image, mask, key in pairs:
        name = key.replace("/", "--")
        (images / (name + image.suffix)).symlink_to(image.resolve())
        (masks / (name + mask.suffix)).symlink_to(mask.resolve())
    return images, masks


def _merge_rounds(raws: list[dict]) -> dict:
    """One configuration's measurements from several rounds as if from one process: every
    pipeline and backend-only run pooled (medians are taken over all of them)."""
    if len(raws) == 1:
        return raws[0]
    pure = [x for raw in raws for x in raw["pure"]["runs"]]
    return {**raws[0], "runs": [r for raw in raws for r in raw["runs"]],
            "peak_rss_mb": max(raw["peak_rss_mb"] for raw in raws),
            "rss_after_model_load_mb": max(raw["rss_after_model_load_mb"] for raw in raws),
            "pure": {**raws[0]["pure"], "runs": pure,
                     "images_per_second": round(statistics.median(pure), 3)}}


def _input_info(source: Path) -> dict:
    import cv2

    from .io import discover

    paths = [p for p, _ in discover(source)]
    if not paths:
        raise BenchError(f"no images found in {source}")
    sizes = [p.stat().st_size for p in paths]
    header = cv2.imread(str(paths[0]), cv2.IMREAD_UNCHANGED)
    shape = header.shape if header is not None else (0, 0)
    return {"source": str(source), "images": len(paths), "width": int(shape[1]),
            "height": int(shape[0]), "format": paths[0].suffix.lower().lstrip("."),
            "mean_bytes_per_image": round(statistics.fmean(sizes))}


def bench(source=None, *, synthetic: int | None = None, size: tuple[int, int] = (512, 512),
          fmt: str = "jpg", seed: int = 0, backend: str = "onnxruntime", model=None,
          device: str = "auto", batch_sizes=(4,), workers=(0,), precisions=("auto",),
          truth=None, repeat: int = 3, rounds: int = 1,
          inflight: int = 2, write: bool = True, reduced_decode=(True,), naive: bool = True,
          naive_reduced_decode: bool | None = None, pure_images: int = 32,
          pure_repeat: int | None = None, isolate: bool = True, on_progress=None,
          on_result=None, pixel_work: str = "auto", jpeg_decode: str = "auto") -> dict:
    """Measure the pipeline on `source` (folder, image or list) or on `synthetic` generated
    images of `size`, for every reduced_decode x batch size x workers x precision (innermost,
    so fp32 and int8 runs alternate and share the machine's load); returns the record.
    `truth` (annotations paired by stem) adds each configuration's mean Dice and AUC.
    rounds > 1 runs the whole matrix that many times (each configuration in a fresh process
    per round) and pools the runs: on a machine whose load changes from minute to minute,
    configurations then share it alike.

    write=True writes masks to a temporary folder (deleted after), False runs every stage but
    the file writes. isolate=False measures in this process (faster to start; peak RSS is
    then the whole process's). on_progress(label, done, total) and on_result(label, result)
    report as it goes. pixel_work, jpeg_decode: the pipeline's (segment's --pixel-work and
    --jpeg-decode); the naive loop and the backend-only figure always use canvases made on
    the host.
    """
    from .io import discover

    if (source is None) == (synthetic is None):
        raise ValueError("give an input folder or --synthetic N, not both or neither")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = contention()
    tmp = None
    try:
        if synthetic is not None:
            from .synth import write_synthetic

            tmp = Path(tempfile.mkdtemp(prefix="retina-bench-synth-"))
            source = tmp / "images"
            write_synthetic(source, synthetic, size, fmt, seed=seed,
                            unique=min(synthetic, 200 if max(size) <= 1024 else 16),
                            on_image=on_progress and (lambda d, t: on_progress("synthesise", d, t)))
        source = Path(source)
        iter(discover(source))  # InputError now, before any process starts
        info = _input_info(source)
        run = _in_subprocess if isolate else _in_process
        common = dict(backend=backend, model=model, device=device, repeat=repeat,
                      inflight=inflight, write=write, pure_images=pure_images,
                      pure_repeat=pure_repeat or repeat, truth=truth, pixel_work=pixel_work,
                      jpeg_decode=jpeg_decode)
        record = {"started": started, "machine": machine_info(), "input": {
            **info, "synthetic": synthetic is not None, "seed": seed if synthetic else None},
            "settings": {"repeat": repeat, "rounds": rounds, "write": write, "isolated": isolate,
                         "pure_images": pure_images, "pure_repeat": pure_repeat or repeat,
                         "inflight": inflight, "pixel_work": pixel_work,
                         "jpeg_decode": jpeg_decode},
            "contention_before": load_before}
        naive_ips = None
        if naive:
            reduced = reduced_decode[0] if naive_reduced_decode is None else naive_reduced_decode
            label = f"naive loop ({precisions[0]}, batch 1, no overlap)"
            raw = run(_job("naive", source, info["images"],
                           Config(1, 1, reduced, precisions[0]), **common),
                      on_progress and (lambda d, t: on_progress(label, d, t)))
            record["naive"] = {"reduced_decode": reduced, **_summarise(raw, None, None)}
            record["backend"] = raw["backend"]
            naive_ips = record["naive"]["end_to_end_ips"]
            if on_result:
                on_result(label, record["naive"])
        configs = [Config(bs, w, reduced, precision) for reduced in reduced_decode
                   for bs, w, precision in itertools.product(batch_sizes, workers, precisions)]
        raws: dict[Config, list[dict]] = {c: [] for c in configs}
        for round_ in range(rounds):  # the whole matrix per round: configurations alternate
            for config in configs:
                label = config.label + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else "")
                job = _job("pipeline", source, info["images"], config, **common)
                job["truth"] = job["truth"] if round_ == 0 else None  # scored once is enough
                raws[config].append(run(job, on_progress and (lambda d, t, lb=label:
                                                              on_progress(lb, d, t))))
        record["results"] = []
        for config in configs:
            raw = _merge_rounds(raws[config])
            record["backend"] = raw["backend"]
            result = _summarise(raw, config, naive_ips)
            record["results"].append(result)
            if on_result:
                on_result(config.label, result)
        record["contention_after"] = contention()
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return record
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _in_process(job: dict, on_progress=None) -> dict:
    return json.loads(json.dumps(measure(job, on_progress)))  # the same plain data as a worker


def _worker(argv: list[str]) -> int:
    job_file, result_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text())

    def emit(done: int, total: int) -> None:
        print(f"progress {done} {total}", flush=True)

    result = measure(job, emit)
    result_file.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
