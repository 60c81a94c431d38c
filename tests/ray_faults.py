"""Fault injection in Ray's worker processes (the `worker_process_setup_hook` of the test Ray
instance, see test_ray.py): kills a write actor once, in the middle of a batch.

Armed by a file in the folder named by RETINA_BATCH_RAY_FAULTS: `kill-write-actor` makes the
first write actor that reaches its second batch write that batch's files and record its rows,
then SIGKILL itself before the rows are committed (the moment that loses the most), once
in the whole Ray instance (`fired` is created with O_EXCL). The real code path runs: only the
ledger's commit is replaced, for that one batch.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FOLDER = os.environ.get("RETINA_BATCH_RAY_FAULTS", "")


def _fire_once() -> bool:
    try:
        os.close(os.open(Path(FOLDER) / "fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def setup() -> None:
    if not FOLDER:
        return
    import retina_batch.ray_runner as ray_runner

    real, calls = ray_runner.WriteActor.__call__, [0]

    def call(self, batch):
        calls[0] += 1
        if calls[0] == 2 and (Path(FOLDER) / "kill-write-actor").exists() and _fire_once():
            self.ledger.commit = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch)

    ray_runner.WriteActor.__call__ = call
