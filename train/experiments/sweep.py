"""Run several training variants in parallel and print one RESULT line each.

Used on a lent H100 to choose the default recipe (results in train/default/README.md):

    python train/experiments/sweep.py DATA_DIR OUT_DIR w8:0:28:8 w16:0:28:16 w32:0:28:32 \
        e56_s1:1:56:16 light_s1:1:28:16:'{"p_blur": 0, "p_noise": 0, "p_jpeg": 0}'

Each variant is NAME:SEED:EPOCHS:WIDTH[:AUGMENT_JSON]; everything else is the default recipe.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def run(data: str, out: str, spec: str) -> str:
    from retina_batch.training.augment import AugmentConfig
    from retina_batch.training.loop import train

    name, seed, epochs, width, *aug = spec.split(":", 4)
    extra = json.loads(aug[0]) if aug else {}
    extra = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
    start = time.time()
    card = train(data, Path(out) / name, seed=int(seed), epochs=int(epochs), width=int(width),
                 threads=2, augment=AugmentConfig(**extra), log=lambda *a: None)
    val = card["validation"]
    return (f"RESULT {name} seed={seed} epochs={epochs} width={width} augment={extra} "
            f"val_dice={val['dice']:.4f} val_auc={val['auc']:.4f} "
            f"threshold={card['threshold']} best_epoch={card['training']['epoch']} "
            f"seconds={time.time() - start:.0f}")


if __name__ == "__main__":
    data, out, *specs = sys.argv[1:]
    with ProcessPoolExecutor(len(specs)) as pool:
        for line in pool.map(run, [data] * len(specs), [out] * len(specs), specs):
            print(line, flush=True)
