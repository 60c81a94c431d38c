"""Re-apply known mistakes to a copy of the checkout, one at a time, and check the tests catch each.

    python tests/mutations.py              # every mutation, with the test files it names
    python tests/mutations.py --all-tests  # every mutation against the whole suite (slower)
    python tests/mutations.py --list       # the mutations, without running anything
    python tests/mutations.py NAME ...     # only these (names from --list)

Each mutation is a small declarative entry: (file, function, old expression -> new expression).
The function is found by its qualified name with `ast` and the old expression by its syntax
tree (so formatting, comments and moved lines do not matter); exactly one match is required,
and a mutation that no longer applies is reported as an ERROR, never skipped. When the code
is refactored, retarget the entry (function name or expression), do not delete it.

The copy is `git ls-files` (tracked and untracked, not ignored) in a temporary folder, with
`shared/` beside it when the checkout has one, so real-data tests run too. The unmutated copy
must pass the same tests first. Exit status: 0 when every mutation is killed, 1 otherwise.

Not a test module (pytest collects only test_*.py) and not run by CI: a full run takes a few
minutes on two cores. Origin: issue 9, whose mutation check found these mistakes unnoticed.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edit:
    """Replace the one occurrence of expression/statement `old` inside `function` by `new`."""

    file: str
    function: str  # qualified: "Pipeline._write", "decode"
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    effect: str  # what a user would get
    edits: tuple[Edit, ...]
    tests: tuple[str, ...] = field(default=())  # test files run against it (default: all)


PIPELINE = "retina_batch/pipeline.py"
PIPELINE_TESTS = ("tests/test_segment.py", "tests/test_resume.py", "tests/test_faults.py",
                  "tests/test_default_model.py")

MUTATIONS = (
    # --- the ten of issue 9's table, in its order -----------------------------------------
    # Pipeline entries target the ledger-era pipeline (Pipeline.__init__/_take_inferred/finish,
    # resume.plan_run); retarget them when it changes.
    Mutation("threshold-fallback-0.5", "masks made at 0.5 instead of the card's threshold",
             (Edit(PIPELINE, "Pipeline.__init__", "backend.threshold", "0.5"),),
             PIPELINE_TESTS),
    Mutation("threshold-option-ignored", "--threshold 0.3 asked, the card's used",
             (Edit(PIPELINE, "Pipeline.__init__",
                   "options.threshold if options.threshold is not None else backend.threshold",
                   "backend.threshold"),),
             PIPELINE_TESTS),
    Mutation("fov-scores-ignore-fov", "fov_dice / fov_auc scored over the whole image",
             (Edit("retina_batch/metrics.py", "evaluate_image",
                   "Confusion.of(pred, truth, fov)", "Confusion.of(pred, truth)"),
              Edit("retina_batch/metrics.py", "evaluate_image",
                   "roc_auc(prob, truth, fov)", "roc_auc(prob, truth)")),
             ("tests/test_metrics.py",)),
    Mutation("unletterbox-one-row-lower", "probabilities land one canvas row (2-11 px) off",
             (Edit("retina_batch/preprocess.py", "_back_to_box",
                   "canvas_map[py0:py1, px0:px1]", "canvas_map[py0 + 1:py1 + 1, px0:px1]"),),
             ("tests/test_preprocess.py",)),
    Mutation("reduced-decode-integer-scale", "masks shifted and shrunk on sizes not /8",
             (Edit("retina_batch/preprocess.py", "plan_letterbox", "orig_w / w", "orig_w // w"),
              Edit("retina_batch/preprocess.py", "plan_letterbox", "orig_h / h", "orig_h // h")),
             ("tests/test_preprocess.py", "tests/test_geometry.py")),
    # Issue 9 found the reduced path honouring EXIF while the full path did not; the rule is
    # now that both honour it (io.decode), so the mistake is one path ignoring it.
    Mutation("reduced-decode-ignores-exif", "a rotated JPEG's mask turned when decoded reduced",
             (Edit("retina_batch/io.py", "decode", "_decoded(data, _REDUCED[factor], orientation)",
                   "_decoded(data, _REDUCED[factor], 1)"),),
             ("tests/test_io.py", "tests/test_geometry.py")),
    Mutation("write-atomic-in-place", "a crash leaves a truncated PNG under the final name",
             (Edit("retina_batch/io.py", "write_atomic",
                   'path.with_name(f".{path.name}.partial")', "path"),),
             ("tests/test_io.py",) + PIPELINE_TESTS),
    # Before the ledger, "done" meant "the mask file exists", so writing the mask before the
    # prob made a failed prob write permanent. The ledger now records an image only after all
    # its files are written (write order no longer matters: that edit is an equivalent mutant);
    # the same user-visible mistake today is a resume check that looks at the mask alone.
    Mutation("mask-written-before-prob", "a --prob/--overlay file missing on disk is never made",
             (Edit("retina_batch/resume.py", "plan_run",
                   "ledger.done(entry, st.st_size, st.st_mtime_ns, wanted)",
                   'ledger.done(entry, st.st_size, st.st_mtime_ns, {"mask": wanted["mask"]})'),),
             PIPELINE_TESTS),
    Mutation("backend-failure-reraised", "one failed batch aborts the whole run",
             (Edit(PIPELINE, "Pipeline._take_inferred",
                   'for it in items:\n    self._record(it.fail("infer", e))', "raise"),),
             PIPELINE_TESTS),
    Mutation("augment-target-not-warped", "training labels misaligned with their images",
             (Edit("retina_batch/training/augment.py", "random_view",
                   "cv2.warpAffine(target, matrix, **warp)", "cv2.resize(target, (size, size))"),),
             ("tests/test_augment.py",)),
    # --- mistakes that issue 9's weak tests would have hidden ------------------------------
    Mutation("full-decode-ignores-exif", "a rotated JPEG's mask turned when decoded full size",
             (Edit("retina_batch/io.py", "decode",
                   "_decoded(data, cv2.IMREAD_UNCHANGED, orientation)",
                   "_decoded(data, cv2.IMREAD_UNCHANGED, 1)"),),
             ("tests/test_io.py", "tests/test_geometry.py")),
    Mutation("fov-mask-not-applied", "vessels predicted outside the field of view",
             (Edit("retina_batch/preprocess.py", "threshold_in_fov", "mask &= fov", "pass"),),
             ("tests/test_geometry.py",) + PIPELINE_TESTS),
    Mutation("metrics-fp-fn-swapped", "sensitivity and specificity computed wrongly",
             (Edit("retina_batch/metrics.py", "Confusion.of",
                   "cls(tp, fp, fn, int(pred.size) - tp - fp - fn)",
                   "cls(tp, fn, fp, int(pred.size) - tp - fp - fn)"),),
             ("tests/test_metrics.py",)),
    # --- the GPU-resident flow (pixel_work.py), checked on CPU torch ---------------------
    Mutation("device-flow-never-chosen", "--pixel-work device / auto on a GPU runs on the host",
             (Edit("retina_batch/pixel_work.py", "choose",
                   'setting == "device" or (setting == "auto" and offered and on_gpu)',
                   "False"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-threshold-shifted", "device masks cut at another threshold",
             (Edit("retina_batch/pixel_work.py", "DevicePixels.submit", "self.threshold",
                   "self.threshold + 0.05"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-fov-is-the-mask", "measurements made with the mask as the FOV",
             (Edit("retina_batch/backends/torch.py", "TorchBackend._finish",
                   "[d.fov for d in done]", "[d.mask for d in done]"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-fov-file-ignored", "--fov masks replaced by the whole frame on the device",
             (Edit("retina_batch/preprocess_gpu.py", "fov_on_device",
                   "torch.from_numpy(fov.mask).to(device)",
                   "torch.ones_like(torch.from_numpy(fov.mask)).to(device)"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-plan-at-decoded-size", "reduced-decode masks at the decoded size",
             (Edit("retina_batch/pixel_work.py", "DevicePixels.place",
                   "plan_letterbox(fov.box, (rgb.shape[1], rgb.shape[0]), canvas, size)",
                   "plan_letterbox(fov.box, (rgb.shape[1], rgb.shape[0]), canvas)"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-quality-kernel-too-short", "quality statistics with 3-sigma kernels",
             (Edit("retina_batch/qc_gpu.py", "gaussian_kernel",
                   "int(np.rint(sigma * 4 * 2 + 1)) | 1", "int(np.rint(sigma * 3 * 2 + 1)) | 1"),),
             ("tests/test_qc.py",)),
    Mutation("device-quality-inside-not-eroded", "quality statistics include the FOV rim",
             (Edit("retina_batch/qc_gpu.py", "image_quality",
                   "erode(inside, 2 * INNER_MARGIN + 1)", "inside"),),
             ("tests/test_qc.py", "tests/test_pixel_work.py")),
    Mutation("allocator-settings-not-applied", "image memory faulted in again for every image",
             (Edit("retina_batch/allocator.py", "keep_freed_memory",
                   "mallopt(param, value) == 1", "True"),),
             ("tests/test_allocator.py",)),
    Mutation("jpegs-always-decoded-on-the-host", "the GPU flow decodes every JPEG on the host",
             (Edit(PIPELINE, "Pipeline.load", "self.jpeg_on_device", "False"),),
             ("tests/test_pixel_work.py", "tests/test_bench.py")),
    Mutation("jpeg-decode-host-ignored", "--jpeg-decode host still hands JPEGs to the device",
             (Edit(PIPELINE, "Pipeline.__init__", "options.jpeg_decode == 'auto'", "True"),),
             ("tests/test_pixel_work.py", "tests/test_bench.py")),
    Mutation("device-thumbnails-fetched-at-one-offset", "every FOV of a batch from its first "
             "photograph's thumbnail",
             (Edit("retina_batch/preprocess_gpu.py", "detect_fovs",
                   "offset += thumb.numel()", "offset += 0"),),
             ("tests/test_preprocess_gpu.py",)),
    Mutation("auc-from-256-levels", "ROC AUC ties the faintest vessels with the background",
             (Edit("retina_batch/metrics.py", "roc_auc", "prob * (AUC_BINS - 1)", "prob * 255"),),
             ("tests/test_metrics.py",)),
    Mutation("prob-maps-8-bit", "--prob writes 8-bit maps again",
             (Edit(PIPELINE, "Pipeline._write",
                   "np.clip(prob * 65535 + 0.5, 0, 65535).astype(np.uint16)",
                   "np.clip(prob * 255 + 0.5, 0, 255).astype(np.uint8)"),),
             ("tests/test_segment.py", "tests/test_default_model.py")),
    Mutation("fov-level-not-from-the-rim", "the FOV threshold ignores the rim's own level "
             "(grey rims and dim peripheries)",
             (Edit("retina_batch/preprocess.py", "_dark_corners",
                   "background + noise < 0.25 * p99", "False"),),
             ("tests/test_preprocess.py",)),
    Mutation("fov-edge-band-not-redecided", "the FOV edge stays at the rim's level plus noise",
             (Edit("retina_batch/preprocess.py", "_fov_on_thumbnail", "edge <= level", "True"),),
             ("tests/test_preprocess.py", "tests/test_qc.py")),
    Mutation("canvas-rim-left-grey", "blank_outside leaves the rim as it was",
             (Edit("retina_batch/preprocess.py", "blank_outside",
                   "cv2.compare(inside, 0, cv2.CMP_EQ)", "cv2.compare(inside, 2, cv2.CMP_EQ)"),),
             ("tests/test_preprocess.py",)),
    Mutation("host-canvas-not-blanked", "the host flow gives the model the rim as it was",
             (Edit("retina_batch/pixel_work.py", "HostPixels.place",
                   "blank_outside(item.canvas, item.letterbox, fov.mask)", "None"),),
             ("tests/test_pixel_work.py",)),
    Mutation("device-canvas-not-blanked", "the device flow gives the model the rim as it was",
             (Edit("retina_batch/backends/torch.py", "TorchBackend._prepare",
                   "device.blank_outside(canvas, lb, fov_mask)", "None"),),
             ("tests/test_preprocess_gpu.py",)),
)


# --- applying an edit ----------------------------------------------------------------------

class NotApplicable(Exception):
    """The code no longer has the function or expression an edit names: retarget it."""


def _find_function(tree: ast.Module, qualname: str) -> ast.AST:
    scope: ast.AST = tree
    for part in qualname.split("."):
        found = [n for n in ast.iter_child_nodes(scope)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                 and n.name == part]
        if len(found) != 1:
            raise NotApplicable(f"{qualname}: {part!r} not found")
        scope = found[0]
    return scope


def _pattern(old: str) -> ast.AST:
    body = ast.parse(old).body
    if len(body) != 1:
        raise NotApplicable(f"the old code must be one expression or statement: {old!r}")
    node = body[0]
    return node.value if isinstance(node, ast.Expr) else node


def _index(lines: list[str], lineno: int, col_offset: int) -> int:
    """Character index in the joined lines of an ast position (col_offset counts UTF-8 bytes)."""
    before = sum(len(line) for line in lines[:lineno - 1])
    return before + len(lines[lineno - 1].encode()[:col_offset].decode())


def apply_edit(source: str, edit: Edit) -> str:
    """`source` with the edit applied; NotApplicable unless `old` matches exactly once."""
    function = _find_function(ast.parse(source), edit.function)
    wanted = ast.dump(_pattern(edit.old))
    matches = [n for n in ast.walk(function)
               if hasattr(n, "end_col_offset") and ast.dump(n) == wanted]
    if len(matches) != 1:
        raise NotApplicable(f"{edit.file}:{edit.function}: {edit.old!r} found "
                            f"{len(matches)} times (expected once)")
    node, lines = matches[0], source.splitlines(keepends=True)
    begin = _index(lines, node.lineno, node.col_offset)
    end = _index(lines, node.end_lineno, node.end_col_offset)
    mutated = source[:begin] + edit.new + source[end:]
    ast.parse(mutated)  # a SyntaxError here is a bug in the entry
    return mutated


def apply(root: Path, mutation: Mutation) -> dict[Path, str]:
    """Apply every edit of a mutation under `root`; returns the original texts to restore."""
    originals: dict[Path, str] = {}
    for edit in mutation.edits:
        path = root / edit.file
        if not path.exists():
            raise NotApplicable(f"{edit.file}: no such file")
        originals.setdefault(path, path.read_text())
        path.write_text(apply_edit(path.read_text(), edit))
    return originals


# --- running the tests ---------------------------------------------------------------------

def copy_checkout(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    checkout = dest / "checkout"
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = checkout / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # tests find real data at ../shared/data
        (dest / "shared").symlink_to(shared.resolve())
    return checkout


def run_tests(checkout: Path, tests: tuple[str, ...], stop_first: bool) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
           *(["-x"] if stop_first else []), *(tests or ["tests"])]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.MULTILINE)
    return proc.returncode, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--all-tests", action="store_true", help="the whole suite each time")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--stop-first", action="store_true",
                        help="stop each run at its first failing test (faster, names one killer)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:30} {m.effect}\n{'':30} tests: {', '.join(m.tests) or 'all'}")
        return 0
    with tempfile.TemporaryDirectory(prefix="retina-mutations-") as tmp:
        checkout = copy_checkout(Path(tmp))
        suites = {() if args.all_tests else m.tests for m in chosen}
        for tests in suites:  # the unmutated code must pass what will judge the mutants
            code, failed = run_tests(checkout, tests, stop_first=True)
            if code != 0:
                print(f"the unmutated checkout fails {' '.join(tests) or 'the suite'} "
                      f"(exit {code}: {', '.join(failed) or 'see pytest'}); fix that first")
                return 1
        results = {}
        for m in chosen:
            start = time.perf_counter()
            try:
                originals = apply(checkout, m)
            except NotApplicable as e:
                results[m.name] = "ERROR"
                print(f"ERROR     {m.name}: does not apply any more ({e}); retarget it")
                continue
            try:
                code, failed = run_tests(checkout, () if args.all_tests else m.tests,
                                         args.stop_first)
            finally:
                for path, text in originals.items():
                    path.write_text(text)
            status = {0: "SURVIVED", 1: "killed"}.get(code, "ERROR")
            results[m.name] = status
            detail = (f"by {len(failed)} test(s): {', '.join(failed)}" if failed
                      else f"pytest exit {code}")
            print(f"{status:9} {m.name} ({time.perf_counter() - start:.0f} s) {detail}",
                  flush=True)
    killed = sum(s == "killed" for s in results.values())
    print(f"\n{killed}/{len(results)} killed"
          + "".join(f"; {s.lower()}: {n}" for n, s in results.items() if s != "killed"))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
