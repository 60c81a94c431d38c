"""The input shapes an exported graph and a TensorRT engine accept: batch and canvas ranges.

A TensorRT engine has one optimisation profile: batches MIN..MAX tuned for OPT, and square
canvases MIN..MAX tuned for OPT. The canvas OPT is the working canvas the pipeline letterboxes
onto; the range lets the same engine run larger canvases (scale-robust inference, issue 14).
The network is fully convolutional, so every side that is a multiple of 2**depth works; other
sides would need the padding branch of `AttentionUNet.forward`, which tracing does not keep.

Shared by export (what to trace, what to build) and graph_rules (what the graph must accept),
without importing PyTorch or TensorRT.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

DEFAULT_BATCH = "1,4,16"
MIN_SIDE, MAX_SIDE = 32, 4096


class ShapeError(ValueError):
    """A --batch or --size the user gave that cannot work; the message says what would."""


@dataclass(frozen=True)
class Range:
    """MIN..MAX accepted, tuned for OPT."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict:
        return asdict(self)

    def values(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max


def _ordered(option: str, text, values: list[int]) -> Range:
    result = Range(*values)
    if not 1 <= result.min <= result.opt <= result.max:
        raise ShapeError(f"{option} {text!r}: need 1 <= MIN <= OPT <= MAX")
    return result


def parse_batch(text) -> Range:
    """'min,opt,max' (e.g. '1,4,16'), or one N meaning '1,N,N'."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (1, 3):
        raise ShapeError(f"--batch {text!r}: expected MIN,OPT,MAX such as 1,4,16 (or one N)")
    values = [int(p) for p in parts]
    return _ordered("--batch", text, [1, values[0], values[0]] if len(values) == 1 else values)


def _side(option: str, text, part: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", part)
    if not match:
        raise ShapeError(f"{option} {text!r}: expected a side such as 512 or 512x512, or "
                         "MIN,OPT,MAX such as 512,512,1024")
    h, w = int(match[1]), int(match[2] or match[1])
    if h != w:
        raise ShapeError(f"{option} {text}: the working canvas is square (the pipeline "
                         "letterboxes onto it); use e.g. 512x512")
    return h


def parse_canvas(text, working: int, multiple: int = 1) -> Range:
    """Canvas sides for --size: None -> working..2 x working tuned for working; 'N' or 'NxN'
    -> exactly N; 'MIN,OPT,MAX' -> that range (OPT becomes the working canvas). Every side
    must be a multiple of `multiple` (2**depth of the network)."""
    option = "--size"
    if text is None or str(text).strip() == "":
        sides = [working, working, 2 * working]
    else:
        parts = str(text).split(",")
        if len(parts) not in (1, 3):
            raise ShapeError(f"{option} {text!r}: expected N, NxN or MIN,OPT,MAX")
        sides = [_side(option, text, p) for p in parts]
        sides = sides * 3 if len(sides) == 1 else sides
    for side in sides:
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ShapeError(f"{option} {text}: choose sides between {MIN_SIDE} and {MAX_SIDE}")
        if side % multiple:
            raise ShapeError(f"{option} {text}: {side} is not a multiple of {multiple} (the "
                             f"network halves the canvas {multiple.bit_length() - 1} times); "
                             f"use e.g. {side // multiple * multiple or multiple}")
    return _ordered(option, text, sides)


def input_shapes(batch: Range, canvas: Range) -> tuple[tuple[int, int, int, int], ...]:
    """The (min, opt, max) shapes of the uint8 N x H x W x 3 input, for a TensorRT profile."""
    return tuple((n, s, s, 3) for n, s in zip(batch.values(), canvas.values(), strict=True))


def profile_record(batch: Range, canvas: Range) -> dict:
    """How cards record the shapes (and how graph_rules reads them back)."""
    return {"batch": batch.as_dict(), "canvas": canvas.as_dict()}


def from_record(record: dict) -> tuple[Range, Range]:
    return Range(**record["batch"]), Range(**record["canvas"])
