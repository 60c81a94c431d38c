"""Which working canvas (and whether flip TTA) scores best per camera: the evidence behind
`segment --size auto` and `--tta`.

For each data folder (images + vessel masks, paired like `train` pairs them) and each canvas
side, every photograph goes through the same geometry as `segment` (FOV crop, letterbox onto the
canvas, back to the original grid, zero outside the FOV) with a PyTorch checkpoint, and is
scored whole-image at the card's threshold. Prints one table row per (folder, canvas, tta).

    python benchmarks/canvas_sizes.py train/default/model.pt ../shared/data/les-av \
        --canvas 512,768,1024 [--tta] [--images 0:22] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from retina_batch.io import read_image, read_mask
from retina_batch.metrics import evaluate_image, mean_scores
from retina_batch.model import AttentionUNet, InferenceModel, UNetConfig
from retina_batch.preprocess import prepare, to_rgb8, unletterbox
from retina_batch.training.dataset import find_pairs


def load(checkpoint: Path) -> tuple[InferenceModel, float]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    net = AttentionUNet(UNetConfig(**state["model_config"]))
    net.load_state_dict(state["state_dict"])
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    return InferenceModel(net).eval(), float(card["threshold"])


@torch.no_grad()
def predict(model, canvas_img: np.ndarray, tta: bool) -> np.ndarray:
    x = torch.from_numpy(canvas_img[None])
    if not tta:
        return model(x)[0].numpy()
    views = [model(torch.flip(x, dims))[0] if dims else model(x)[0]
             for dims in ((), (2,), (1,), (1, 2))]
    back = [torch.flip(v, [d - 1 for d in dims]) if dims else v
            for v, dims in zip(views, ((), (2,), (1,), (1, 2)), strict=True)]
    return torch.stack(back).mean(0).numpy()


def score_folder(model, threshold, folder, canvas, tta, limit):
    rows, seconds = [], []
    fov_dir = Path(folder) / "fov"
    for pair in find_pairs(folder)[limit]:
        rgb = to_rgb8(read_image(pair.image))
        truth = read_mask(pair.mask)
        fov_file = next(iter(sorted(fov_dir.glob(f"{pair.key}_mask.*"))), None) \
            if fov_dir.is_dir() else None
        start = time.perf_counter()
        image, lb, fov = prepare(rgb, canvas)
        prob = unletterbox(predict(model, image, tta), lb)
        seconds.append(time.perf_counter() - start)
        region = read_mask(fov_file) if fov_file else fov.mask.astype(bool)
        rows.append(evaluate_image(prob * region, truth, threshold))
    return mean_scores(rows), float(np.median(seconds)), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--canvas", default="512,768,1024")
    ap.add_argument("--tta", action="store_true", help="also score with flip TTA")
    ap.add_argument("--images", default=":", help="python slice of each folder's pairs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, threshold = load(args.checkpoint)
    limit = slice(*[int(p) if p else None for p in args.images.split(":")])
    results = []
    print(f"{'folder':24} canvas tta   n   dice    auc    sens   spec  s/img")
    for folder in args.folders:
        for canvas in [int(c) for c in args.canvas.split(",")]:
            for tta in ((False, True) if args.tta else (False,)):
                s, sec, n = score_folder(model, threshold, folder, canvas, tta, limit)
                results.append({"folder": folder, "canvas": canvas, "tta": tta, "images": n,
                                "seconds_per_image": round(sec, 3),
                                **{k: round(v, 5) for k, v in s.items()}})
                print(f"{Path(folder).name:24} {canvas:6} {str(tta):5} {n:3} {s['dice']:.4f} "
                      f"{s['auc']:.4f} {s['sensitivity']:.4f} {s['specificity']:.4f} {sec:.2f}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint),
                                         "threshold": threshold, "results": results}, indent=1))


if __name__ == "__main__":
    main()
