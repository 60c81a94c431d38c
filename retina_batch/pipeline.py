"""The streaming segmentation pipeline: plan -> decode pool -> batcher -> backend -> writers.

Every stage hands work to the next through a bounded window (a deque of futures that the main
thread drains oldest-first once it is full), so peak memory depends on the window sizes, not on
the number of images. Decoding, inference and writing overlap: while the backend computes batch
k, the decode threads prepare batch k+1 and the writer threads finish batch k-1.

A failure in one image becomes one error row; only an interrupt stops the run. This module
holds the flow only; each of the rest has its own place: where outputs go and the checks made
before a run (layout), the output folder's ledger (ledger), which inputs a run processes
(resume), the metrics row and metrics.csv (records), summary.json (summary).
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from .allocator import keep_freed_memory
from .backends.tta import FlipTTA
from .card import write_json_atomic
from .io import (
    EncodedJpeg,
    decode,
    discover,
    encode,
    encode_mask,
    index_by_key,
    pair_key,
    read_mask,
    write_atomic,
)
from .layout import Layout, check_not_inputs, check_writable
from .ledger import RunSettings, relative_to
from .measure import measure_mask
from .metrics import evaluate_image
from .pixel_work import choose as choose_pixel_work
from .preprocess import FieldOfView, canvas_sizes, choose_canvas, detect_fov, to_rgb8
from .qc import flags
from .records import SCORE_FIELDS, refresh_view
from .report_html import read_rows, write_report
from .resume import Plan, open_ledger, plan_run
from .shard import Shard
from .summary import RunTally, build_summary, model_identity


@dataclass
class Options:
    """What `segment` should write and how hard to work (see the CLI for each option)."""

    out: Path
    prob_dir: Path | None = None
    overlay_dir: Path | None = None
    metrics: Path | None = None  # default OUT/metrics.csv
    truth_dir: Path | None = None
    fov_dir: Path | None = None
    threshold: float | None = None  # default: the model card's
    overwrite: bool = False
    workers: int = 0  # decode and writer threads each; 0 = number of cores
    inflight: int = 2  # batches submitted to the backend and not yet collected
    write: bool = True  # False: run every stage except writing files (benchmarks)
    reduced_decode: bool = True  # False: always decode at full size (benchmark comparisons)
    size: int | str | None = None  # canvas side or "auto" (preprocess.choose_canvas); None: the
    # model's working size
    report: bool = True  # OUT/report.html at the end (bench turns it off: not pipeline work)
    # Set (e.g. from a signal handler) to stop taking new images: what is in flight is finished,
    # written and recorded, then the run returns its summary with interrupted = True.
    stop: threading.Event | None = None
    shard: Shard | None = None  # only this shard's inputs, its own ledger file (see shard.py)
    pixel_work: str = "auto"  # where letterbox .. threshold run: auto, host, device (pixel_work)
    jpeg_decode: str = "auto"  # auto: JPEGs decoded on the device where it can; host: never


@dataclass
class Item:
    """One image on its way through the pipeline; becomes one metrics row."""

    path: Path
    rel: Path
    row: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # decoded RGB; kept only when an overlay is wanted
    canvas: np.ndarray | None = None  # what the backend is given: the letterboxed canvas, or
    # the decoded photograph when the pixel work runs on the device (pixel_work.py)
    letterbox: object = None
    fov: FieldOfView | None = None
    truth: Path | None = None
    fov_file: Path | None = None
    outputs: dict = field(default_factory=dict)  # kind -> path relative to OUT, once written

    def fail(self, stage: str, error: BaseException) -> Item:
        self.row.update(status="error", message=f"{stage}: {error}")
        self.image = self.canvas = None
        return self


def _timed(row: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    row[stage] = round(now - start, 5)
    return now


class Pipeline:
    def __init__(self, backend, options: Options, on_row=None, on_start=None):
        self.backend, self.opt = backend, options
        self.threshold = options.threshold if options.threshold is not None \
            else backend.threshold
        self.layout = Layout(options.out, options.prob_dir, options.overlay_dir, options.metrics)
        self.workers = options.workers or os.cpu_count() or 2
        self.precision = backend.describe().get("precision")  # fp32 / int8, for every row
        self.on_row = on_row or (lambda row: None)
        self.on_start = on_start or (lambda plan: None)
        self.truth = index_by_key(options.truth_dir)
        self.fov_files = index_by_key(options.fov_dir, fov=True)
        self.stop = options.stop or threading.Event()
        self.tally = RunTally()
        self.policy = options.size or backend.size
        self.sizes = canvas_sizes(backend.size, self.policy)
        self.pixels = choose_pixel_work(backend, options.pixel_work, self.threshold,
                                        lambda item: bool(options.prob_dir or item.truth))
        self.jpeg_on_device = self.pixels.takes_jpeg and options.jpeg_decode == "auto"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_id = f"{stamp}-{secrets.token_hex(3)}"  # unique even for runs a second apart
        keep_freed_memory()  # image-sized arrays reuse freed memory, no page faults (allocator)

    # --- stages run in the thread pools ------------------------------------------------
    def load(self, item: Item) -> Item:
        """Decode, detect the FOV, letterbox onto the canvas (or only read a JPEG that the
        device decodes: pixel_work). Never raises."""
        start = time.perf_counter()
        try:
            # Decoded for the largest canvas the policy may pick: the choice needs the size.
            raw, (width, height), factor = decode(
                item.path, max(self.sizes) if self.opt.reduced_decode else None,
                keep_jpeg=self.jpeg_on_device and item.fov_file is None
                and not self.opt.overlay_dir)  # an overlay is drawn on the host's pixels
            rgb = raw if isinstance(raw, EncodedJpeg) else to_rgb8(raw)
        except Exception as e:
            return item.fail("decode", e)
        item.row.update(width=width, height=height, decode_scale=factor)
        start = _timed(item.row, "decode_s", start)
        try:
            canvas = choose_canvas((width, height), self.backend.size, self.policy)
            item.row["canvas"] = canvas
            if isinstance(rgb, EncodedJpeg):
                self.pixels.place_jpeg(item, rgb)
            else:
                fov = self._fov(item, rgb)
                self.pixels.place(item, rgb, fov, canvas, (width, height))
                item.row.update(self.pixels.quality(item, rgb, fov))
                item.fov = fov
            if self.opt.overlay_dir:
                item.image = rgb
        except Exception as e:
            return item.fail("preprocess", e)
        _timed(item.row, "preprocess_s", start)
        return item

    def _fov(self, item: Item, rgb: np.ndarray) -> FieldOfView:
        if item.fov_file is None:
            return detect_fov(rgb)
        mask = read_mask(item.fov_file).astype(np.uint8)
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        x, y, w, h = cv2.boundingRect(mask)
        if w == 0:
            raise ValueError(f"FOV mask {item.fov_file.name} is empty")
        return FieldOfView(mask, (x, y, x + w, y + h), True)

    def finish(self, item: Item, result) -> Item:
        """Back to the original size, threshold, FOV (unless the backend's device did: see
        pixel_work), measure, write, score. `result`: the backend's for this image. Never
        raises."""
        row, start, stage = item.row, time.perf_counter(), "postprocess"
        try:
            done = self.pixels.masked(item, result)
            prob, mask, fov, fov_area = done.prob, done.mask, done.fov, done.fov_area
            row.update(fov_found=item.fov.found, fov_area=fov_area, threshold=self.threshold,
                       vessel_fraction=round(done.vessel_pixels / max(fov_area, 1), 5),
                       **(done.quality or {}))
            start = _timed(row, "postprocess_s", start)
            stage = "measure"
            row.update(measure_mask(mask, fov))
            row["qc"] = flags(row, item.fov.found)
            start = _timed(row, "measure_s", start)
            if item.truth is not None:
                stage = "truth"
                self._score(item, prob, fov)
            if self.opt.write:
                stage = "write"
                self._write(item, prob, mask)
            _timed(row, "write_s", start)
            row.update(status="ok", message="" if item.fov.found else
                       "no field of view found (not a fundus photograph?): whole image used")
        except Exception as e:
            item.fail(stage, e)
        item.image = item.canvas = None
        return item

    def _score(self, item: Item, prob: np.ndarray, fov: np.ndarray) -> None:
        truth = read_mask(item.truth)
        if truth.shape != prob.shape:
            raise ValueError(f"truth {item.truth.name} is {truth.shape[1]}x{truth.shape[0]}, "
                             f"image is {prob.shape[1]}x{prob.shape[0]}")
        s = evaluate_image(prob, truth, self.threshold, fov)
        item.row.update(truth=str(item.truth), **{k: round(s[k], 5) for k in SCORE_FIELDS})

    def _write(self, item: Item, prob: np.ndarray, mask: np.ndarray) -> None:
        """Every file of the image, each atomically. The ledger records the image only after
        all of them are written, so one that fails (or a kill) means the image is redone."""
        paths = self.layout.outputs(item.rel)
        if "prob" in paths:
            # 16 bits: at 8 the faintest vessels tie with the background at the lowest levels
            # and ROC AUC from the map loses ~0.003 (metrics.py). Costs more to write: 512 px
            # 5.9 ms and 261 KiB against 2.3 ms and 72 KiB; 1620x1444 52 ms and 2.0 MB against
            # 19 ms and 0.4 MB (OpenCV's default PNG settings: faster than zlib level 1 here).
            levels = np.clip(prob * 65535 + 0.5, 0, 65535).astype(np.uint16)
            self._write_file(item, "prob", encode(".png", levels))
        if "overlay" in paths:
            self._write_file(item, "overlay", encode(
                ".jpg", overlay(item.image, mask), [cv2.IMWRITE_JPEG_QUALITY, 85]))
        self._write_file(item, "mask", encode_mask(mask))

    def _write_file(self, item: Item, kind: str, data: bytes) -> None:
        path = self.layout.outputs(item.rel)[kind]
        write_atomic(path, data)
        item.outputs[kind] = relative_to(path, self.layout.out)

    # --- the main thread: plan, then windows between the stages ---------------------------
    def run(self, source) -> dict:
        """Process every input of `source` that the output folder does not hold yet."""
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        model = model_identity(self.backend)
        model_file = str(getattr(self.backend, "model_path", "") or "")
        self.ledger = open_ledger(self.layout, RunSettings(
            self.run_id, self._made_by(model), self.threshold, model_file),
            write=self.opt.write, overwrite=self.opt.overwrite,
            writer=self.opt.shard.writer if self.opt.shard else "main")
        try:
            plan = self._process(source, t0)
            view = refresh_view(self.ledger, self.layout.metrics_path) \
                if self.opt.write and not self.opt.shard else None
            summary = self._summary(plan, started, t0, model, view)
            if self.opt.shard:
                summary["shard"] = {"index": self.opt.shard.index, "count": self.opt.shard.count,
                                    "writer": self.opt.shard.writer}
            if self.opt.write:
                if self.opt.report and not self.opt.shard:
                    summary["outputs"]["report"] = str(self.layout.out / "report.html")
                write_json_atomic(self.opt.shard.summary_path(self.layout.out) if self.opt.shard
                                  else self.layout.summary_path, summary)
                if self.opt.report and not self.opt.shard:
                    write_report(self.layout.out, read_rows(self.layout.metrics_path), summary,
                                 truth=self.opt.truth_dir is not None)
            return summary
        finally:
            self.ledger.close()

    def _process(self, source, t0: float) -> Plan:
        """Check the inputs against the ledger, then stream this run's work list through the
        stages; an interrupt stops the intake, what is in flight is finished and recorded."""
        plan, self.interrupted = Plan(started=t0), False
        with _opencv_quiet(), _collector_skips_old_objects(), self._pools():
            try:
                plan = plan_run(source, self.layout, self.ledger, self.run_id,
                                overwrite=self.opt.overwrite, stop=self.stop,
                                on_refused=self._refuse, started=t0,
                                select=self.opt.shard.contains if self.opt.shard else None)
                self.on_start(plan)
                self._feed(self.ledger.queued(self.run_id))
            except KeyboardInterrupt:  # Ctrl-C in a notebook; the CLI sets `stop` instead
                self.stop.set()
            if self.stop.is_set():
                self.interrupted = True
                for future in self.decodes:
                    future.cancel()
                self.decodes.clear()
                self.batches.clear()
            # Batches already in the backend and rows being written are finished either way.
            self._drain()
        self.ledger.commit()
        return plan

    def _made_by(self, model: dict) -> str:
        """What the settings check compares: the weights, plus the inference options that
        change the masks when they differ from the defaults (flip TTA, a fixed canvas)."""
        variant = "".join(f"+{v}" for v in (
            "tta" if getattr(self.backend, "tta", False) else "",
            f"size={self.policy}" if self.opt.size not in (None, "auto") else "") if v)
        return (model["weights_sha256"] or "?") + variant

    @contextlib.contextmanager
    def _pools(self):
        self.decodes: deque[Future] = deque()
        self.batches: dict[int, list[Item]] = {}  # canvas side -> items waiting for a batch
        self.inferring: deque = deque()
        self.writes: deque[Future] = deque()
        self.decoder = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self.writer = ThreadPoolExecutor(self.workers, thread_name_prefix="write")
        try:
            yield
        finally:
            self.decoder.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True)

    def _feed(self, work) -> None:
        decode_window = 2 * self.workers + self.backend.batch_size
        for entry in work:
            if self.stop.is_set():
                return
            item = Item(Path(entry.path), Path(entry.key), outputs=dict(entry.outputs))
            item.row.update(run_id=self.run_id, path=entry.path,
                            output=str(item.rel.with_suffix(".png")),
                            precision=self.precision)
            key = pair_key(entry.path)
            item.truth, item.fov_file = self.truth.get(key), self.fov_files.get(key)
            self.decodes.append(self.decoder.submit(self.load, item))
            while len(self.decodes) >= decode_window and not self.stop.is_set():
                self._take_oldest_decode()
        while self.decodes and not self.stop.is_set():
            self._take_oldest_decode()

    def _refuse(self, path, key: str, output: str, st, message: str) -> None:
        """An input refused before processing (its output name is taken): one error row."""
        row = {"run_id": self.run_id, "path": os.path.abspath(path), "output": output,
               "status": "error", "message": f"input: {message}"}
        self.ledger.record(key, "error", row, input_stat=(
            row["path"], None, st.st_size, st.st_mtime_ns))
        self.tally.add(row)
        self.on_row(row)

    def _take_decoded(self, item: Item) -> None:
        if item.row.get("status") == "error":
            self._record(item)
            return
        # One batch per canvas size: a batch is one tensor.
        side = item.row["canvas"]
        batch = self.batches.setdefault(side, [])
        batch.append(item)
        if len(batch) == self.backend.batch_size:
            self._submit_batch(side)

    def _submit_batch(self, size: int) -> None:
        items = self.batches.pop(size)
        try:
            future = self.pixels.submit(items, size)
        except Exception as e:  # refused at once: the same as failing later
            future = Future()
            future.set_exception(e)
        for it in items:
            it.canvas = None
        self.inferring.append((items, future, time.perf_counter()))
        while len(self.inferring) > self.opt.inflight:
            self._take_inferred()

    def _take_inferred(self) -> None:
        """Hand the oldest batch in the backend to the writers (waiting for it first)."""
        items, future, submitted = self.inferring[0]
        try:
            results = future.result()  # popped only after the wait: an interrupt loses nothing
        except Exception as e:  # a backend failure fails its batch, the run goes on
            self.inferring.popleft()
            for it in items:
                self._record(it.fail("infer", e))
            return
        self.inferring.popleft()
        seconds = getattr(future, "compute_seconds", time.perf_counter() - submitted)
        for it, result in zip(items, results, strict=True):
            if isinstance(result, Exception):  # a JPEG the device could not decode either
                self._record(it.fail("decode", result))
                continue
            it.row["infer_s"] = round(seconds / len(items), 5)
            self.writes.append(self.writer.submit(self.finish, it, result))
        while len(self.writes) > 2 * self.workers:
            self._record_oldest_write()

    def _drain(self) -> None:
        """Finish everything taken so far: batches in the backend, rows being written."""
        for size in list(self.batches):
            self._submit_batch(size)
        while self.inferring:
            self._take_inferred()
        while self.writes:
            self._record_oldest_write()

    # Queues are popped only once their entry is handled, so an interrupt that lands while
    # waiting on one never drops a written image's row.
    def _take_oldest_decode(self) -> None:
        self._take_decoded(self.decodes[0].result())
        self.decodes.popleft()

    def _record_oldest_write(self) -> None:
        self._record(self.writes[0].result())
        self.writes.popleft()

    def _record(self, item: Item) -> None:
        row = item.row
        status = row.setdefault("status", "error")
        self.ledger.record(item.rel.as_posix(), status, row, item.outputs)
        self.tally.add(row)
        self.on_row(row)

    # --- what the summary says about the run ------------------------------------------------
    def _summary(self, plan: Plan, started, t0: float, model: dict, view) -> dict:
        """The run's summary (one definition for the local and the Ray driver)."""
        self.tally.counts["skipped"] = plan.done
        return build_summary(
            tally=self.tally, found=plan.found, folder=self.ledger.totals(),
            wall=time.perf_counter() - t0, started=started, interrupted=self.interrupted,
            run_id=self.run_id, threshold=self.threshold, backend=self.backend,
            model=model, settings=self._settings(), outputs=self._outputs(), view=view)

    def _settings(self) -> dict:
        return {"workers": self.workers, "batch_size": self.backend.batch_size,
                "inflight": self.opt.inflight, "overwrite": self.opt.overwrite,
                "pixel_work": self.pixels.name, "jpeg_on_device": self.jpeg_on_device}

    def _outputs(self) -> dict:
        layout = self.layout
        return {"masks": str(layout.out),
                "metrics": None if self.opt.shard else str(layout.metrics_path),
                "prob": str(layout.prob_dir) if layout.prob_dir else None,
                "overlay": str(layout.overlay_dir) if layout.overlay_dir else None,
                "ledger": str(self.ledger.path) if self.ledger.path else None}


