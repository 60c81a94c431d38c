"""The streaming segmentation pipeline: discover -> decode pool -> batcher -> backend -> writers.

Every stage hands work to the next through a bounded window (a deque of futures that the main
thread drains oldest-first once it is full), so peak memory depends on the window sizes, not on
the number of images. Decoding, inference and writing overlap: while the backend computes batch
k, the decode threads prepare batch k+1 and the writer threads finish batch k-1.

A failure in one image becomes one error row; only an interrupt or a broken backend stops the run.
"""

from __future__ import annotations

import csv
import os
import platform
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from . import __version__
from .card import write_json_atomic
from .io import decode, discover, encode, index_by_key, pair_key, read_mask, write_atomic
from .metrics import evaluate_image
from .preprocess import FieldOfView, detect_fov, letterbox, to_rgb8, unletterbox

METRIC_FIELDS = [
    "run_id", "path", "output", "status", "message", "width", "height", "decode_scale",
    "fov_found", "fov_area", "vessel_fraction", "threshold", "precision",
    "decode_s", "preprocess_s", "infer_s", "postprocess_s", "write_s",
    "truth", "dice", "iou", "sensitivity", "specificity", "accuracy", "auc", "fov_dice", "fov_auc",
]
STAGES = ("decode_s", "preprocess_s", "infer_s", "postprocess_s", "write_s")


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
    # Set (e.g. from a signal handler) to stop taking new images: what is in flight is finished,
    # written and recorded, then the run returns its summary with interrupted = True.
    stop: threading.Event | None = None


@dataclass
class Item:
    """One image on its way through the pipeline; becomes one metrics row."""

    path: Path
    rel: Path
    row: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # decoded RGB; kept only when an overlay is wanted
    canvas: np.ndarray | None = None
    letterbox: object = None
    fov: FieldOfView | None = None
    truth: Path | None = None
    fov_file: Path | None = None

    def fail(self, stage: str, error: BaseException) -> Item:
        self.row.update(status="error", message=f"{stage}: {error}")
        self.image = self.canvas = None
        return self


def _timed(row: dict, stage: str, start: float) -> float:
    now = time.perf_counter()
    row[stage] = round(now - start, 5)
    return now


