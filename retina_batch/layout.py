"""Where a `segment` run writes, and the checks made before it writes anything.

Every output path of an input derives from its path relative to the input root (`rel`):
the mask OUT/rel.png, the probability map PROB/rel.png, the overlay OVERLAY/rel.jpg; and the
run's own files: the metrics view (OUT/metrics.csv unless --metrics), OUT/summary.json and the
ledger under OUT/.retina-batch/. The checks here create nothing, so a run refused for a usage
error leaves no folder behind; they refuse any run that would write over one of its inputs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .io import LIST_EXTENSIONS, discover, is_image_file
from .ledger import LEDGER_DIR


class OutputError(OSError):
    """An output that cannot be written, or that would overwrite an input (usage error)."""


@dataclass(frozen=True)
class Layout:
    out: Path
    prob_dir: Path | None = None
    overlay_dir: Path | None = None
    metrics: Path | None = None

    @property
    def metrics_path(self) -> Path:
        return self.metrics or self.out / "metrics.csv"

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def ledger_dir(self) -> Path:
        return self.out / LEDGER_DIR

    def folders(self) -> list[Path]:
        """The output folders (never read back as input when inside the input tree)."""
        return [d for d in (self.out, self.prob_dir, self.overlay_dir) if d is not None]

    def outputs(self, rel: Path) -> dict[str, Path]:
        """Every image file this run writes for the input at `rel`, by kind."""
        found = {"mask": self.out / rel.with_suffix(".png")}
        if self.prob_dir is not None:
            found["prob"] = self.prob_dir / rel.with_suffix(".png")
        if self.overlay_dir is not None:
            found["overlay"] = self.overlay_dir / rel.with_suffix(".jpg")
        return found


def check_writable(folder: Path) -> None:
    """Fail if `folder` could not be created or written, without creating it: the nearest
    existing ancestor must be a folder we can write in (checked with a probe file, which is
    honest where permission bits are not, e.g. for root or read-only mounts)."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e


def check_not_inputs(source: str | os.PathLike, layout: Layout) -> None:
    """Refuse a run in which an output path would be one of its input files.

    A folder input: an output folder that IS the input folder is refused outright (the
    masks would land among, and on PNG inputs over, the photographs, and be read as inputs
    next time); output folders inside the input tree are fine (never walked); an output folder
    that contains the input folder is checked input by input, but only below the one subfolder
    through which its outputs can reach back into the input (usually absent: no walk at all).
    A list file: each output path is compared with every listed path (the list is in memory
    anyway). One image: its outputs are compared with it.
    """
    source = Path(source)
    if source.is_dir():
        _check_folder_input(source, layout)
        return
    inputs = _list_inputs(source)
    for path, rel in discover(source):
        for kind, output in layout.outputs(rel).items():
            if _same_file_name(output) in inputs:
                _refuse(kind, output, path)
    metrics = _same_file_name(layout.metrics_path)
    if metrics in inputs:
        _refuse("metrics", layout.metrics_path, layout.metrics_path)


def _check_folder_input(source: Path, layout: Layout) -> None:
    root = source.resolve()
    excluded = frozenset(d.resolve() for d in layout.folders())
    for folder in layout.folders():
        target = folder.resolve()
        if target == root:
            raise OutputError(
                f"{folder} is the input folder: its masks would be written among (and over) the "
                f"photographs; choose another output folder (a subfolder of {source} is fine)")
        if root.is_relative_to(target):
            # OUT/rel lies inside the input only for rel under `prefix`: walk just that part.
            prefix = root.relative_to(target)
            if not (source / prefix).is_dir():
                continue
            for _path, rel in discover(source / prefix, exclude=excluded):
                for kind, output in layout.outputs(prefix / rel).items():
                    if _is_walked_input(output, root, excluded):
                        _refuse(kind, output, output)
    if _is_walked_input(layout.metrics_path, root, excluded):
        _refuse("metrics", layout.metrics_path, layout.metrics_path)


def _is_walked_input(path: Path, root: Path, excluded: frozenset[Path]) -> bool:
    """Would discover(root) yield `path`? (an existing image file, no hidden part, not inside
    an output folder)"""
    path = path.resolve()
    if not path.is_relative_to(root) or not is_image_file(path) or not path.is_file():
        return False
    parts = path.relative_to(root).parts
    if any(p.startswith(".") for p in parts):
        return False
    return not any(parent in excluded for parent in path.parents if parent != root
                   and parent.is_relative_to(root))


def _list_inputs(source: Path) -> frozenset[str]:
    if source.suffix.lower() in LIST_EXTENSIONS:
        return frozenset(_same_file_name(p) for p, _ in discover(source))
    return frozenset({_same_file_name(source)})


def _same_file_name(path: Path) -> str:
    """A comparable spelling of a path (absolute, symlinks resolved)."""
    return os.path.realpath(path)


def _refuse(kind: str, output: Path, input_path: Path) -> None:
    raise OutputError(f"the {kind} output {output} would overwrite the input {input_path}: "
                      f"choose another output folder (inputs are never written)")
