"""What the output-folder ledger costs at scale, driving it directly (no images needed).

    python benchmarks/ledger_cost.py [--inputs 1000000] [--json benchmarks/results/FILE.json]

In a temporary folder, for N inputs with realistic keys (clinic/patient/image.jpg) and a
full metrics row each (every column of records.METRIC_FIELDS filled):

  record     queue every input (what a first run's planning does) and record its result
  resume     reopen the ledger and run the resume check on every input, as a re-run does:
             Ledger.get (lookup by key) + Ledger.done (same size and mtime, outputs recorded,
             one stat per output file). The outputs of the N rows point at 1,000 real
             one-byte files, so every check succeeds and stats an existing file (dentry cache
             warm, as on a local disk; a network file system adds its own per-stat latency)
  view       rewrite metrics.csv from the ledger (every run that changed something does this)
  totals     count done / failed / pending

Times are wall clock per input (what a user waits) and CPU time of this process per input
(what the work costs, less sensitive to other load on a shared machine).
and the memory the bookkeeping adds: peak resident memory (VmHWM) during all of it minus the
resident memory before the ledger was opened. Prints one JSON object.

`--path-set` measures instead what the ledger replaced: a Python set of N Path objects with
the same keys (the pipeline's old `outputs_seen`), as resident memory before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from retina_batch.ledger import Ledger, RunSettings
from retina_batch.records import METRIC_FIELDS, write_metrics_csv


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _row(i: int, key: str) -> dict:
    row = {name: round(0.001 * (i % 997) + j, 5) for j, name in enumerate(METRIC_FIELDS)}
    row.update(run_id="20261123T140000Z-a1b2c3", path=f"/data/screening/{key}",
               output=key.replace(".jpg", ".png"), status="ok", message="", width=3504,
               height=2336, decode_scale=8, fov_found=True, truth="")
    return row


def _key(i: int) -> str:
    return f"clinic{i % 100:02d}/patient{i // 100:05d}/{i:07d}.jpg"


def measure(n: int, folder: Path) -> dict:
    masks = folder / "masks"
    masks.mkdir()
    for j in range(1000):
        (masks / f"{j}.png").write_bytes(b"x")
    rss_before = _status_kb("VmRSS")
    ledger = Ledger(folder)
    ledger.begin(RunSettings("run-1", "0" * 64, 0.45, "model.onnx"))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        key = _key(i)
        ledger.queue(key, f"/data/screening/{key}", key[:-4] + ".png", 400_000 + i, i,
                     keep_result=False)
        ledger.record(key, "ok", _row(i, key), {"mask": f"masks/{i % 1000}.png"})
    ledger.close()
    record_s, record_cpu = time.perf_counter() - t0, time.process_time() - c0

    ledger = Ledger(folder)
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for i in range(n):
        entry = ledger.get(_key(i))
        done += ledger.done(entry, 400_000 + i, i, {"mask": masks / f"{i % 1000}.png"})
    resume_s, resume_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert done == n, f"only {done} of {n} inputs found done"

    t0 = time.perf_counter()
    view = write_metrics_csv(ledger.rows(), folder / "metrics.csv")
    view_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    totals = ledger.totals()
    totals_s = time.perf_counter() - t0
    ledger.close()
    assert view["rows"] == n and totals == {"done": n, "failed": 0, "pending": 0}
    return {
        "inputs": n,
        "memory_added_mb": round((_status_kb("VmHWM") - rss_before) / 1024, 1),
        "record_us_per_input": round(1e6 * record_s / n, 2),
        "record_cpu_us_per_input": round(1e6 * record_cpu / n, 2),
        "resume_check_us_per_input": round(1e6 * resume_s / n, 2),
        "resume_check_cpu_us_per_input": round(1e6 * resume_cpu / n, 2),
        "view_rewrite_s": round(view_s, 2),
        "totals_s": round(totals_s, 3),
        "ledger_mb_on_disk": round(ledger.path.stat().st_size / 2**20, 1),
        "metrics_csv_mb": round((folder / "metrics.csv").stat().st_size / 2**20, 1),
    }


def path_set_mb(n: int) -> float:
    before = _status_kb("VmRSS")
    seen = {Path(_key(i)).with_suffix(".png") for i in range(n)}
    return round((_status_kb("VmRSS") - before) / 1024, 1) if seen else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--path-set", action="store_true",
                        help="only measure a set of N paths (what the ledger replaced)")
    args = parser.parse_args()
    if args.path_set:
        print(json.dumps({"inputs": args.inputs, "path_set_mb": path_set_mb(args.inputs)}))
        return
    with tempfile.TemporaryDirectory(prefix="ledger-cost-") as tmp:
        result = measure(args.inputs, Path(tmp))
    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "load_average": os.getloadavg(),
                         "python": platform.python_version()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
