"""The standard benchmark matrix: writes benchmarks/results/<date>-<machine>.json, a plot PNG
beside it, and the results table in benchmarks/README.md (between the `results` markers).

    python benchmarks/run.py              # the recorded matrix (about 10-15 min on 2 cores)
    python benchmarks/run.py --quick      # a smoke run: fewer images and configurations
    python benchmarks/run.py --from-json results/X.json   # redo plot + table, no run

Every input set goes through retina_batch.bench.bench (the real pipeline, one process per
configuration, the naive loop in the same run). Scaling runs (100, 1,000, 10,000 inputs) use
128x128 synthetic JPEGs and the same width-16 architecture exported at a 128 px working size,
because at the default 512 px canvas 10,000 images take ~40 min of inference on 2 cores: they
test that the pipeline's throughput and memory stay flat, not the model's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from retina_batch.bench import STAGE_NAMES, bench, contention

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REAL_512 = REPO.parent / "shared" / "data" / "retina-blood-vessel" / "train" / "image"
console = Console(stderr=True, highlight=False)


# segment's default batch size: on this CPU batch 1-2 gave the best throughput and efficiency at
# 512 px, and batches of 4 and 8 cost 1-2 GB more memory (table in benchmarks/README.md).
DEFAULT_BATCH = 2


def matrix(quick: bool) -> list[dict]:
    """(name, bench keyword arguments) for every input set of the standard matrix."""
    n = (lambda full, small: small if quick else full)  # noqa: E731
    sets = []
    if REAL_512.is_dir():
        sets.append({"name": "real 512x512 PNG", "source": "REAL",
                     "images": n(24, 6), "batch_sizes": n((1, 2, 4, 8), (DEFAULT_BATCH,)),
                     "workers": (0,), "extra_workers": n((1,), ())})
    sets += [
        {"name": "synthetic 512x512 JPEG", "synthetic": n(24, 6), "size": (512, 512),
         "batch_sizes": n((1, 2, 4, 8), (1, DEFAULT_BATCH)), "workers": (0,)},
        {"name": "synthetic 1024x1024 JPEG", "synthetic": n(16, 4), "size": (1024, 1024),
         "batch_sizes": (DEFAULT_BATCH,), "workers": (0,)},
        {"name": "synthetic 2048x2048 JPEG", "synthetic": n(12, 4), "size": (2048, 2048),
         "batch_sizes": (DEFAULT_BATCH,), "workers": (0,)},
        {"name": "synthetic 3504x2336 JPEG", "synthetic": n(12, 4), "size": (3504, 2336),
         "batch_sizes": (DEFAULT_BATCH,), "workers": (0,), "reduced_decode": (True, False)},
    ]
    return sets


def _real_subset(count: int, folder: Path) -> Path:
    """A list file with the first `count` real images (numeric order), for bench's SOURCE."""
    images = sorted(REAL_512.glob("*.png"), key=lambda p: (len(p.stem), p.stem))[:count]
    listing = folder / "real512.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    return listing


