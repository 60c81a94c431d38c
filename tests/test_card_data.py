"""Which photographs a model card names (card.card_pairs): export's parity images, int8
calibration and `bench --validation` read them from both card forms: one data folder with bare
keys, and multi-dataset training (`datasets[*]` with `path`, keys `dataset/stem`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retina_batch.bench import validation_list
from retina_batch.card import card_pairs, card_photographs, write_json_atomic
from retina_batch.export import _card_images, parity_images


def _dataset(root, image_dir, mask_dir, stems):
    for folder in (root / image_dir, root / mask_dir):
        folder.mkdir(parents=True)
    for stem in stems:
        cv2.imwrite(str(root / image_dir / f"{stem}.png"), np.full((40, 50, 3), 90, np.uint8))
        cv2.imwrite(str(root / mask_dir / f"{stem}.png"), np.zeros((40, 50), np.uint8))
    return root


@pytest.fixture
def two_sets(tmp_path):
    """Both sets have a `1.png`: only the dataset prefix tells them apart."""
    return (_dataset(tmp_path / "rbv" / "train", "image", "mask", range(6)),
            _dataset(tmp_path / "les-av", "images", "vessels", (1, 37, 119)))


def test_single_folder_card(two_sets):
    rbv, _ = two_sets
    card = {"training": {"data": str(rbv), "images_train": ["0", "2", "3", "5"],
                         "images_val": ["1", "4"]}}
    assert card_photographs(card, "val") == [rbv / "image" / "1.png", rbv / "image" / "4.png"]
    assert [key for _, _, key in card_pairs(card, "train")] == ["0", "2", "3", "5"]
    assert _card_images(card) == card_photographs(card, "val")


def test_multi_dataset_card(two_sets):
    rbv, lesav = two_sets
    card = {"training": {
        "data": [str(rbv), str(lesav)],
        "datasets": [{"name": "retina-blood-vessel", "path": str(rbv), "images_train": 4,
                      "images_val": ["retina-blood-vessel/1", "retina-blood-vessel/4"]},
                     {"name": "les-av", "path": str(lesav), "images_train": 2,
                      "images_val": ["les-av/37"]}],
        "images_train": ["retina-blood-vessel/0", "retina-blood-vessel/2", "les-av/1",
                         "les-av/119"],
        "images_val": ["retina-blood-vessel/1", "retina-blood-vessel/4", "les-av/37"]}}
    assert card_pairs(card, "val") == [
        (rbv / "image" / "1.png", rbv / "mask" / "1.png", "retina-blood-vessel/1"),
        (rbv / "image" / "4.png", rbv / "mask" / "4.png", "retina-blood-vessel/4"),
        (lesav / "images" / "37.png", lesav / "vessels" / "37.png", "les-av/37")]
    # les-av/1 is training data, retina-blood-vessel/1 validation: the prefix decides
    assert card_photographs(card, "train") == [rbv / "image" / "0.png", rbv / "image" / "2.png",
                                               lesav / "images" / "1.png",
                                               lesav / "images" / "119.png"]
    images, described = parity_images(32, card, count=4)
    assert images.shape == (3, 32, 32, 3) and "3 photographs" in described
    # fewer than there are: spread over the list, so the second camera is sampled too
    images, described = parity_images(32, card, count=2)
    assert images.shape == (2, 32, 32, 3)
    assert str(rbv / "image") in described and str(lesav / "images") in described


def test_spread_samples_the_whole_list_first_then_the_rest():
    from retina_batch.export import spread

    files = list(range(10))
    assert spread(files, 3) == [0, 4, 9, 1, 2, 3, 5, 6, 7, 8]  # 4.5 rounds to even
    assert spread(files, 20) == files and spread([], 2) == []


def test_card_whose_data_is_elsewhere_names_nothing(tmp_path):
    card = {"training": {"data": str(tmp_path / "nowhere"), "images_val": ["1"]}}
    assert card_pairs(card, "val") == [] and _card_images(card) == []
    images, described = parity_images(32, card, count=2)
    assert "synthetic" in described and len(images) == 2


def _two_set_model(tmp_path, tiny_onnx, two_sets, **training) -> Path:
    """The tiny model under a card of the two data folders (as `a` and `b`) and `training`."""
    rbv, lesav = two_sets
    model = tmp_path / "model" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(tiny_onnx.read_bytes())
    write_json_atomic(model.with_name("model.onnx.json"), {
        "working_size": 32, "threshold": 0.5, "training": {
            "datasets": [{"name": "a", "path": str(rbv)}, {"name": "b", "path": str(lesav)}],
            **training}})
    return model


def test_bench_validation_pairs_truth_across_datasets(two_sets, tmp_path, tiny_onnx):
    """Two datasets' `1.png`s must not pair with each other's annotation: the links carry the
    dataset name."""
    _, lesav = two_sets
    model = _two_set_model(tmp_path, tiny_onnx, two_sets, images_val=["a/1", "b/1"])
    images, masks = validation_list(model, tmp_path / "work")
    assert sorted(p.name for p in images.iterdir()) == ["a--1.png", "b--1.png"]
    assert sorted(p.name for p in masks.iterdir()) == ["a--1.png", "b--1.png"]
    assert (masks / "b--1.png").resolve() == (lesav / "vessels" / "1.png").resolve()


def test_bench_validation_of_a_model_that_held_nothing_out(two_sets, tmp_path, tiny_onnx,
                                                           monkeypatch):
    """--val-fraction 0 (the shipped model): its training photographs stand in, a sample
    spread over every data folder, and the note says their Dice is no accuracy figure."""
    from retina_batch import bench as bench_module

    model = _two_set_model(tmp_path, tiny_onnx, two_sets,
                           images_train=["a/0", "a/1", "b/1", "b/37"], images_val=[])
    notes = []
    images, _ = validation_list(model, tmp_path / "work", note=notes.append)
    names = sorted(p.name for p in images.iterdir())
    assert names == ["a--0.png", "a--1.png", "b--1.png", "b--37.png"]
    assert len(notes) == 1 and "not an accuracy figure" in notes[0]
    # more training photographs than the sample: the sample reaches both folders
    monkeypatch.setattr(bench_module, "TRAINED_ON_SAMPLE", 2)
    images, _ = validation_list(model, tmp_path / "work2")
    assert sorted(p.name for p in images.iterdir()) == ["a--0.png", "b--37.png"]