@contextlib.contextmanager
def _collector_skips_old_objects():
    """gc.freeze() for the run: the objects that exist before it (modules, the model, the
    caller's) are no garbage of ours, yet every full collection walked all of them (~50,000
    after the imports) while a run makes a few rows per image; ~0.2 ms of CPU per 512 px image
    (benchmarks/README.md, host cost). unfreeze() gives them back to the collector after;
    a caller that froze objects itself keeps its own arrangement (we would unfreeze them)."""
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


@contextlib.contextmanager
def _opencv_quiet():
    """One OpenCV thread per call (our pools give the parallelism; nested cv2 threads
    oversubscribe) and no decoder warnings: a bad file is one row and one line from the CLI,
    not several unexplained libpng / libtiff lines."""
    threads, level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        cv2.utils.logging.setLogLevel(level)


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photograph (BGR for encoding) with vessels tinted green, for people to look at.

    Always at the mask's (the original image's) size, also when the photograph was decoded
    at reduced size: every output of an image has the same geometry.
    """
    mask = mask > 0
    h, w = mask.shape
    if rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    out[mask] = (0.4 * out[mask] + (0, 153, 0)).astype(np.uint8)
    return out


def check_run(source, write: bool, **folders) -> dict[str, Path | None]:
    """The checks made before a run loads anything or creates any folder (any runner: local,
    shard, Ray); returns `folders` (out, prob_dir, ...) as Paths."""
    from .io import InputError

    paths = {k: Path(v) if v is not None else None for k, v in folders.items()}
    layout = Layout(paths["out"], paths["prob_dir"], paths["overlay_dir"], paths["metrics"])
    iter(discover(source))  # raises InputError now rather than after the model has loaded
    for name in ("truth_dir", "fov_dir"):
        if paths[name] is not None and not paths[name].is_dir():
            raise FileNotFoundError(f"--{name.replace('_dir', '')} folder not found: "
                                    f"{paths[name]}")
    if write:
        for folder in [*layout.folders(), layout.metrics_path.parent]:
            check_writable(folder)
        check_not_inputs(source, layout)
    if next(iter(discover(source, exclude=layout.folders())), None) is None:
        raise InputError(f"no images found in {source}")
    return paths


def segment(source, out, *, backend: str = "onnxruntime", model=None, device: str = "auto",
            precision: str = "auto", batch_size: int = 2, workers: int = 0, inflight: int = 2,
            threshold: float | None = None, prob_dir=None, overlay_dir=None, metrics=None,
            truth_dir=None, fov_dir=None, overwrite: bool = False, write: bool = True,
            on_row=None, on_open=None, on_start=None, stop: threading.Event | None = None,
            reduced_decode: bool = True, shard: Shard | None = None,
            size: int | str = "auto", tta: bool = False, pixel_work: str = "auto",
            jpeg_decode: str = "auto") -> dict:
    """Segment every image of `source` (folder tree, image, or list file) into `out`.

    Returns the run summary (also written to OUT/summary.json). Raises InputError for an
    unusable input, BackendUnavailable for a missing runtime/model, OutputError for an output
    that cannot be written or would overwrite an input, SettingsMismatch for an output folder
    made with another model or threshold; all of them before any folder is created. Problems
    with single images become error rows instead. Setting `stop` (from a signal handler or
    another thread) ends the run early and cleanly. `on_start(plan)` is called once the inputs
    have been checked against the folder's ledger (resume.Plan: found, done, todo, refused).
    `shard`: process only that shard's inputs (shard.py; its summary goes beside its ledger).
    `pixel_work`: where letterbox, resize back, threshold and FOV masking run (pixel_work.py):
    auto (the backend's device when it is a CUDA GPU), host, or device. `jpeg_decode`: auto
    hands JPEGs to that device undecoded where it decodes them (nvJPEG), host never does.
    """
    from .backends import open_backend

    paths = check_run(source, write, out=out, prob_dir=prob_dir, overlay_dir=overlay_dir,
                      metrics=metrics, truth_dir=truth_dir, fov_dir=fov_dir)
    options = Options(threshold=threshold, overwrite=overwrite, workers=workers,
                      inflight=inflight, write=write, stop=stop,
                      reduced_decode=reduced_decode, shard=shard, pixel_work=pixel_work,
                      jpeg_decode=jpeg_decode,
                      **paths)
    with open_backend(backend, model, batch_size=batch_size, device=device,
                      precision=precision) as runner:
        options.size = _size_policy(runner, size)
        runner = FlipTTA(runner) if tta else runner
        if on_open:
            on_open(runner)
        return Pipeline(runner, options, on_row, on_start).run(source)


def _size_policy(runner, size: int | str | None) -> int | str:
    """`size` if the model takes every canvas it can choose. `auto` with a fixed-size graph
    (exported before graphs had dynamic sizes) quietly means the working size."""
    from .backends import BackendUnavailable

    policy = size or runner.size
    if policy != "auto" and (int(policy) < 32 or int(policy) % 32):
        raise BackendUnavailable(f"--size {policy}: use auto or a multiple of 32 (>= 32)")
    rejected = [s for s in canvas_sizes(runner.size, policy) if not runner.accepts(s)]
    if rejected and policy == "auto":
        return runner.size
    if rejected:
        raise BackendUnavailable(
            f"--size {policy}: {runner.model_path.name} takes only {runner.size} x "
            f"{runner.size} canvases; re-export it (retina-batch export) for dynamic sizes, "
            f"or leave --size at auto")
    return policy
