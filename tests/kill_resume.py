"""`kill -9` a `retina-batch segment` run at random moments, re-run it, check the folder.

    python tests/kill_resume.py [--images 60] [--kills 5] [--seed 0] [--model FILE]

Segments a folder of synthetic photographs of assorted sizes and formats into one output
folder, killing the run with SIGKILL at a random moment `--kills` times (each time the same
command is run again), then lets one last run finish and checks what a user would: every input
has exactly one row in metrics.csv, with status ok, and a complete 0/255 PNG mask of its own
width and height; no partial or temporary file is left; summary.json counts every input done.
Prints one line per run and the problems found; exit status 0 when there are none.

The default model is the shipped one (no PyTorch needed). tests/test_kill.py imports the same
functions: one random and two deterministic kills (in the middle of a file write, and between
writing an image's files and recording it) on the tiny test model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from tiny import fundus_like  # noqa: E402

PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
# Every writer's ledger (its WAL files stay, emptied, while another process held it open).
LEDGER_FILE = re.compile(r"^\.retina-batch/ledger-[\w.-]+\.sqlite(-wal|-shm)?$")


def make_inputs(src: Path, n: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """n photographs of assorted sizes (PNG and JPEG, in subfolders): {rel path: (w, h)}."""
    rng = np.random.default_rng(seed)
    sizes = {}
    for i in range(n):
        w, h = int(rng.integers(80, 420)), int(rng.integers(60, 380))
        rel = f"clinic{i % 3}/{i:04d}.{'png' if i % 2 else 'jpg'}"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(Path(rel).suffix, fundus_like(w, h, seed=i))
        (src / rel).write_bytes(buf.tobytes())
        sizes[rel] = (w, h)
    return sizes


def segment_argv(model: Path | None, src: Path, out: Path, *extra: str) -> list[str]:
    args = ["segment", str(src), "--out", str(out), "--workers", "1", "--batch-size", "2",
            "-q", *extra]
    return [*args, "--model", str(model)] if model else args


def fault(prelude: str, n: int) -> str:
    """One of the fault-injection preludes below, acting on the n-th file written."""
    return prelude.replace("{n}", str(n))


def start(argv: list[str], prelude: str = "") -> subprocess.Popen:
    """`retina-batch ARGV` in a fresh Python process; `prelude` runs first (fault injection)."""
    code = f"{prelude}\nfrom retina_batch.cli import main\nmain(args={argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def masks_written(out: Path) -> int:
    return sum(1 for p in out.rglob("*.png") if not p.name.startswith("."))


def kill_at_random(proc: subprocess.Popen, out: Path, rng: random.Random, todo: int) -> str:
    """SIGKILL the run at a random moment of its work: once a random number (1 to todo - 1)
    of its `todo` missing masks are written, plus a random fraction of a 50 ms tick (the
    run's progress, not a guessed duration, so the kill lands mid-run on a slow or a busy
    machine as on a fast one)."""
    start = masks_written(out) if out.is_dir() else 0
    _wait_for_masks(proc, out, start + rng.randint(1, max(todo - 1, 1)))
    time.sleep(rng.uniform(0, 0.05))
    finished = proc.poll() is not None
    proc.kill()
    proc.communicate(timeout=60)
    return "finished before the kill" if finished else f"killed with {masks_written(out)} masks"


def _wait_for_masks(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and masks_written(out) >= n:
            return True
        time.sleep(0.005)
    return False


# Fault injection for deterministic kills. The pipeline imports write_atomic by name, and
# write_atomic opens its file through the io module's global `open`: patching those two names
# puts the kill exactly where we want it, in the real code path.
KILL_AFTER_FILE = """
import os, signal
import retina_batch.pipeline as pipeline
real, written = pipeline.write_atomic, [0]
def write_atomic(path, data):
    real(path, data)
    written[0] += 1
    if written[0] == {n}:  # this image's file is on disk, its row not yet recorded
        os.kill(os.getpid(), signal.SIGKILL)
pipeline.write_atomic = write_atomic
"""

KILL_IN_WRITE = """
import builtins, os, signal
import retina_batch.io as io
opened = [0]
class HalfThenKill:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # half of the bytes are in the file
def open_(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if "w" in mode:
        opened[0] += 1
        if opened[0] == {n}:
            return HalfThenKill(f)
    return f
io.open = open_
"""


def check_folder(src: Path, out: Path, sizes: dict[str, tuple[int, int]]) -> list[str]:
    """Everything a finished folder must be; returns the problems (empty: all good)."""
    problems = []
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {os.path.abspath(src / rel): rel for rel in sizes}
    seen = Counter(r["path"] for r in rows)
    if len(rows) != len(sizes) or set(seen) != set(expected):
        problems.append(f"{len(rows)} rows for {len(sizes)} inputs; missing "
                        f"{sorted(set(expected) - set(seen))[:3]}, extra "
                        f"{sorted(set(seen) - set(expected))[:3]}")
    problems += [f"{p}: {n} rows" for p, n in seen.items() if n > 1]
    for row in rows:
        if row["status"] != "ok":
            problems.append(f"{row['path']}: status {row['status']} {row['message']}")
        rel = expected.get(row["path"])
        if rel is not None:
            problems += check_mask(out / row["output"], sizes[rel])
    leftovers = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                 and (p.name.startswith(".")
                      or p.suffix not in (".png", ".csv", ".json", ".html"))
                 and not LEDGER_FILE.match(p.relative_to(out).as_posix())]
    if leftovers:
        problems.append(f"partial or temporary files left: {leftovers}")
    folder = json.loads((out / "summary.json").read_text())["folder"]
    if folder != {"done": len(sizes), "failed": 0, "pending": 0}:
        problems.append(f"summary.json folder totals {folder}")
    return problems


def check_mask(path: Path, size: tuple[int, int]) -> list[str]:
    if not path.is_file():
        return [f"{path}: no mask"]
    data = path.read_bytes()
    if not (data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)):
        return [f"{path}: incomplete PNG ({len(data)} bytes)"]
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2 or (mask.shape[1], mask.shape[0]) != size:
        return [f"{path}: {None if mask is None else mask.shape}, expected {size}"]
    if not set(np.unique(mask)) <= {0, 255}:
        return [f"{path}: values other than 0 and 255"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="default: the shipped model")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        sizes = make_inputs(src, args.images, args.seed)
        argv = segment_argv(args.model, src, out)
        landed = 0
        for i in range(args.kills):
            todo = len(sizes) - (masks_written(out) if out.is_dir() else 0)
            outcome = kill_at_random(start(argv), out, rng, todo)
            landed += outcome.startswith("killed")
            print(f"run {i + 1}: {outcome}")
        proc = start(argv)
        _, stderr = proc.communicate(timeout=3600)
        print(f"final run: exit {proc.returncode}")
        problems = check_folder(src, out, sizes) if proc.returncode == 0 else [stderr]
    for problem in problems:
        print("problem:", problem)
    print(f"{len(sizes)} inputs, {landed} of {args.kills} kills mid-run: "
          f"{'all good' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
