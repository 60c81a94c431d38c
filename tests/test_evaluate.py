"""`retina-batch evaluate`: pairing by stem and scores on hand-made masks."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from retina_batch.cli import main
from retina_batch.evaluate import evaluate


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.fixture
def folders(tmp_path):
    truth = np.zeros((10, 10), np.uint8)
    truth[2, 2:8] = 255  # 6 vessel pixels
    pred = np.zeros_like(truth)
    pred[2, 2:6] = 255  # 4 found
    pred[9, 9] = 255  # 1 false alarm in the corner, outside the FOV below
    prob = np.where(pred > 0, 200, 10).astype(np.uint8)
    prob[2, 6:8] = 150  # the missed vessel pixels still rank above background
    fov = np.full_like(truth, 255)
    fov[9, 9] = 0
    write(tmp_path / "pred" / "sub" / "21_training.png", pred)
    write(tmp_path / "truth" / "21_manual1.png", truth)  # pairs despite the markers
    write(tmp_path / "prob" / "sub" / "21_training.png", prob)
    write(tmp_path / "fov" / "21_training_mask.png", fov)
    write(tmp_path / "pred" / "99.png", pred)  # no truth: listed as unmatched
    return tmp_path


def test_scores_by_hand(folders):
    result = evaluate(folders / "pred", folders / "truth", prob_dir=folders / "prob",
                      fov_dir=folders / "fov")
    assert result["images"] == 1 and result["unmatched"] == ["99.png"]
    row = result["per_image"][0]
    assert row["dice"] == pytest.approx(round(8 / 11, 5))  # 2*4 / (2*4 + 1 + 2)
    assert row["fov_dice"] == pytest.approx(round(8 / 10, 5))  # the false alarm is outside
    assert row["sensitivity"] == pytest.approx(round(4 / 6, 5))
    # 6 x 94 pixel pairs; the false alarm (200) outranks the two missed pixels (150) and ties
    # with the four found ones (200): 2 + 4/2 pairs misordered. Inside the FOV all are ordered.
    assert row["auc"] == pytest.approx(round(1 - 4 / 564, 5))
    assert row["fov_auc"] == 1.0


def test_cli_json_and_csv(folders):
    out = folders / "scores.csv"
    result = CliRunner().invoke(main, ["evaluate", str(folders / "pred"), str(folders / "truth"),
                                       "--json", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["mean"]["dice"] == pytest.approx(round(8 / 11, 5))
    assert "auc" not in summary["mean"]  # no probability maps given
    assert out.read_text().splitlines()[0].startswith("path,truth,dice")


def test_cli_size_mismatch_is_an_error_row_not_a_crash(folders):
    write(folders / "truth" / "99.png", np.zeros((5, 5), np.uint8))
    result = CliRunner().invoke(main, ["evaluate", str(folders / "pred"), str(folders / "truth")])
    assert result.exit_code == 1
    assert "99.png" in result.output and "Traceback" not in result.output


def test_cli_missing_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope"), str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
