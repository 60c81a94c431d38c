"""Dataset pairing, the grouped split, augmentation, a few real training steps, resume, card."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny import fundus_like  # noqa: E402

from retina_batch.training.augment import AugmentConfig, augment  # noqa: E402
from retina_batch.training.dataset import (  # noqa: E402
    DatasetError,
    find_pairs,
    group_of,
    load_sample,
    resolve_group_rule,
    split_by_group,
)

SIZE = 64


def vessel_pair(seed: int):
    """A fundus-like image and the mask of its dark lines (the 'vessels')."""
    img = fundus_like(SIZE, SIZE, seed)
    mask = ((img[..., 2] > 0) & (img[..., 2] < 120)).astype(np.uint8) * 255
    return img, mask


def make_dataset(root: Path, layout: str = "rbv", n: int = 8) -> Path:
    """n pairs in the Retina Blood Vessel layout (image/N.png + mask/N.png) or DRIVE's."""
    if layout == "rbv":
        images, masks = root / "train" / "image", root / "train" / "mask"
    else:
        images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        img, mask = vessel_pair(i)
        if layout == "rbv":
            cv2.imwrite(str(images / f"{i}.png"), img)
            cv2.imwrite(str(masks / f"{i}.png"), mask)
        else:
            cv2.imwrite(str(images / f"{21 + i}_training.tif"), img)
            cv2.imwrite(str(masks / f"{21 + i}_manual1.png"), mask)
    return root


# --- pairing --------------------------------------------------------------------------

def test_pairs_rbv_layout_in_natural_order(tmp_path):
    pairs = find_pairs(make_dataset(tmp_path, "rbv", n=12))
    assert [p.key for p in pairs] == [str(i) for i in range(12)]
    assert all(p.image.stem == p.mask.stem for p in pairs)


def test_pairs_drive_layout_by_stem_without_markers(tmp_path):
    pairs = find_pairs(make_dataset(tmp_path, "drive", n=3))
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        (f"{k}_training.tif", f"{k}_manual1.png") for k in (21, 22, 23)]