class Pipeline:
    def __init__(self, backend, options: Options, on_row=None):
        self.backend, self.opt = backend, options
        self.threshold = options.threshold if options.threshold is not None \
            else backend.threshold
        self.workers = options.workers or os.cpu_count() or 2
        self.precision = backend.describe().get("precision")  # fp32 / int8, for every row
        self.on_row = on_row or (lambda row: None)
        self.truth = index_by_key(options.truth_dir)
        self.fov_files = index_by_key(options.fov_dir, fov=True)
        self.stop = options.stop or threading.Event()
        self.counts = {"ok": 0, "error": 0, "skipped": 0, "no_fov": 0}
        self.failures: list[dict] = []
        self.stage_totals = dict.fromkeys(STAGES, 0.0)
        self.scores: list[dict] = []
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.outputs_seen: set[Path] = set()

    # --- stages run in the thread pools ------------------------------------------------
    def load(self, item: Item) -> Item:
        """Decode, detect the FOV, letterbox onto the canvas. Never raises."""
        start = time.perf_counter()
        try:
            raw, (width, height), factor = decode(
                item.path, self.backend.size if self.opt.reduced_decode else None)
            rgb = to_rgb8(raw)
        except Exception as e:
            return item.fail("decode", e)
        item.row.update(width=width, height=height, decode_scale=factor)
        start = _timed(item.row, "decode_s", start)
        try:
            fov = self._fov(item, rgb)
            item.canvas, item.letterbox = letterbox(rgb, fov.box, self.backend.size,
                                                    (width, height))
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

    def finish(self, item: Item, canvas_prob: np.ndarray) -> Item:
        """Back to the original size, threshold, FOV, write, score. Never raises."""
        row, start, stage = item.row, time.perf_counter(), "postprocess"
        try:
            width, height = row["width"], row["height"]
            prob = unletterbox(canvas_prob, item.letterbox)
            fov = item.fov.mask if item.fov.mask.shape == (height, width) else cv2.resize(
                item.fov.mask, (width, height), interpolation=cv2.INTER_NEAREST)
            prob *= fov
            mask = prob >= self.threshold
            fov_area = int(np.count_nonzero(fov))
            row.update(fov_found=item.fov.found, fov_area=fov_area, threshold=self.threshold,
                       vessel_fraction=round(np.count_nonzero(mask) / max(fov_area, 1), 5))
            start = _timed(row, "postprocess_s", start)
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
        item.row.update(truth=str(item.truth), **{k: round(s[k], 5) for k in (
            "dice", "iou", "sensitivity", "specificity", "accuracy", "auc", "fov_dice",
            "fov_auc")})

    def _write(self, item: Item, prob: np.ndarray, mask: np.ndarray) -> None:
        name = item.rel.with_suffix(".png")
        if self.opt.prob_dir:
            levels = np.clip(prob * 255 + 0.5, 0, 255).astype(np.uint8)
            write_atomic(self.opt.prob_dir / name, encode(".png", levels))
        if self.opt.overlay_dir:
            write_atomic(self.opt.overlay_dir / item.rel.with_suffix(".jpg"),
                         encode(".jpg", overlay(item.image, mask), [cv2.IMWRITE_JPEG_QUALITY, 85]))
        # The mask last: its existence is what marks the image done for a resumed run.
        write_atomic(self.opt.out / name, encode(".png", mask.astype(np.uint8) * 255))

    # --- the main thread: windows between the stages ----------------------------------
    def run(self, source) -> dict:
        self.started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        self.interrupted = False
        self.opt.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.opt.metrics or self.opt.out / "metrics.csv"
        self._open_metrics(metrics_path)
        self.decodes: deque[Future] = deque()
        self.batch: list[Item] = []
        self.inferring: deque = deque()
        self.writes: deque[Future] = deque()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # parallelism comes from our pools; nested cv2 threads oversubscribe
        # A bad file is one row and one line from the CLI: OpenCV's own decoder warnings
        # (libpng, libtiff, ...) would add several unexplained stderr lines per file.
        log_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        self.decoder = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        self.writer = ThreadPoolExecutor(self.workers, thread_name_prefix="write")
        try:
            try:
                self._feed(source)
            except KeyboardInterrupt:  # Ctrl-C in a notebook; the CLI sets `stop` instead
                self.stop.set()
            if self.stop.is_set():
                self.interrupted = True
                for future in self.decodes:
                    future.cancel()
                self.decodes.clear()
                self.batch.clear()
            # Batches already in the backend and rows being written are finished either way.
            self._drain()
        finally:
            self.decoder.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True)
            cv2.setNumThreads(threads)
            cv2.utils.logging.setLogLevel(log_level)
            self._metrics_file.close()
        return self._summary(time.perf_counter() - t0, metrics_path)

    def _feed(self, source) -> None:
        decode_window = 2 * self.workers + self.backend.batch_size
        for path, rel in discover(source, exclude=self._output_dirs()):
            if self.stop.is_set():
                return
            item = Item(Path(path), Path(rel))
            item.row.update(run_id=self.run_id, path=str(path),
                            output=str(rel.with_suffix(".png")),
                            precision=self.precision)
            if self._skip(item):
                continue
            key = pair_key(path)
            item.truth, item.fov_file = self.truth.get(key), self.fov_files.get(key)
            self.decodes.append(self.decoder.submit(self.load, item))
            while len(self.decodes) >= decode_window and not self.stop.is_set():
                self._take_oldest_decode()
        while self.decodes and not self.stop.is_set():
            self._take_oldest_decode()

    def _output_dirs(self) -> list[Path]:
        """Where this run writes: never read back as input when it lies inside the input tree."""
        return [d for d in (self.opt.out, self.opt.prob_dir, self.opt.overlay_dir) if d]

    def _skip(self, item: Item) -> bool:
        name = item.rel.with_suffix(".png")
        if name in self.outputs_seen:
            self._record(item.fail("input", ValueError(
                f"another input of this run also writes {name}; rename one of them")))
            return True
        self.outputs_seen.add(name)
        if self.opt.overwrite or not self.opt.write or not (self.opt.out / name).exists():
            return False
        self.counts["skipped"] += 1
        self.on_row({**item.row, "status": "skipped"})  # progress only: its row is on file
        return True

    def _take_decoded(self, item: Item) -> None:
        if item.row.get("status") == "error":
            self._record(item)
            return
        self.batch.append(item)
        if len(self.batch) == self.backend.batch_size:
            self._submit_batch()

    def _submit_batch(self) -> None:
        items, self.batch = self.batch, []
        canvases = np.stack([it.canvas for it in items])
        for it in items:
            it.canvas = None
        self.inferring.append((items, self.backend.submit(canvases), time.perf_counter()))
        while len(self.inferring) > self.opt.inflight:
            self._take_inferred()

    def _take_inferred(self) -> None:
        """Hand the oldest batch in the backend to the writers (waiting for it first)."""
        items, future, submitted = self.inferring[0]
        try:
            probs = future.result()  # popped only after the wait: an interrupt loses nothing
        except Exception as e:  # a backend failure fails its batch, the run goes on
            self.inferring.popleft()
            for it in items:
                self._record(it.fail("infer", e))
            return
        self.inferring.popleft()
        seconds = getattr(future, "compute_seconds", time.perf_counter() - submitted)
        for it, prob in zip(items, probs, strict=True):
            it.row["infer_s"] = round(seconds / len(items), 5)
            self.writes.append(self.writer.submit(self.finish, it, prob))
        while len(self.writes) > 2 * self.workers:
            self._record_oldest_write()

    def _drain(self) -> None:
        """Finish everything taken so far: batches in the backend, rows being written."""
        if self.batch:
            self._submit_batch()
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

    # --- records -------------------------------------------------------------------------
    def _open_metrics(self, path: Path) -> None:
        """Append-only CSV, one row per image per run, flushed row by row (crash-safe audit
        trail). A resumed run adds the rows of the images it processed; --overwrite restarts."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.opt.overwrite or not path.exists() or path.stat().st_size == 0
        self._metrics_file = open(path, "w" if fresh else "a", newline="")
        if not fresh and not _ends_with_newline(path):
            self._metrics_file.write("\r\n")  # a killed run's half row stays a row of its own
        self._metrics = csv.DictWriter(self._metrics_file, fieldnames=METRIC_FIELDS,
                                       extrasaction="ignore")
        if fresh:
            self._metrics.writeheader()

    def _record(self, item: Item) -> None:
        row = item.row
        status = row.get("status", "error")
        self.counts[status] += 1
        if status == "ok":
            self.counts["no_fov"] += not row.get("fov_found", True)
            for stage in STAGES:
                self.stage_totals[stage] += row.get(stage, 0.0)
            if "dice" in row:
                self.scores.append({k: row[k] for k in METRIC_FIELDS[-8:]})
        else:
            self.failures.append({"path": row["path"], "message": row.get("message", "")})
        self._metrics.writerow(row)
        self._metrics_file.flush()
        self.on_row(row)

    def _summary(self, wall: float, metrics_path: Path) -> dict:
        ok = self.counts["ok"]
        summary = {
            "counts": {**self.counts, "processed": ok + self.counts["error"]},
            "failures": self.failures,
            "interrupted": self.interrupted,
            "wall_seconds": round(wall, 3),
            "images_per_second": round(ok / wall, 3) if wall > 0 else None,
            "mean_stage_seconds": {k: round(v / ok, 5) for k, v in self.stage_totals.items()}
            if ok else {},
            "threshold": self.threshold,
            "backend": self.backend.describe(),
            "model_card_sha256": self.backend.card.get("sha256"),
            "settings": {"workers": self.workers, "batch_size": self.backend.batch_size,
                         "inflight": self.opt.inflight, "overwrite": self.opt.overwrite},
            "outputs": {"masks": str(self.opt.out), "metrics": str(metrics_path),
                        "prob": str(self.opt.prob_dir) if self.opt.prob_dir else None,
                        "overlay": str(self.opt.overlay_dir) if self.opt.overlay_dir else None},
            "versions": software_versions(),
            "started": self.started.isoformat(timespec="seconds"),
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.scores:
            summary["truth_means"] = {k: round(float(np.nanmean([s[k] for s in self.scores])), 5)
                                      for k in self.scores[0]}
            summary["truth_images"] = len(self.scores)
        if self.opt.write:
            write_json_atomic(self.opt.out / "summary.json", summary)
        return summary


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


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


def software_versions() -> dict:
    versions = {"retina-batch": __version__, "python": platform.python_version(),
                "numpy": np.__version__, "opencv": cv2.__version__, "platform": sys.platform}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


class OutputError(OSError):
    """An output folder that cannot be created or written."""


def check_writable(folder: Path) -> None:
    """Fail before any work if an output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e


