"""The run's memory and collector settings: what they change, measured in a fresh process
(allocator settings are process-wide and cannot be undone), and that a run leaves the garbage
collector as it found it."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from retina_batch import segment

# Page faults per round of eight 1 MB arrays alive at once, then freed (as the quality flags'
# float planes are), after a warm-up: the kernel's cost of handing out fresh pages, which the
# allocator settings exist to avoid. (One array at a time would not show it: glibc raises its
# thresholds to the largest block freed; several freed together exceed its trim threshold.)
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "keep":
        from retina_batch.allocator import keep_freed_memory
        assert keep_freed_memory()
    def round_of_arrays():
        arrays = [np.ones(1 << 20, np.uint8) for _ in range(8)]
        del arrays
    for _ in range(3):
        round_of_arrays()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        round_of_arrays()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
""")


def _faults_per_array(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                          text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_freed_image_memory_is_reused_without_page_faults():
    default, kept = _faults_per_array("default"), _faults_per_array("keep")
    assert default > 1000  # 2048 pages of 4 kB: most faulted in again every round
    assert kept < 0.05 * default


@pytest.fixture
def photographs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = np.zeros((64, 80, 3), np.uint8)
        cv2.circle(image, (40, 32), 28, (40, 90, 160), -1)
        image[rng.random(image.shape[:2]) < 0.1] = 200
        cv2.imwrite(str(folder / f"{i}.png"), image)
    return folder


def test_a_run_freezes_the_collector_while_it_runs_and_restores_it(photographs, tmp_path):
    seen = []
    summary = segment(photographs, tmp_path / "out", backend="none",
                      on_row=lambda row: seen.append(gc.get_freeze_count()))
    assert summary["counts"]["ok"] == 3
    assert len(seen) == 3 and min(seen) > 0  # old objects frozen while rows are made
    assert gc.get_freeze_count() == 0


def test_a_callers_own_frozen_objects_stay_frozen(photographs, tmp_path):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        segment(photographs, tmp_path / "out", backend="none")
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
