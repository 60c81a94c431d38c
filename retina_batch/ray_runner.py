"""`segment --ray`: the same pipeline as Ray Data stages, on the Ray cluster at RAY_ADDRESS (or
a local Ray instance when it is unset: `ray.init()` decides, as every Ray program does).

    driver        plans the run through the folder's ledger (resume.plan_run, writer 'main'),
      |           exactly as a local run: only inputs not done yet become the dataset
    from_items    one row per input: key, path, sizes, truth/FOV files
    decode        map_batches(decode_batch): CPU tasks; Pipeline.load (decode, FOV, letterbox)
    infer         map_batches(InferActor): an actor pool, one actor per GPU (num_gpus=1) or,
      |           without GPUs, one per CPU_CORES_PER_ACTOR cores; the backend is opened once
    write         map_batches(WriteActor): an actor pool; Pipeline.finish (back to the original
      |           size, threshold, atomic writes, scores), then the row into the actor's OWN
      |           ledger file (writer 'ray-<actor id>'), committed before the batch returns
    driver        counts the rows as they arrive (progress, summary); at the end it absorbs the
                  actors' ledger files into its own, writes metrics.csv and summary.json

The stages reuse Pipeline.load and Pipeline.finish, so a Ray run writes the very same masks and
rows as a local run. Queues, back-pressure, scheduling and fault tolerance are Ray Data's: an
actor that dies is restarted and its batches are retried (Ray Data's defaults for actor pools,
max_restarts=-1 and max_task_retries=-1). A retried batch is written again (atomic writes: the
same bytes under the same names) and recorded again in the same actor's file (restarted actors
keep their id): one row per input whatever happened.

Why write actors rather than writing in the inference actor: PNG encoding is the costly host
work per image; in its own pool it overlaps with inference instead of leaving the GPU idle.
Why actors rather than tasks for writing: a ledger file per writer must be long-lived (one per
task would be thousands of files).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray

from .backends import BackendUnavailable, open_backend, resolve_model
from .backends.precision import choose as choose_precision
from .card import load_card, write_json_atomic
from .io import pair_key
from .ledger import Ledger, RunSettings, ledger_files, writer_of
from .pipeline import Item, Options, Pipeline, _opencv_quiet, check_run
from .records import refresh_view
from .resume import Plan, open_ledger, plan_run
from .summary import model_identity

CPU_CORES_PER_ACTOR = 4  # ONNX Runtime on CPU uses several threads per inference call
# What each worker reserves (Ray's accounting, not a limit). Actors reserve fractions so that
# a small machine keeps whole CPUs for the decode tasks: a pool that reserved every CPU would
# leave the decode tasks unschedulable and the run waiting for ever.
DECODE_CPUS, WRITE_CPUS, INFER_CPUS = 1, 0.5, 0.5
ACTOR_WRITER = "ray-"  # prefix of the write actors' ledger writer names


class RayUnavailable(BackendUnavailable):
    """No Ray cluster could be reached or started (the message says what to do)."""


@dataclass(frozen=True)
class ModelFile:
    """What the driver, the decode tasks and the write actors need of the model without
    loading a runtime (the driver may have no GPU): its card's geometry and threshold."""

    name: str  # backend name
    model_path: Path
    card: dict
    batch_size: int
    device: str
    precision: str = "fp32"  # what the model file computes in (backends.precision.choose)
    precision_reason: str = ""

    @property
    def size(self) -> int:
        return int(self.card["working_size"])

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    def describe(self) -> dict:
        return {"backend": self.name, "model": str(self.model_path),
                "model_sha256": self.card.get("sha256"), "device": self.device,
                "precision": self.precision, "precision_reason": self.precision_reason,
                "runner": "ray"}


# --- the stages (run on Ray workers) -----------------------------------------------------------

