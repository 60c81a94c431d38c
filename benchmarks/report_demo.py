"""Inputs for a 100-image demonstration of OUT/report.html, bad files among them.

    python benchmarks/report_demo.py /tmp/report-demo
    retina-batch segment /tmp/report-demo/images --out /tmp/report-demo/masks \
        --truth /tmp/report-demo/truth
    # then open /tmp/report-demo/masks/report.html

93 synthetic photographs (retina_batch.synth, 1024 x 768, with their drawn vessels as truth),
3 of them degraded (dark, blurred, low contrast: the quality flags should catch them), one
picture that is not a fundus photograph (no field of view), and 3 files that are not images
(empty, truncated JPEG, text named .png): 100 files, 3 of which fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from retina_batch.synth import write_synthetic


def degrade(path: Path, kind: str) -> None:
    image = cv2.imread(str(path))
    if kind == "dark":
        image = (image * 0.12).astype(np.uint8)
    elif kind == "blurred":
        image = cv2.GaussianBlur(image, (0, 0), 5)
    else:  # low contrast: 80% of the way to the mean colour
        mean = image.reshape(-1, 3).mean(axis=0)
        image = (mean + 0.2 * (image - mean)).astype(np.uint8)
    cv2.imwrite(str(path.with_name(f"{path.stem}_{kind}.jpg")), image)
    path.unlink()


def main(out: Path) -> None:
    images = out / "images"
    paths = write_synthetic(images, 93, (1024, 768), "jpg", seed=7, masks=out / "truth")
    for path, kind in zip(paths[10:40:10], ("dark", "blurred", "low_contrast"), strict=True):
        degrade(path, kind)
    rng = np.random.default_rng(0)  # a picture with no dark rim: noise over a gradient
    ramp = np.linspace(60, 200, 1024, dtype=np.float32)[None, :, None]
    cv2.imwrite(str(images / "not_a_fundus.jpg"),
                np.clip(ramp + rng.normal(0, 20, (768, 1024, 3)), 0, 255).astype(np.uint8))
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(paths[0].read_bytes()[:2000])
    (images / "notes.png").write_text("not an image\n")
    print(f"{len(list(images.iterdir()))} files in {images}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