def test_unpaired_files_are_listed_by_name(tmp_path):
    root = make_dataset(tmp_path, "drive", n=3)
    (root / "masks" / "22_manual1.png").unlink()
    cv2.imwrite(str(root / "masks" / "99_manual1.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"22_training\.tif.*99_manual1\.png"):
        find_pairs(root)


def test_folder_without_image_and_mask_dirs_is_explained(tmp_path):
    with pytest.raises(DatasetError, match="expected an image folder"):
        find_pairs(tmp_path)


# --- grouped split --------------------------------------------------------------------

def test_group_rules():
    assert group_of("13", "div:4") == "3"
    assert group_of("Image_01L", "regex:Image_(\\d+)") == "01"
    assert group_of("abc", "stem") == "abc"
    with pytest.raises(DatasetError):
        group_of("abc", "nonsense")


def test_auto_rule_is_div4_for_numbered_files_only(tmp_path):
    assert resolve_group_rule("auto", find_pairs(make_dataset(tmp_path / "a", "rbv"))) == "div:4"
    assert resolve_group_rule("auto", find_pairs(make_dataset(tmp_path / "b", "drive"))) == "stem"


def test_split_keeps_every_copy_of_a_photograph_on_one_side(tmp_path):
    pairs = find_pairs(make_dataset(tmp_path, "rbv", n=80))
    for seed in range(5):
        train, val = split_by_group(pairs, "div:4", 0.2, seed)
        train_groups = {int(p.key) // 4 for p in train}
        val_groups = {int(p.key) // 4 for p in val}
        assert not train_groups & val_groups
        assert len(val_groups) == 4 and len(val) == 16 and len(train) == 64


# --- augmentation ---------------------------------------------------------------------

def test_augmentation_shapes_types_and_label_alignment(tmp_path):
    sample = load_sample(find_pairs(make_dataset(tmp_path, "rbv", n=1))[0], SIZE)
    cfg = AugmentConfig(crop=32, p_blur=0, p_noise=0, p_jpeg=0)
    rng = np.random.default_rng(0)
    views = [augment(sample.image, sample.target, sample.fov, rng, cfg) for _ in range(8)]
    for image, target in views:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert target.shape == (32, 32) and target.dtype == np.float32
        assert 0 <= target.min() and target.max() <= 1
    # That the target moves with the image is checked pixel by pixel in test_augment.py.
    # Views differ from each other (random geometry and photometry).
    assert not np.array_equal(views[0][0], views[1][0])


# --- validation ---------------------------------------------------------------------------

def test_validation_picks_the_threshold_with_the_best_dice():
    """Vessels at p = 0.62 and a few background pixels at 0.57: thresholds up to 0.55 keep
    those false alarms, 0.65 and above lose the vessels, so 0.60 alone gives Dice 1."""
    from retina_batch.preprocess import Letterbox
    from retina_batch.training.dataset import Sample
    from retina_batch.training.loop import validate

    prob = np.full((8, 8), 0.1, np.float32)
    truth = np.zeros((8, 8), bool)
    truth[2, 1:7] = True
    prob[truth] = 0.62
    prob[5, 2:5] = 0.57

    class Fixed:  # the model's interface as validate uses it: eval(), then batch -> maps
        def eval(self):
            return self

        def __call__(self, images):
            return torch.from_numpy(prob)[None].expand(len(images), 8, 8)

    identity = Letterbox((0, 0, 8, 8), (0, 0, 8, 8), 8, (8, 8))
    sample = Sample("0", np.zeros((8, 8, 3), np.uint8), truth.astype(np.float32),
                    np.ones((8, 8), np.uint8), identity, truth)
    means, best, _ = validate(Fixed(), [sample], torch.device("cpu"))
    assert best == pytest.approx(0.6)
    assert means[best]["dice"] == 1.0
    assert means[0.5]["dice"] == pytest.approx(12 / 15)  # 6 vessels found, 3 false alarms


# --- training -------------------------------------------------------------------------

def tiny_options(**extra):
    return {**dict(width=4, depth=3, size=SIZE, crop=32, batch_size=4, steps_per_epoch=4,
                   epochs=2, val_fraction=0.25, threads=1), **extra}


def tiny_cli_options(**extra) -> list[str]:
    """tiny_options as `retina-batch train` flags."""
    flags = {"steps_per_epoch": "--steps"}
    return [arg for key, value in tiny_options(**extra).items()
            for arg in (flags.get(key, f"--{key.replace('_', '-')}"), str(value))]


def test_a_few_steps_reduce_the_loss():
    from retina_batch.model import AttentionUNet, UNetConfig, standardise
    from retina_batch.training.loss import bce_dice_loss

    torch.manual_seed(0)
    images = np.stack([vessel_pair(i)[0][..., ::-1] for i in range(4)]).copy()
    targets = np.stack([vessel_pair(i)[1] > 0 for i in range(4)]).astype(np.float32)
    x = standardise(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    y = torch.from_numpy(targets)[:, None]
    net = AttentionUNet(UNetConfig(width=4, depth=3))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = bce_dice_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_train_writes_checkpoint_card_metrics_and_curve(tmp_path):
    from retina_batch.card import sha256
    from retina_batch.training.loop import train

    data = make_dataset(tmp_path / "data", "rbv", n=8)
    card = train(data, tmp_path / "run", log=lambda *a: None, **tiny_options())
    run = tmp_path / "run"
    for name in ("model.pt", "model.json", "last.pt", "metrics.csv", "curves.png"):
        assert (run / name).stat().st_size > 0
    assert card["sha256"] == sha256(run / "model.pt")
    assert card["model"] == {"width": 4, "depth": 3, "in_channels": 3, "norm": "image"}
    assert card["working_size"] == SIZE
    # The card is the best epoch's: its threshold and Dice are that epoch's validation row.
    with open(run / "metrics.csv", newline="") as f:
        best = next(r for r in csv.DictReader(f) if int(r["epoch"]) == card["training"]["epoch"])
    assert card["threshold"] == float(best["best_threshold"])
    assert card["validation"]["dice"] == pytest.approx(float(best["val_dice@best"]), abs=1e-5)
    assert set(card["training"]["images_val"]).isdisjoint(card["training"]["images_train"])
    assert card["training"]["group_rule"] == "div:4"
    assert {"dice", "auc", "sensitivity"} <= set(card["validation"])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 3


def test_training_on_every_photograph_keeps_the_last_epoch(tmp_path):
    """--val-fraction 0 (how the shipped model is made once its recipe is fixed): nothing held
    out, so the weights are the last epoch's, the threshold the default, the card says so in
    valid JSON (no NaN scores) and the curves have no empty validation panel."""
    from retina_batch.training.loop import train

    data = make_dataset(tmp_path / "data", "rbv", n=8)
    run = tmp_path / "run"
    card = train(data, run, log=lambda *a: None, **tiny_options(val_fraction=0))
    assert card["training"]["images_val"] == [] and len(card["training"]["images_train"]) == 8
    assert card["training"]["epoch"] == 2 and card["threshold"] == 0.5
    assert "dice" not in card["validation"] and "none held out" in card["validation"]["where"]
    json.loads((run / "model.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in the card"))
    last = torch.load(run / "last.pt", weights_only=False)["state_dict"]
    shipped = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(last[k].cpu(), shipped[k]) for k in last)
    assert cv2.imread(str(run / "curves.png")).shape[1] < 600  # the loss panel alone
    from click.testing import CliRunner

    from retina_batch.cli import main

    result = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "cli"),
                                       *tiny_cli_options(val_fraction=0)])
    assert result.exit_code == 0, result.output
    assert "no validation held out" in result.output


def test_resume_after_interruption_reaches_the_same_weights(tmp_path, monkeypatch):
    from retina_batch.training import loop

    data = make_dataset(tmp_path / "data", "rbv", n=8)
    quiet = dict(log=lambda *a: None, **tiny_options(epochs=3))
    loop.train(data, tmp_path / "straight", **quiet)

    real_epoch = loop.Trainer._train_epoch

    def interrupted(self, *args):
        if self.epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third epoch
        return real_epoch(self, *args)

    monkeypatch.setattr(loop.Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(data, tmp_path / "resumed", **quiet)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 2
    monkeypatch.setattr(loop.Trainer, "_train_epoch", real_epoch)
    loop.train(data, tmp_path / "resumed", resume=True, **quiet)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-5), key
    assert len((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()) == 4


def test_train_cli_reports_unpaired_data_in_one_line(tmp_path):
    from click.testing import CliRunner

    from retina_batch.cli import main

    root = make_dataset(tmp_path, "drive", n=2)
    (root / "masks" / "21_manual1.png").unlink()
    result = CliRunner().invoke(main, ["train", str(root), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "21_training.tif" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_train_cli_crop_and_scale_reach_the_augmentation(tmp_path, monkeypatch):
    """--crop is the side of the views the augmentation cuts (it once stayed 256 whatever
    --crop said), --scale its scale range and --illumination its gain-field probability; all
    are what the card's recipe records."""
    from click.testing import CliRunner

    from retina_batch.cli import main
    from retina_batch.training import loop

    seen = []
    original = loop.augment

    def spy(image, target, fov, rng, cfg):
        out = original(image, target, fov, rng, cfg)
        seen.append((out[0].shape, cfg.scale, cfg.illumination))
        return out

    monkeypatch.setattr(loop, "augment", spy)
    data = make_dataset(tmp_path / "data", "rbv", n=8)
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--scale", "0.8,1.25",
            "--illumination", "0.5", *tiny_cli_options(epochs=1)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert seen and all(shape[:2] == (32, 32) and scale == (0.8, 1.25) and light == 0.5
                        for shape, scale, light in seen)
    recipe = json.loads((tmp_path / "run" / "model.json").read_text())["training"]["recipe"]
    assert recipe["augment"]["crop"] == 32 and recipe["augment"]["scale"] == [0.8, 1.25]
    assert recipe["augment"]["illumination"] == 0.5


def test_illumination_field_is_a_smooth_bounded_gain():
    from retina_batch.training.augment import illumination_field

    for seed in range(5):
        field = illumination_field(64, np.random.default_rng(seed), 1.6)
        assert field.shape == (64, 64) and field.dtype == np.float32
        assert field.min() >= 1 / 1.6 - 1e-6 and field.max() <= 1.6 + 1e-6
        assert field.max() / field.min() > 1.1  # it varies across the crop ...
        # ... smoothly: neighbouring pixels differ by a small part of the range
        assert np.abs(np.diff(field, axis=0)).max() < 0.1 * (field.max() - field.min()) + 1e-3


def test_illumination_varies_a_flat_crop_only_when_enabled():
    """A flat grey crop with every global jitter switched off stays flat unless the gain field
    is on; with it on, the crop's brightness varies within the field's bounds."""
    from retina_batch.training.augment import AugmentConfig, photometric

    flat = np.full((64, 64, 3), 120, np.uint8)
    quiet = dict(contrast=(1, 1), brightness=0, gamma=(1, 1), colour=0, p_blur=0, p_noise=0,
                 p_jpeg=0)
    off = photometric(flat, np.random.default_rng(0), AugmentConfig(**quiet))
    assert np.ptp(off) == 0
    on = photometric(flat, np.random.default_rng(0),
                     AugmentConfig(**quiet, illumination=1.0, illumination_gain=1.5))
    assert np.array_equal(on[..., 0], on[..., 1])  # one field for all channels
    assert np.ptp(on) > 10 and on.min() >= 120 / 1.5 - 1 and on.max() <= 120 * 1.5 + 1


@pytest.mark.parametrize("scale", ["2,1", "0,1", "1", "a,b"])
def test_train_cli_refuses_a_bad_scale_range_in_one_line(tmp_path, scale):
    from click.testing import CliRunner

    from retina_batch.cli import main

    result = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "run"),
                                       "--scale", scale])
    assert result.exit_code == 2 and "--scale" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("asked", [None, "bce"])
def test_train_cli_loss_choice_is_the_loss_trained_on(tmp_path, monkeypatch, asked):
    """--loss picks the training loss (default BCE + soft Dice) and the card records it."""
    from click.testing import CliRunner

    from retina_batch.cli import main
    from retina_batch.training import loop

    called = []
    for name, fn in list(loop.LOSSES.items()):
        def spy(logits, target, name=name, fn=fn):
            called.append(name)
            return fn(logits, target)
        monkeypatch.setitem(loop.LOSSES, name, spy)
    data = make_dataset(tmp_path / "data", "rbv", n=8)
    argv = ["train", str(data), "--out", str(tmp_path / "run"), *tiny_cli_options(epochs=1)]
    argv += ["--loss", asked] if asked else []
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    expected = asked or "bce+dice"
    assert called and set(called) == {expected}
    recipe = json.loads((tmp_path / "run" / "model.json").read_text())["training"]["recipe"]
    assert recipe["loss"] == expected


def test_bce_loss_is_plain_cross_entropy_and_the_default_adds_soft_dice():
    import torch

    from retina_batch.training.loss import LOSSES, soft_dice_loss

    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p = torch.sigmoid(logits)
    by_hand = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.isclose(LOSSES["bce"](logits, target), by_hand)
    assert torch.isclose(LOSSES["bce+dice"](logits, target),
                         by_hand + soft_dice_loss(logits, target))