def decode_batch(batch: dict, *, model: ModelFile, options: Options, run_id: str) -> dict:
    """Decode tasks: Pipeline.load for each input; the canvas travels as an array, the rest of
    the item (letterbox, FOV, row so far) pickled beside it."""
    stages = Pipeline(model, options)
    n, size = len(batch["key"]), model.size
    canvases, ok, items = np.zeros((n, size, size, 3), np.uint8), np.zeros(n, bool), []
    with _opencv_quiet():
        for i in range(n):
            item = stages.load(_item(batch, i, run_id, model.precision))
            if item.canvas is not None and item.row.get("status") != "error":
                canvases[i], ok[i] = item.canvas, True
            item.canvas = None
            items.append(pickle.dumps(item))
    keep = ("key", "path", "output", "size", "mtime_ns")
    return {**{k: batch[k] for k in keep}, "canvas": canvases, "ok": ok,
            "item": np.array(items, dtype=object)}


def _item(batch: dict, i: int, run_id: str, precision: str) -> Item:
    """The pipeline's Item of one dataset row (as Pipeline._feed makes it)."""
    item = Item(Path(batch["path"][i]), Path(batch["key"][i]),
                outputs=pickle.loads(batch["outputs"][i]))
    item.row.update(run_id=run_id, path=str(batch["path"][i]),
                    output=str(item.rel.with_suffix(".png")), precision=precision)
    item.truth = Path(batch["truth"][i]) if batch["truth"][i] else None
    item.fov_file = Path(batch["fov_file"][i]) if batch["fov_file"][i] else None
    return item


class InferActor:
    """One model runtime per actor, opened once; batches of canvases in, probabilities out."""

    def __init__(self, model: ModelFile):
        self.backend = open_backend(model.name, model.model_path,
                                    batch_size=model.batch_size, device=model.device,
                                    precision=model.precision)

    def __call__(self, batch: dict) -> dict:
        n, size = len(batch["key"]), self.backend.size
        probs, seconds = np.zeros((n, size, size), np.float32), np.zeros(n)
        errors = np.array([""] * n, dtype=object)
        todo = np.flatnonzero(batch["ok"])
        for start in range(0, len(todo), self.backend.batch_size):
            rows = todo[start:start + self.backend.batch_size]
            try:
                future = self.backend.submit(np.ascontiguousarray(batch["canvas"][rows]))
                probs[rows] = future.result()
                seconds[rows] = getattr(future, "compute_seconds", 0.0) / len(rows)
            except Exception as e:  # a backend failure fails its images, the run goes on
                errors[rows] = str(e)
        out = {k: v for k, v in batch.items() if k != "canvas"}
        return {**out, "prob": probs, "infer_s": seconds, "infer_error": errors}

    def __del__(self):
        self.backend.close()


class WriteActor:
    """Pipeline.finish for each image, then its row in this actor's own ledger file."""

    def __init__(self, model: ModelFile, options: Options, run: RunSettings):
        self.stages = Pipeline(model, options)
        actor = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
        self.ledger = Ledger(options.out, f"{ACTOR_WRITER}{actor[:16]}", any_thread=True)
        self.ledger.begin(run)
        self.lock = threading.Lock()  # one batch at a time into the ledger, whatever Ray does

    def __call__(self, batch: dict) -> dict:
        rows = []
        with self.lock, _opencv_quiet():
            for i in range(len(batch["key"])):
                item = self._finish(batch, i)
                status = item.row.setdefault("status", "error")
                self.ledger.record(str(batch["key"][i]), status, item.row, item.outputs,
                                   input_stat=(str(batch["path"][i]), str(batch["output"][i]),
                                               int(batch["size"][i]),
                                               int(batch["mtime_ns"][i])))
                rows.append(pickle.dumps(item.row))
        self.ledger.commit()  # before the batch counts as done: a kill after it loses nothing
        return {"key": batch["key"], "row": np.array(rows, dtype=object)}

    def _finish(self, batch: dict, i: int) -> Item:
        item: Item = pickle.loads(batch["item"][i])
        if not batch["ok"][i]:
            return item  # failed to decode: its error row is ready
        if batch["infer_error"][i]:
            return item.fail("infer", RuntimeError(batch["infer_error"][i]))
        item.row["infer_s"] = round(float(batch["infer_s"][i]), 5)
        return self.stages.finish(item, batch["prob"][i])

    def __del__(self):  # a graceful end of the pool: the ledger file is left self-contained
        self.ledger.close()


