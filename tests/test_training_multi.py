"""Training on several data folders: per-folder pairing, grouping, validation and licence."""

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_training import make_dataset, tiny_options, vessel_pair  # noqa: E402

from retina_batch.training.dataset import Sample, open_datasets  # noqa: E402
from retina_batch.training.loop import _draw  # noqa: E402


def make_lesav_like(root: Path, n: int = 4) -> Path:
    """LES-AV's layout: images/N.png + vessels/N.png, a licence file beside them."""
    (root / "images").mkdir(parents=True)
    (root / "vessels").mkdir()
    for i in range(n):
        img, mask = vessel_pair(100 + i)
        cv2.imwrite(str(root / "images" / f"{i + 1}.png"), img)
        cv2.imwrite(str(root / "vessels" / f"{i + 1}.png"), mask)
    (root / "LICENSE-README.txt").write_text("Any commercial usage is forbidden.\n")
    return root


def test_each_folder_keeps_its_own_group_rule_names_and_licence(tmp_path):
    rbv = make_dataset(tmp_path / "rbv", "rbv", n=8)
    lesav = make_lesav_like(tmp_path / "les-av")
    a, b = open_datasets([rbv, lesav])
    # rbv is named after the folder above train/; its files 0..7 are 2 photographs x 4 copies.
    assert (a.name, a.group_rule) == ("rbv", "div:4")
    assert (b.name, b.group_rule) == ("les-av", "stem")
    assert [p.mask.parent.name for p in b.pairs] == ["vessels"] * 4
    assert "commercial usage is forbidden" in b.licence
    assert "no licence file" in a.licence


def test_same_folder_names_stay_apart(tmp_path):
    a = make_lesav_like(tmp_path / "x" / "data")
    b = make_lesav_like(tmp_path / "y" / "data")
    assert [d.name for d in open_datasets([a, b])] == ["data", "data+"]


def test_balanced_draw_gives_each_folder_half_the_crops():
    samples = [Sample(f"a/{i}", *[None] * 5, dataset="a") for i in range(90)] + \
              [Sample(f"b/{i}", *[None] * 5, dataset="b") for i in range(10)]
    rng = np.random.default_rng(0)
    drawn = [samples[i].dataset for i in _draw(samples, rng, 4000, "datasets")]
    assert abs(drawn.count("b") / 4000 - 0.5) < 0.03
    drawn = [samples[i].dataset for i in _draw(samples, rng, 4000, "images")]
    assert abs(drawn.count("b") / 4000 - 0.1) < 0.03


def test_train_on_two_folders_reports_validation_per_folder(tmp_path):
    from retina_batch.training.loop import train

    rbv = make_dataset(tmp_path / "rbv", "rbv", n=8)
    lesav = make_lesav_like(tmp_path / "les-av")
    card = train([rbv, lesav], tmp_path / "run", log=lambda *a: None,
                 **tiny_options(val_fraction=0.5))
    names = [d["name"] for d in card["training"]["datasets"]]
    assert names == ["rbv", "les-av"]
    per = card["validation"]["per_dataset"]
    assert set(per) == {"rbv", "les-av"}
    # The overall figure is the mean of the folders' means (each camera counts equally).
    assert card["validation"]["dice"] == pytest.approx(
        (per["rbv"]["dice"] + per["les-av"]["dice"]) / 2, abs=2e-5)
    val = card["training"]["images_val"]
    assert {k.split("/")[0] for k in val} == {"rbv", "les-av"}
    assert set(val).isdisjoint(card["training"]["images_train"])
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_dice@best[rbv]", "val_dice@best[les-av]"} <= set(header)
    assert "commercial" in card["training"]["datasets"][1]["licence"]
