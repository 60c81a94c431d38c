"""`segment` with the pixel work on the backend's device (pixel_work.DevicePixels, the torch
backend's segment_decoded) against the host path: the same masks, rows, ledger records and
failure handling. CI has no GPU, so the device is the CPU here: the same code path the GPU
runs, only the tensors live elsewhere.

The shipped checkpoint runs on a 128 px canvas (`size=128`): real, structured probability
maps (vessel-like masks of a few percent) at 1/16 of the 512 px cost."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import retina_batch  # noqa: E402
from retina_batch.backends import BackendUnavailable  # noqa: E402
from retina_batch.backends.torch import TorchBackend  # noqa: E402
from retina_batch.backends.tta import FlipTTA  # noqa: E402
from retina_batch.io import encode, read_mask  # noqa: E402
from retina_batch.ledger import Ledger  # noqa: E402
from retina_batch.measure import COLUMNS as MEASURE_COLUMNS  # noqa: E402
from retina_batch.metrics import Confusion, scores  # noqa: E402
from retina_batch.pixel_work import DevicePixels, HostPixels, choose  # noqa: E402
from retina_batch.qc import COLUMNS as QC_COLUMNS  # noqa: E402
from retina_batch.records import SCORE_FIELDS, STAGES  # noqa: E402
from retina_batch.synth import synthesize  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "train" / "default" / "model.pt"
CANVAS = 128
# Decided on the host before the pixel work, or copied from it: equal in both flows, exactly.
EXACT = ("path", "output", "status", "message", "width", "height", "decode_scale", "canvas",
         "fov_found", "fov_area", "threshold", "truth")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return scores(Confusion.of(a > 0, b > 0))["dice"]


def write(folder: Path, name: str, image: np.ndarray) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(path.suffix, image))
    return path


def synthetic_inputs(folder: Path, truth: Path | None = None) -> Path:
    """Photographs that shrink onto the canvas (PNG), are decoded at reduced size (JPEG),
    grow onto it (small PNG), plus a file that is not an image; their drawn vessels as
    ground truth in `truth`."""
    for name, (w, h), seed in (("shrinks.png", (400, 350), 1), ("reduced.jpg", (800, 600), 2),
                               ("grows.png", (100, 90), 3), ("sub/second.png", (300, 240), 4)):
        image, vessels = synthesize(w, h, seed)
        write(folder, name, image)
        if truth is not None:
            write(truth, Path(name).with_suffix(".png").as_posix(), vessels.astype(np.uint8) * 255)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def run(src: Path, out: Path, pixel_work: str, batch_size: int = 2, **options) -> dict:
    return retina_batch.segment(src, out, backend="torch", model=CHECKPOINT, device="cpu",
                                size=CANVAS, pixel_work=pixel_work, workers=1,
                                batch_size=batch_size, **options)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a loaded 2-core machine torch's OpenMP threads wait on each
    other for seconds per batch (seen once with two: 70 s for one 128 px batch, load 15)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy(monkeypatch) -> list:
    """Batches that went through TorchBackend.segment_decoded (images per call)."""
    calls: list[int] = []
    original = TorchBackend.segment_decoded

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "segment_decoded", counting)
    return calls


def assert_same_results(src: Path, host_out: Path, device_out: Path, images: int,
                        apart: tuple[str, ...] = ()) -> list:
    """Masks (Dice >= 0.999, worth comparing), rows and ledger records of both folders.
    `apart`: names of files whose rows differ by design (the caller compares them); here only
    their status and message must agree."""
    host, device = (Ledger.reader(out) for out in (host_out, device_out))
    host_rows, device_rows = list(host.rows()), list(device.rows())
    assert [r["path"] for r in host_rows] == [r["path"] for r in device_rows]
    assert len(host_rows) == images
    fractions = []
    for want, got in zip(host_rows, device_rows, strict=True):
        if want["path"].endswith(apart or ("\0",)):
            assert (got["status"], got["message"]) == (want["status"], want["message"])
            continue
        assert set(got) == set(want), want["path"]
        assert {k: got[k] for k in EXACT if k in want} == \
               {k: want[k] for k in EXACT if k in want}, want["path"]
        assert got["run_id"] != want["run_id"] and all(got[s] >= 0 for s in STAGES
                                                       if s in got)
        key = Path(want["path"]).relative_to(src.resolve()).as_posix()
        entries = [db.get(key) for db in (host, device)]
        assert entries[1].status == entries[0].status
        assert entries[1].outputs == entries[0].outputs
        assert (entries[1].model_sha256, entries[1].threshold) == \
               (entries[0].model_sha256, entries[0].threshold)
        if want["status"] != "ok":
            continue
        masks = [read_mask(out / want["output"]) for out in (host_out, device_out)]
        assert masks[1].shape == masks[0].shape == (want["height"], want["width"])
        assert dice(masks[1], masks[0]) >= 0.999, want["path"]
        fractions.append(want["vessel_fraction"])
        # The rest is computed from the mask: as close as the masks are.
        assert got["vessel_fraction"] == pytest.approx(want["vessel_fraction"], rel=2e-3)
        for column in (*MEASURE_COLUMNS, *SCORE_FIELDS):
            if isinstance(want.get(column), float):
                assert got[column] == pytest.approx(want[column], rel=2e-2, abs=1e-3), column
        assert got["qc"] == want["qc"]
    for want, got in zip(host_rows, device_rows, strict=True):
        if want["path"].endswith(apart or ("\0",)):
            continue
        # the quality statistics, made on the device (qc_gpu): the same up to float rounding
        # (the last digit the columns keep)
        for column in QC_COLUMNS[:3]:
            if want.get(column) is None:
                assert got.get(column) is None, (column, want["path"])
            else:
                assert got[column] == pytest.approx(want[column], rel=1e-3), (column, want)
    return fractions


def test_device_pixel_work_gives_the_host_paths_masks_rows_and_ledger(tmp_path, spy):
    truth, fov = tmp_path / "truth", tmp_path / "fov"
    src = synthetic_inputs(tmp_path / "in", truth)
    # one FOV from a file (the device gets the full mask, not a thumbnail): a smaller circle
    write(fov, "grows.png", cv2.circle(np.zeros((90, 100), np.uint8), (50, 45), 35, 255, -1))
    summaries = {}
    for flow in ("host", "device"):
        spy.clear()
        folder = tmp_path / flow  # the same layout under each: equal relative outputs
        summaries[flow] = run(src, folder / "masks", flow, prob_dir=folder / "prob",
                              overlay_dir=folder / "overlay", truth_dir=truth, fov_dir=fov)
        assert summaries[flow]["settings"]["pixel_work"] == flow
        # The device flow really ran segment_decoded, every good image through it, in batches
        assert sum(spy) == (4 if flow == "device" else 0) and max(spy, default=2) == 2
    for summary in summaries.values():
        assert summary["counts"]["ok"] == 4 and summary["counts"]["error"] == 1
    fractions = assert_same_results(src, tmp_path / "host" / "masks",
                                    tmp_path / "device" / "masks", 5)
    # masks worth comparing (the shipped model finds 1-15 % vessels on these synthetic images)
    assert all(0.01 < f < 0.6 for f in fractions), fractions
    for name in ("shrinks", "reduced", "grows", "sub/second"):
        probs = [cv2.imread(str(tmp_path / flow / "prob" / f"{name}.png"),
                            cv2.IMREAD_GRAYSCALE) for flow in ("host", "device")]
        difference = np.abs(probs[0].astype(int) - probs[1].astype(int))
        assert probs[0].max() > 100 and difference.max() <= 3, name
        overlays = [cv2.imread(str(tmp_path / flow / "overlay" / f"{name}.jpg"))
                    for flow in ("host", "device")]
        assert overlays[0].shape == overlays[1].shape
    rows = {r["path"]: r for r in Ledger.reader(tmp_path / "device" / "masks").rows()}
    grows = next(r for r in rows.values() if r["path"].endswith("grows.png"))
    assert grows["fov_area"] == np.count_nonzero(cv2.imread(str(fov / "grows.png"), 0))
    scored = [r for r in rows.values() if r.get("dice") not in (None, "")]
    assert len(scored) == 4 and all(r["dice"] > 0.2 for r in scored)


def test_device_pixel_work_on_real_photographs(tmp_path, shared_data):
    """A DRIVE TIFF, a 512 px PNG and an LES-AV photograph (copied: outputs never go near
    ../shared): the same masks and rows as the host path."""
    src = tmp_path / "in"
    src.mkdir()
    for pattern in ("drive-training/images/*.tif", "retina-blood-vessel/train/image/*.png",
                    "les-av/images/*.png"):
        path = sorted(shared_data.glob(pattern))[0]
        (src / f"{pattern.split('/')[0]}{path.suffix}").write_bytes(path.read_bytes())
    for flow in ("host", "device"):
        assert run(src, tmp_path / flow, flow)["counts"]["ok"] == 3
    fractions = assert_same_results(src, tmp_path / "host", tmp_path / "device", 3)
    assert all(0.02 < f < 0.6 for f in fractions), fractions


@pytest.mark.parametrize("where", ["worker", "submit"])
def test_a_failing_device_batch_fails_alone_and_is_redone_on_resume(tmp_path, monkeypatch,
                                                                     where):
    """A backend failure in the device flow (on the worker thread, as a CUDA error would be,
    or refused at submit) is one error row per image of that batch; the other batches are
    written; a re-run (here on the host path) redoes just the failed images."""
    src = tmp_path / "in"
    for name, size in (("a.png", (120, 100)), ("b.png", (130, 110)), ("c.png", (140, 120))):
        write(src, name, synthesize(*size, len(name))[0])
    target = "_segment_decoded" if where == "worker" else "segment_decoded"
    original = getattr(TorchBackend, target)

    def failing(self, images, *args, **kwargs):
        if any(image.shape[0] == 100 for image in images):  # the batch holding a.png
            raise RuntimeError("CUDA error: out of memory (injected)")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, target, failing)
    summary = run(src, tmp_path / "out", "device", batch_size=1)
    assert summary["counts"] == {**summary["counts"], "ok": 2, "error": 1}
    rows = {Path(r["path"]).name: r for r in Ledger.reader(tmp_path / "out").rows()}
    assert rows["a.png"]["status"] == "error"
    assert rows["a.png"]["message"].startswith("infer: CUDA error: out of memory")
    assert not (tmp_path / "out" / "a.png").exists()
    assert all(rows[n]["status"] == "ok" and (tmp_path / "out" / n).exists()
               for n in ("b.png", "c.png"))
    monkeypatch.setattr(TorchBackend, target, original)
    # resumed with the pixel work on the host: the folder does not depend on where it ran
    again = run(src, tmp_path / "out", "host", batch_size=1)
    assert again["counts"]["ok"] == 1 and again["counts"]["skipped"] == 2
    assert read_mask(tmp_path / "out" / "a.png").shape == (100, 120)


class _Opened:
    """Stands for an opened backend in the choice of pixel work (no model needed)."""

    name = "torch"

    def __init__(self, torch_device=None):
        self.torch_device = torch_device


class _OpenedTorch(_Opened):
    segment_decoded = TorchBackend.segment_decoded


def test_which_pixel_work_runs():
    def chosen(backend, setting):
        return type(choose(backend, setting, 0.5, lambda item: False))

    gpu, cpu = _OpenedTorch("cuda"), _OpenedTorch("cpu")
    assert chosen(gpu, "auto") is DevicePixels and chosen(gpu, "host") is HostPixels
    assert chosen(cpu, "auto") is HostPixels and chosen(cpu, "device") is DevicePixels
    assert chosen(_Opened("cuda"), "auto") is HostPixels  # cannot take decoded photographs
    with pytest.raises(BackendUnavailable, match="--pixel-work device needs --backend torch"):
        choose(_Opened(), "device", 0.5, lambda item: False)
    # TTA forwards attribute look-ups to the backend it wraps, not its work
    assert chosen(FlipTTA(gpu), "auto") is HostPixels
    with pytest.raises(BackendUnavailable, match="--tta"):
        choose(FlipTTA(gpu), "device", 0.5, lambda item: False)


def test_pixel_work_device_with_another_backend_is_a_usage_error(tiny_onnx, tmp_path):
    from click.testing import CliRunner

    from retina_batch.cli import main

    src = write(tmp_path / "in", "a.png", synthesize(120, 100, 1)[0]).parent
    result = CliRunner().invoke(main, ["segment", str(src), "--out", str(tmp_path / "out"),
                                       "--model", str(tiny_onnx), "--pixel-work", "device"])
    assert result.exit_code == 2
    assert "--pixel-work device needs --backend torch" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "a.png").exists()


def test_bench_pixel_work_device_with_no_model_is_one_usage_line(tmp_path):
    """The refusal happens in bench's worker process: it still ends as `segment`'s line."""
    from click.testing import CliRunner

    from retina_batch.cli import main

    result = CliRunner().invoke(main, ["bench", "--synthetic", "2", "--size", "96x96",
                                       "--backend", "onnxruntime", "--pixel-work", "device",
                                       "--repeat", "1", "--no-naive", "-q"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --pixel-work device needs --backend torch")
    assert "BackendUnavailable" not in result.output


def test_jpegs_go_to_the_device_undecoded_and_a_bad_one_fails_alone(tmp_path, monkeypatch):
    """Where the backend decodes JPEGs on its device (nvJPEG on a GPU), the pipeline hands
    them over undecoded: full-size baseline and progressive JPEGs go as io.EncodedJpeg (on
    the CPU the backend decodes them with OpenCV, so the results equal the host decode's
    exactly); a JPEG decoded at reduced size and a PNG are decoded on the host as before; a
    truncated JPEG fails as a decode error on its own while the rest of its batch is written."""
    from retina_batch.io import EncodedJpeg

    src = tmp_path / "in"
    for name, (w, h), seed, flags in (
            ("a.jpg", (160, 120), 1, []), ("b.jpg", (150, 140), 2, []),
            ("progressive.jpg", (170, 130), 3, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
            ("reduced.jpg", (800, 600), 4, []), ("c.png", (140, 120), 5, [])):
        image = synthesize(w, h, seed)[0]
        src.mkdir(exist_ok=True)
        (src / name).write_bytes(encode(Path(name).suffix, image, flags) if flags
                                 else encode(Path(name).suffix, image))
    whole = (src / "a.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    handed: list[str] = []
    original = TorchBackend._decode_jpegs

    def spying(self, images):
        handed.extend(f"{i.size}" for i in images if isinstance(i, EncodedJpeg))
        return original(self, images)

    monkeypatch.setattr(TorchBackend, "_decode_jpegs", spying)
    summaries = {"host-decoded": run(src, tmp_path / "host-decoded", "device", batch_size=3)}
    assert handed == []  # a CPU torch backend does not say it decodes JPEGs: host decode
    monkeypatch.setattr(TorchBackend, "decodes_jpeg", True)
    summaries["asked-host"] = run(src, tmp_path / "asked-host", "device", batch_size=3,
                                  jpeg_decode="host")  # --jpeg-decode host: none handed over
    assert handed == [] and not summaries["asked-host"]["settings"]["jpeg_on_device"]
    summaries["device-decoded"] = run(src, tmp_path / "device-decoded", "device", batch_size=3)
    assert summaries["device-decoded"]["settings"]["jpeg_on_device"]
    assert sorted(handed) == ["(150, 140)", "(160, 120)", "(160, 120)", "(170, 130)"]
    for summary in summaries.values():
        assert summary["counts"]["ok"] == 5 and summary["counts"]["error"] == 1
    rows = {r["path"]: r for r in Ledger.reader(tmp_path / "device-decoded").rows()}
    bad = next(r for p, r in rows.items() if p.endswith("truncated.jpg"))
    assert bad["status"] == "error" and bad["message"].startswith("decode: not a readable")
    assert rows[str((src / "reduced.jpg").resolve())]["decode_scale"] > 1
    assert_same_results(src, tmp_path / "host-decoded", tmp_path / "device-decoded", 6,
                        apart=("truncated.jpg",))
    for name in ("a", "b", "progressive"):
        masks = [cv2.imread(str(tmp_path / flow / f"{name}.png"), 0)
                 for flow in ("host-decoded", "device-decoded")]
        assert np.array_equal(*masks) and masks[0].any(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decodes_as_the_host_does_and_gives_the_same_masks(tmp_path, monkeypatch):
    """On a GPU: JPEGs decoded by nvJPEG (torchvision) against OpenCV's libjpeg, pixel by
    pixel and through the whole GPU-resident flow (masks Dice >= 0.999, the flows' rule)."""
    pytest.importorskip("torchvision")
    from retina_batch.backends.torch import decode_jpegs
    from retina_batch.io import decode

    src = tmp_path / "in"
    for i, (w, h) in enumerate(((565, 584), (1620, 1444), (999, 960), (512, 512))):
        write(src, f"{i}.jpg", synthesize(w, h, i)[0])
    files = sorted(src.iterdir())
    on_gpu = decode_jpegs([np.fromfile(f, np.uint8) for f in files])
    assert on_gpu is not None
    for f, image in zip(files, on_gpu, strict=True):
        host = cv2.cvtColor(decode(f)[0], cv2.COLOR_BGR2RGB).astype(int)
        difference = np.abs(image.cpu().numpy().astype(int) - host)
        assert image.shape == host.shape and difference.mean() < 1.0, f.name
    masks = {}
    for flow, decodes in (("host-decoded", False), ("nvjpeg", True)):
        monkeypatch.setattr(TorchBackend, "decodes_jpeg", decodes)
        summary = retina_batch.segment(src, tmp_path / flow, backend="torch", model=CHECKPOINT,
                                       device="cuda", pixel_work="device", batch_size=2)
        assert summary["counts"]["ok"] == 4
        masks[flow] = [read_mask(tmp_path / flow / f"{f.stem}.png") for f in files]
    for name, a, b in zip(files, masks["host-decoded"], masks["nvjpeg"], strict=True):
        assert dice(a, b) >= 0.999, name