# --- the driver ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pools:
    """How many actors of each stage, and what each reserves."""

    infer: int
    infer_resources: dict
    write: int

    @classmethod
    def for_cluster(cls, resources: dict, device: str) -> Pools:
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if gpus and device != "cpu":
            return cls(gpus, {"num_gpus": 1, "num_cpus": INFER_CPUS}, gpus)
        actors = max(1, cpus // CPU_CORES_PER_ACTOR)
        return cls(actors, {"num_cpus": INFER_CPUS}, actors)

    def check(self, resources: dict) -> None:
        """Refuse pools that would leave no CPU for a decode task (the run would never end)."""
        cpus = resources.get("CPU", 0)
        reserved = self.infer * self.infer_resources.get("num_cpus", 0) + self.write * WRITE_CPUS
        if reserved + DECODE_CPUS > cpus:
            raise RayUnavailable(f"the Ray cluster has {cpus:g} CPUs; {self.infer} inference and "
                                 f"{self.write} write actors reserve {reserved:g}, leaving less "
                                 f"than {DECODE_CPUS} for decoding: use a larger cluster")
        if self.infer_resources.get("num_gpus", 0) * self.infer > resources.get("GPU", 0):
            raise RayUnavailable(f"{self.infer} inference actors need one GPU each; the Ray "
                                 f"cluster has {resources.get('GPU', 0):g}")


class RayPipeline(Pipeline):
    """The driver: Pipeline's ledger, settings check, refusals and view; Ray Data's stages."""

    def __init__(self, model: ModelFile, options: Options, on_row=None, on_start=None,
                 pools: Pools | None = None):
        super().__init__(model, options, on_row, on_start)
        self.pools = pools

    def run(self, source) -> dict:
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        absorb_actor_ledgers(self.layout.out)  # leftovers of a killed run, before the check
        model = model_identity(self.backend)
        self._model_sha = self._made_by(model)
        self.ledger = open_ledger(self.layout, RunSettings(
            self.run_id, self._model_sha, self.threshold, str(self.backend.model_path)),
            write=True, overwrite=self.opt.overwrite)
        plan, self.interrupted = Plan(started=t0), False
        try:
            plan = plan_run(source, self.layout, self.ledger, self.run_id,
                            overwrite=self.opt.overwrite, stop=self.stop,
                            on_refused=self._refuse, started=t0)
            self.on_start(plan)
            items = self._work_list()
            if items and not self.stop.is_set():
                self._stream(self._dataset(items))
            self.interrupted = self.stop.is_set()
            self.ledger.commit()
            for path in actor_ledgers(self.layout.out):
                self.ledger.absorb(path)
            view = refresh_view(self.ledger, self.layout.metrics_path)
            summary = self._summary(plan, started, t0, model, view)
            write_json_atomic(self.layout.summary_path, summary)
            return summary
        finally:
            self.ledger.close()

    def _work_list(self) -> list[dict]:
        """This run's queued inputs as dataset rows (in the driver's memory: ~200 bytes each)."""
        items = []
        for entry in self.ledger.queued(self.run_id):
            key = pair_key(entry.path)
            truth, fov = self.truth.get(key), self.fov_files.get(key)
            items.append({"key": entry.key, "path": entry.path, "output": entry.output,
                          "size": entry.size, "mtime_ns": entry.mtime_ns,
                          "outputs": pickle.dumps(entry.outputs),
                          "truth": str(truth or ""), "fov_file": str(fov or "")})
        return items

    def _dataset(self, items: list[dict]):
        model, pools, batch = self.backend, self.pools, self.backend.batch_size
        # Truth and FOV files are paired here, once; the stages get the paths with the items.
        stage_options = replace(self.opt, truth_dir=None, fov_dir=None, stop=None)
        run = RunSettings(self.run_id, self._model_sha, self.threshold, str(model.model_path))
        return (ray.data.from_items(items)
                .map_batches(decode_batch, batch_size=batch, num_cpus=DECODE_CPUS, fn_kwargs=dict(
                    model=model, options=stage_options, run_id=self.run_id))
                .map_batches(InferActor, batch_size=batch, fn_constructor_args=(model,),
                             compute=ray.data.ActorPoolStrategy(size=pools.infer),
                             **pools.infer_resources)
                .map_batches(WriteActor, batch_size=batch, num_cpus=WRITE_CPUS,
                             fn_constructor_args=(model, stage_options, run),
                             compute=ray.data.ActorPoolStrategy(size=pools.write)))

    def _stream(self, dataset) -> None:
        """Count the rows as the write actors finish them; stop taking more on `stop`."""
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for row in batch["row"]:
                row = pickle.loads(row)
                self.tally.add(row)
                self.on_row(row)
            if self.stop.is_set():
                return

    def _settings(self) -> dict:
        return {**super()._settings(), "ray": {
            "address": os.environ.get("RAY_ADDRESS") or "local",
            "infer_actors": self.pools.infer, "write_actors": self.pools.write,
            "infer_resources": self.pools.infer_resources}}


def actor_ledgers(out: Path) -> list[Path]:
    return [p for p in ledger_files(out) if writer_of(p).startswith(ACTOR_WRITER)]


def absorb_actor_ledgers(out: Path) -> None:
    """Fold the ledger files of write actors of earlier runs into the folder's 'main' file (no
    actor of this folder is alive before a run starts: they belong to finished runs)."""
    leftovers = actor_ledgers(out)
    if leftovers:
        ledger = Ledger(out, "main")
        try:
            for path in leftovers:
                ledger.absorb(path)
        finally:
            ledger.close()


@contextmanager
def ray_connection():
    """Connect as Ray does (RAY_ADDRESS, else a running local `ray start`, else a new local
    instance), unless this process already is. ray.init() installs its own SIGTERM handler:
    the caller's (the CLI's: finish what is in flight) is put back."""
    if ray.is_initialized():
        yield
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="error")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayUnavailable(f"cannot connect to Ray ({e}); check RAY_ADDRESS "
                             f"({os.environ.get('RAY_ADDRESS') or 'unset: a local instance'})"
                             ) from e
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    try:
        yield
    finally:
        ray.shutdown()


