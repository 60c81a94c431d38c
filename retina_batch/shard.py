"""`segment --shard I/N`: one of N processes that share the inputs of one source and one output
folder, for batch schedulers (Slurm arrays, PBS, a shell loop), possibly on N machines that
share a file system.

Which shard an input belongs to is a pure function of its path relative to the input root, so
every process computes the same partition without talking to the others, and adding files
later never moves an old input to another shard (no reshuffle, so a re-run after new photographs
arrive skips the old ones in the same shard as before). The hash is sha1, not Python's `hash()`
(salted per process: two shards would disagree).

The hash is taken of the relative path WITHOUT its extension, i.e. of the mask name: two inputs
that would write the same mask (a.jpg and a.png) always fall in the same shard, so the rule
"the input found first keeps the name, the other is an error row" stays a decision of one
process instead of a race between two.

Each shard is its own ledger writer (OUT/.retina-batch/ledger-shard-I-of-N.sqlite: no file is
ever written by two processes, which SQLite cannot make safe on a network file system) and
writes its run summary beside it (summary-shard-I-of-N.json). A shard writes no metrics.csv and
no summary.json: those describe the whole folder, and a shard cannot know whether the others
are finished; `retina-batch merge OUT` writes them once all shards are done (see merge.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .ledger import LEDGER_DIR

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
WRITER = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) of the input whose path relative to the input root is `key`."""
    name = PurePosixPath(key).with_suffix("").as_posix()
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """`I/N` with 0 <= I < N; ValueError with a one-line message otherwise."""
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(f"--shard {spec}: expected I/N, two whole numbers such as 0/4 "
                             f"(this process takes shard I of N, counting from 0)")
        index, count = int(match[1]), int(match[2])
        if count < 1:
            raise ValueError(f"--shard {spec}: N, the number of shards, must be at least 1")
        if index >= count:
            raise ValueError(f"--shard {spec}: I must be 0 to {count - 1}: the {count} shards "
                             f"are 0/{count} to {count - 1}/{count}")
        return cls(index, count)

    @property
    def writer(self) -> str:
        """This shard's ledger writer name (and so its ledger file's)."""
        return f"shard-{self.index}-of-{self.count}"

    def contains(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index

    def summary_path(self, out: Path) -> Path:
        return summary_path(out, self.writer)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def summary_path(out: Path, writer: str) -> Path:
    """Where a writer that does not own the folder's summary.json writes its run summary."""
    return Path(out) / LEDGER_DIR / f"summary-{writer}.json"
