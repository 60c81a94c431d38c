"""--batch and --size parsing: the TensorRT profile's batch and canvas ranges."""

from __future__ import annotations

import pytest

from retina_batch.shapes import Range, ShapeError, input_shapes, parse_batch, parse_canvas


def test_batch_ranges():
    assert parse_batch("1,4,16") == Range(1, 4, 16)
    assert parse_batch(" 2 , 2 , 2 ") == Range(2, 2, 2)
    assert parse_batch("8") == Range(1, 8, 8)
    for bad in ("0,1,2", "4,2,8", "1,2", "a", "", "1,2,3,4", "-1,2,3"):
        with pytest.raises(ShapeError):
            parse_batch(bad)


def test_canvas_ranges_default_to_working_up_to_twice_it():
    assert parse_canvas(None, 512, 16) == Range(512, 512, 1024)
    assert parse_canvas("", 64, 16) == Range(64, 64, 128)
    assert parse_canvas("384x384", 512, 16) == Range(384, 384, 384)
    assert parse_canvas("256", 512, 16) == Range(256, 256, 256)
    assert parse_canvas("512,512x512,1024", 512, 16) == Range(512, 512, 1024)


@pytest.mark.parametrize("text, message", [
    ("512x256", "square"), ("big", "expected"), ("16", "between 32"), ("8192", "between 32"),
    ("520", "not a multiple of 16"), ("1024,512,768", "MIN <= OPT <= MAX"), ("512,1024", "MIN"),
])
def test_canvas_mistakes_say_what_would_work(text, message):
    with pytest.raises(ShapeError, match=message):
        parse_canvas(text, 512, 16)


def test_profile_shapes_are_nhwc_per_min_opt_max():
    assert input_shapes(Range(1, 4, 16), Range(512, 512, 1024)) == (
        (1, 512, 512, 3), (4, 512, 512, 3), (16, 1024, 1024, 3))