def scaling_model(folder: Path) -> Path:
    """The default architecture (width 16, depth 4) at a 128 px working size, random weights."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import write_tiny_onnx

    return write_tiny_onnx(folder / "w16-128", size=128, width=16)


def run(args) -> dict:
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sets": [], "scaling": [],
              "model_note": model_note(), "contention_start": contention()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retina-matrix-") as tmp:
        tmp = Path(tmp)
        for spec in matrix(args.quick):
            console.print(f"[bold]{spec['name']}[/bold]")
            kwargs = dict(batch_sizes=spec["batch_sizes"], workers=spec["workers"],
                          repeat=args.repeat, reduced_decode=spec.get("reduced_decode", (True,)),
                          naive_reduced_decode=True, pure_images=16,
                          on_result=_show)
            if spec.get("source") == "REAL":
                result = bench(_real_subset(spec["images"], tmp), **kwargs)
            else:
                result = bench(synthetic=spec["synthetic"], size=spec["size"], fmt="jpg",
                               **kwargs)
            for w in spec.get("extra_workers", ()):
                extra = bench(_real_subset(spec["images"], tmp), batch_sizes=(DEFAULT_BATCH,),
                              workers=(w,),
                              repeat=args.repeat, naive=False, pure_images=16, on_result=_show)
                for r in extra["results"]:
                    r["speedup_vs_naive"] = round(r["end_to_end_ips"]
                                                  / result["naive"]["end_to_end_ips"], 3)
                result["results"] += extra["results"]
            result["name"] = spec["name"]
            record["sets"].append(result)
        model = scaling_model(tmp)
        for count in ((100, 1000) if args.quick else (100, 1000, 10000)):
            console.print(f"[bold]scaling: {count} synthetic 128x128 JPEG[/bold]")
            result = bench(synthetic=count, size=(128, 128), model=model, batch_sizes=(8,),
                           repeat=1, naive=False, write=True, pure_images=128, pure_repeat=3,
                           on_result=_show)
            result["name"] = f"scaling {count}"
            record["scaling"].append(result)
    record["contention_end"] = contention()
    record["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    record["machine"] = record["sets"][0]["machine"]
    return record


def model_note() -> dict:
    card_path = REPO / "retina_batch" / "default_model" / "model.onnx.json"
    if not card_path.exists():
        return {"default_model": None}
    card = json.loads(card_path.read_text())
    return {"default_model": card.get("name"), "sha256": card.get("sha256"),
            "architecture": card.get("model"), "working_size": card.get("working_size"),
            "parameters": card.get("parameters"), "created": card.get("created")}


def _show(label: str, r: dict) -> None:
    extra = f", efficiency {r['efficiency']:.2f}" if r.get("efficiency") else ""
    if r.get("speedup_vs_naive"):
        extra += f", {r['speedup_vs_naive']:.2f}x naive"
    console.print(f"  {label}: {r['end_to_end_ips']:.2f} img/s{extra}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", highlight=False)


# --- outputs -----------------------------------------------------------------------------

def _config(r: dict) -> str:
    c = r["config"]
    text = f"b{c['batch_size']} w{c['workers']}"
    return text if c["reduced_decode"] else text + " full-decode"


def table(record: dict) -> str:
    lines = ["| input | configuration | img/s | pure inference img/s | efficiency | x naive "
             "| decode | preprocess | infer | postprocess | measure | write (ms/img) "
             "| bottleneck | host bottleneck | p50 / p95 latency ms | peak RSS MB | CPU |",
             "|" + "---|" * 17]
    for s in record["sets"] + record["scaling"]:
        naive = s.get("naive")
        if naive:
            lines.append(_row(s["name"], "naive loop (b1, no overlap)", naive))
        for r in s["results"]:
            lines.append(_row(s["name"], _config(r), r))
    return "\n".join(lines)


def _row(name: str, config: str, r: dict) -> str:
    st = r["stage_ms"]
    f = (lambda v, d=2: "-" if v is None else f"{v:.{d}f}")  # noqa: E731
    return (f"| {name} | {config} | {f(r['end_to_end_ips'])} | {f(r.get('pure_inference_ips'))}"
            f" | {f(r.get('efficiency'))} | {f(r.get('speedup_vs_naive'))} | "
            + " | ".join(f(st.get(k), 1) for k in STAGE_NAMES)
            + f" | {r['bottleneck']} | {r['host_bottleneck']} | {f(r['latency_ms']['p50'], 0)} / "
              f"{f(r['latency_ms']['p95'], 0)} | {r['peak_rss_mb']:.0f} | "
              f"{100 * r['cpu_utilisation']:.0f}% |")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    labels, e2e, pure, naive = [], [], [], []
    for s in record["sets"]:
        short = s["name"].replace("synthetic ", "syn ").replace(" JPEG", "").replace(" PNG", "")
        for r in s["results"]:
            labels.append(f"{short}\n{_config(r)}")
            e2e.append(r["end_to_end_ips"])
            pure.append(r["pure_inference_ips"])
            naive.append(s["naive"]["end_to_end_ips"] if "naive" in s else 0)
    x = range(len(labels))
    ax1.bar([i - 0.27 for i in x], naive, 0.27, label="naive loop", color="#bbbbbb")
    ax1.bar(list(x), e2e, 0.27, label="pipeline end-to-end", color="#2a7ab9")
    ax1.bar([i + 0.27 for i in x], pure, 0.27, label="pure inference", color="#e39a2d")
    ax1.set_xticks(list(x), labels, rotation=70, fontsize=7)
    ax1.set_ylabel("images / s")
    ax1.set_title("Throughput by configuration")
    ax1.legend(fontsize=8)
    stages = STAGE_NAMES
    names, values = [], {k: [] for k in stages}
    for s in record["sets"]:
        for r in s["results"]:
            if r["config"]["batch_size"] == DEFAULT_BATCH and r["config"]["workers"] == \
                    s["results"][0]["config"]["workers"]:
                names.append(s["name"].replace("synthetic ", "syn ") +
                             ("" if r["config"]["reduced_decode"] else "\nfull decode"))
                for k in stages:
                    values[k].append(r["stage_ms"].get(k) or 0.0)  # older records: no measure
    bottom = [0.0] * len(names)
    for k, colour in zip(stages, ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#64b5cd",
                                  "#ccb974"), strict=True):
        ax2.barh(names, values[k], left=bottom, label=k, color=colour)
        bottom = [b + v for b, v in zip(bottom, values[k], strict=True)]
    ax2.set_xlabel(f"mean ms per image, by stage (batch {DEFAULT_BATCH}; "
                   "stages overlap in the pipeline)")
    ax2.set_title("Stage breakdown")
    ax2.tick_params(axis="y", labelsize=8)
    ax2.legend(fontsize=8)
    load = record["contention_start"]["load_average"]
    fig.suptitle(f"retina-batch bench, {record['machine']['cpu_model']}, "
                 f"{record['machine']['cores']} cores, load {load[0]} at start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_text(record: dict) -> str:
    note = record["model_note"]
    if not note.get("default_model"):
        return "none shipped"
    arch = note.get("architecture") or {}
    return (f"shipped default \"{note['default_model']}\" (sha256 {note['sha256'][:12]}, "
            f"created {note.get('created')}, width {arch.get('width')}, depth "
            f"{arch.get('depth')}, {note.get('working_size')} px)")


def write_readme_table(record: dict, json_name: str, png_name: str) -> None:
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\n<!-- results -->\n" \
        "<!-- /results -->\n"
    load0, load1 = (record["contention_start"]["load_average"],
                    record["contention_end"]["load_average"])
    training = record["contention_start"]["training_processes"]
    body = (f"Recorded {record['started']} on {record['machine']['cpu_model']} "
            f"({record['machine']['cores']} cores), {record['minutes']} min; load average "
            f"{load0[0]} at start, {load1[0]} at end; "
            f"{'a training run was using the CPU (contended)' if training else 'no training run'}"
            f". Model: {_model_text(record)}. Raw record: "
            f"[results/{json_name}](results/{json_name}); plot: "
            f"[results/{png_name}](results/{png_name}).\n\n{table(record)}\n")
    block = f"<!-- results -->\n{body}<!-- /results -->"
    text = re.sub(r"<!-- results -->.*<!-- /results -->", lambda m: block, text, flags=re.S)
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer images/configs")
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--from-json", type=Path,
                        help="redo the plot and README table from a recorded JSON (no run)")
    args = parser.parse_args()
    if args.from_json:
        record = json.loads(args.from_json.read_text())
        plot(record, args.from_json.with_suffix(".png"))
        write_readme_table(record, args.from_json.name, args.from_json.with_suffix(".png").name)
        return
    record = run(args)
    machine = re.sub(r"[^a-z0-9]+", "-", f"{record['machine']['cpu_model']}-"
                     f"{record['machine']['cores']}c".lower()).strip("-")
    stem = f"{time.strftime('%Y-%m-%d')}-{machine}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.out / f"{stem}.png")
    if not args.no_readme:
        write_readme_table(record, f"{stem}.json", f"{stem}.png")
    console.print(f"wrote {args.out / stem}.json and .png ({record['minutes']} min, "
                  f"{platform.node()})")


if __name__ == "__main__":
    main()