def segment_ray(source, out, *, backend: str = "onnxruntime", model=None, device: str = "auto",
                precision: str = "auto", batch_size: int = 2, workers: int = 0,
                threshold: float | None = None, prob_dir=None, overlay_dir=None, metrics=None,
                truth_dir=None, fov_dir=None,
                overwrite: bool = False, on_row=None, on_open=None, on_start=None,
                stop: threading.Event | None = None, pools: Pools | None = None,
                size: int | str = "auto", tta: bool = False, pixel_work: str = "auto",
                jpeg_decode: str = "auto") -> dict:
    """pipeline.segment on Ray: same arguments (`workers` is Ray's to choose: unused; and
    `jpeg_decode`: every file is decoded on the host, where the canvases are made), same
    outputs and summary, same errors. `pools`: actor counts (default: from the cluster).
    Every photograph goes on the model's working canvas (one tensor shape per actor batch):
    `--size N`, `--tta` and `--pixel-work device` are refused rather than ignored."""
    if tta or size not in ("auto", None):
        raise BackendUnavailable("--ray runs every photograph on the model's working canvas: "
                                 "drop --tta and --size, or run without --ray")
    if pixel_work == "device":  # its decode tasks send canvases to the inference actors
        raise BackendUnavailable("--ray makes the canvases on the host: drop --pixel-work "
                                 "device, or run without --ray")
    paths = check_run(source, True, out=out, prob_dir=prob_dir, overlay_dir=overlay_dir,
                      metrics=metrics, truth_dir=truth_dir, fov_dir=fov_dir)
    if backend == "auto":
        from .backends.auto import choose

        backend, model = choose(model, device)
    # Chosen once, here: every actor runs the same file (workers of a cluster may have other
    # CPUs, but one folder holds one model's masks).
    choice = choose_precision(resolve_model(model, backend), precision, backend, device)
    model_file = ModelFile(backend, choice.path, load_card(choice.path), batch_size, device,
                           choice.precision, choice.reason)
    if on_open:
        on_open(model_file)
    options = Options(threshold=threshold, overwrite=overwrite, stop=stop, pixel_work="host",
                      **paths)
    with ray_connection():
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # our progress bar is enough
        resources = ray.cluster_resources()
        pools = pools or Pools.for_cluster(resources, device)
        pools.check(resources)
        return RayPipeline(model_file, options, on_row, on_start, pools).run(source)