def segment(source, out, *, backend: str = "onnxruntime", model=None, device: str = "auto",
            precision: str = "auto", batch_size: int = 2, workers: int = 0, inflight: int = 2,
            threshold: float | None = None, prob_dir=None, overlay_dir=None, metrics=None,
            truth_dir=None, fov_dir=None, overwrite: bool = False, write: bool = True,
            on_row=None, on_open=None, stop: threading.Event | None = None,
            reduced_decode: bool = True) -> dict:
    """Segment every image of `source` (folder tree, image, or list file) into `out`.

    Returns the run summary (also written to OUT/summary.json). Raises InputError for an
    unusable input, BackendUnavailable for a missing runtime/model, OSError for an unwritable
    output folder; problems with single images become error rows instead. Setting `stop`
    (from a signal handler or another thread) ends the run early and cleanly.
    """
    from .backends import open_backend

    paths = {k: Path(v) if v is not None else None for k, v in dict(
        out=out, prob_dir=prob_dir, overlay_dir=overlay_dir, metrics=metrics,
        truth_dir=truth_dir, fov_dir=fov_dir).items()}
    iter(discover(source))  # raises InputError now rather than after the model has loaded
    for name in ("out", "prob_dir", "overlay_dir"):
        if paths[name] is not None and write:
            check_writable(paths[name])
    for name in ("truth_dir", "fov_dir"):
        if paths[name] is not None and not paths[name].is_dir():
            raise FileNotFoundError(f"--{name.replace('_dir', '')} folder not found: "
                                    f"{paths[name]}")
    options = Options(threshold=threshold, overwrite=overwrite, workers=workers,
                      inflight=inflight, write=write, stop=stop,
                      reduced_decode=reduced_decode, **paths)
    with open_backend(backend, model, batch_size=batch_size, device=device,
                      precision=precision) as runner:
        if on_open:
            on_open(runner)
        return Pipeline(runner, options, on_row).run(source)
