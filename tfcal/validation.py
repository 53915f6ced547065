"""Argument validators shared by the tuning config, `PostProcessConfig`, the ops, the calibration
methods and the layers.

Each number of the serving side is checked once, where it enters (the tuning config file, a
`PostProcessConfig`, a `tfcal.ops.NmsOptions`, a layer's `__init__`, a calibration method's
parameters), by the same functions here, so a value is either accepted everywhere or rejected
everywhere with the same message: IoU thresholds, score thresholds, soft-NMS sigmas, detection
caps (one rule for class-agnostic NMS, `detection_caps`), clip windows, label offsets and class
ids. Every check raises a `ValueError` that starts with the argument's name and includes the bad
value (`tfcal.config` turns it into one line naming the file and key).

Plain Python and NumPy only: no TF, no Keras, no config objects.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

__all__ = [
    "MAX_CLASS_ID",
    "boolean",
    "booleans",
    "choice",
    "class_ids",
    "clip_window",
    "detection_caps",
    "floats",
    "integer",
    "iou_thresholds",
    "is_bool",
    "is_int",
    "is_number",
    "knot_rows",
    "label_offset",
    "one_value_when_agnostic",
    "score_thresholds",
    "soft_nms_sigmas",
    "window_frame",
]


def is_bool(v) -> bool:
    """True for Python and NumPy booleans."""
    return isinstance(v, (bool, np.bool_))


def is_int(v) -> bool:
    """True for integers that are not booleans."""
    return isinstance(v, numbers.Integral) and not is_bool(v)


def is_number(v) -> bool:
    """True for finite real numbers that are not booleans."""
    return isinstance(v, numbers.Real) and not is_bool(v) and math.isfinite(v)


def _sequence(name: str, value, *, scalar_ok: bool) -> list:
    if scalar_ok and isinstance(value, numbers.Real) and not is_bool(value):
        return [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        what = "a number or a list of numbers" if scalar_ok else "a list of numbers"
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return list(value)


def floats(name: str, value, *, lengths: Sequence[int] | None = None, lo: float | None = None,
           hi: float | None = None, positive: bool = False, scalar_ok: bool = False
           ) -> tuple[float, ...]:
    """A list of finite numbers as a tuple of floats.

    Args:
      name: the argument's name, first word of every message.
      value: a sequence of numbers (or one number when `scalar_ok`).
      lengths: the allowed lengths; None allows any length >= 1.
      lo, hi: inclusive bounds of every value.
      positive: every value must be > 0.
      scalar_ok: accept a bare number as a list of one.

    Raises:
      ValueError: not numbers, a non-finite value, a value out of range, or a wrong length.
    """
    scalar = scalar_ok and isinstance(value, numbers.Real) and not is_bool(value)
    values = _sequence(name, value, scalar_ok=scalar_ok)
    if lengths is None and not values:
        raise ValueError(f"{name}: expected at least one value, got []")
    if lengths is not None and len(values) not in lengths:
        want = " or ".join(str(n) for n in sorted(set(lengths)))
        raise ValueError(f"{name}: expected {want} values, got {len(values)}: {values}")
    for v in values:
        if not is_number(v):
            if scalar:
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            raise ValueError(f"{name}: expected finite numbers, got {values}")
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (positive and v <= 0):
            rng = "> 0" if positive else (f">= {lo}" if hi is None else
                                          f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
            if scalar:
                raise ValueError(f"{name}: must be {rng}, got {value!r}")
            raise ValueError(f"{name}: each value must be {rng}, got {[float(x) for x in values]}")
    return tuple(float(v) for v in values)


def integer(name: str, value, *, minimum: int) -> int:
    """An int >= `minimum` (booleans and floats are rejected)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def boolean(name: str, value) -> bool:
    """A Python or NumPy boolean as a bool (0/1 and strings are rejected)."""
    if not is_bool(value):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return bool(value)


def booleans(name: str, value, *, lengths: Sequence[int] | None = None) -> tuple[bool, ...]:
    """A list of booleans of one of `lengths` (None: any length >= 1)."""
    ok_length = (len(value) in lengths if lengths is not None else len(value) > 0) if hasattr(
        value, "__len__") else False
    if isinstance(value, (str, bytes)) or not ok_length or not all(is_bool(v) for v in value):
        want = ("a non-empty list of" if lengths is None else
                " or ".join(str(n) for n in sorted(set(lengths))))
        raise ValueError(f"{name}: expected {want} booleans, got {value!r}")
    return tuple(bool(v) for v in value)


MAX_CLASS_ID = 2 ** 24
"""Largest class id: ids are emitted as float32 (`detection_classes`), exact up to 2**24."""


def class_ids(name: str, value, *, lengths: Sequence[int] | None = None) -> tuple[int, ...]:
    """Category ids of class columns: ints in [-1, 2**24], -1 for "no category"; the other ids
    distinct (each category is predicted by one column).

    Args:
      name: the argument's name, first word of every message.
      value: a sequence of ints (NumPy ints accepted).
      lengths: the allowed lengths; None allows any length >= 1.
    """
    ok_length = hasattr(value, "__len__") and (
        len(value) in lengths if lengths is not None else len(value) > 0)
    if isinstance(value, (str, bytes)) or not ok_length or not all(
            is_int(v) and -1 <= v <= MAX_CLASS_ID for v in value):
        want = ("a non-empty list of" if lengths is None else
                " or ".join(str(n) for n in sorted(set(lengths))))
        raise ValueError(f"{name}: expected {want} ints in [-1, {MAX_CLASS_ID}] (-1: no "
                         f"category), got {value!r}")
    ids = tuple(int(v) for v in value)
    seen: dict[int, int] = {}
    for column, i in enumerate(ids):
        if i >= 0 and i in seen:
            raise ValueError(f"{name}: id {i} is given to columns {seen[i]} and {column}; each "
                             f"id must name one column, got {list(ids)}")
        seen.setdefault(i, column)
    return ids


def clip_window(name: str, value) -> tuple[float, float, float, float]:
    """A window `[ymin, xmin, ymax, xmax]` of finite numbers with ymin < ymax and xmin < xmax."""
    values = floats(name, value, lengths=(4,))
    if not (values[0] < values[2] and values[1] < values[3]):
        raise ValueError(f"{name}: expected [ymin, xmin, ymax, xmax] with ymin < ymax and "
                         f"xmin < xmax, got {list(values)}")
    return values


def choice(name: str, value, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def knot_rows(knots_x, knots_y, *, rows: int | None = None
              ) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """Rows of piecewise-linear knots: per row `knots_x` strictly increasing in [0, 1] and
    `knots_y` non-decreasing in [0, 1], equally long and non-empty; rows may differ in length.

    Args:
      knots_x, knots_y: sequences of rows.
      rows: the required number of rows (None: any number >= 1).

    Returns:
      `(knots_x, knots_y)` as tuples of float tuples.
    """
    for name, value in (("knots_x", knots_x), ("knots_y", knots_y)):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"{name}: expected a list of rows, got {value!r}")
    if len(knots_x) != len(knots_y) or len(knots_x) == 0 or (
            rows is not None and len(knots_x) != rows):
        want = f"{rows} rows each" if rows is not None else "the same number (>= 1) of rows"
        raise ValueError(f"knots_x/knots_y: expected {want}, got {len(knots_x)} and "
                         f"{len(knots_y)}")
    out_x, out_y = [], []
    for i, (rx, ry) in enumerate(zip(knots_x, knots_y)):
        x = floats(f"knots_x[{i}]", rx, lo=0.0, hi=1.0)
        y = floats(f"knots_y[{i}]", ry, lengths=(len(x),), lo=0.0, hi=1.0)
        if any(b <= a for a, b in zip(x, x[1:])):
            raise ValueError(f"knots_x[{i}]: must be strictly increasing, got {list(x)}")
        if any(b < a for a, b in zip(y, y[1:])):
            raise ValueError(f"knots_y[{i}]: must be non-decreasing, got {list(y)}")
        out_x.append(x)
        out_y.append(y)
    return tuple(out_x), tuple(out_y)


# ----------------------------------------------------------------------------- shared numbers
# The numbers of the detection stage, checked by these functions wherever they enter: the
# tuning config (`tfcal.config`), `PostProcessConfig`, `tfcal.ops.NmsOptions` and the layers.


def iou_thresholds(name: str, value, *, lengths: Sequence[int] | None = None,
                   scalar_ok: bool = False, allow_zero: bool = True) -> tuple[float, ...]:
    """NMS IoU thresholds: finite numbers in [0, 1] (in (0, 1] without `allow_zero`).

    A box is suppressed iff its IoU with a higher-scored box of its class is > the threshold, so
    0 suppresses any overlap and 1 suppresses only identical boxes.
    """
    values = floats(name, value, lengths=lengths, lo=0.0, hi=1.0, scalar_ok=scalar_ok)
    if not allow_zero and any(v == 0.0 for v in values):
        if scalar_ok and len(values) == 1 and not hasattr(value, "__len__"):
            raise ValueError(f"{name}: must be in (0, 1], got {value!r}")
        raise ValueError(f"{name}: each value must be in (0, 1], got {list(values)}")
    return values


def score_thresholds(name: str, value, *, lengths: Sequence[int] | None = None,
                     scalar_ok: bool = False) -> tuple[float, ...]:
    """Score thresholds on probabilities: finite numbers in [0, 1]."""
    return floats(name, value, lengths=lengths, lo=0.0, hi=1.0, scalar_ok=scalar_ok)


def soft_nms_sigmas(name: str, value, *, lengths: Sequence[int] | None = None,
                    scalar_ok: bool = False) -> tuple[float, ...]:
    """Soft-NMS sigmas: finite numbers >= 0 (0: hard NMS)."""
    return floats(name, value, lengths=lengths, lo=0.0, scalar_ok=scalar_ok)


def label_offset(name: str, value) -> int:
    """The class id of column 0 when no class ids are given: an int >= 0."""
    return integer(name, value, minimum=0)


def detection_caps(max_detections_per_class, max_total_detections, *,
                   class_agnostic: bool = False) -> tuple[int | None, int]:
    """The per-class and total detection caps of NMS, one rule for every caller.

    `max_total_detections` is an int >= 1 (the output rows); `max_detections_per_class` is an
    int >= 1, or None for no cap below the total. Class-agnostic NMS (one NMS over all classes)
    has no per-class cap, so there a per-class cap must be one that cannot bind: None or
    >= `max_total_detections` (an OD API config's default 100 with 100 total is one).

    Returns:
      `(max_detections_per_class, max_total_detections)` as given, ints or None.

    Raises:
      ValueError: a cap that is not an int >= 1, or a binding per-class cap with
        `class_agnostic`.
    """
    total = integer("max_total_detections", max_total_detections, minimum=1)
    if max_detections_per_class is None:
        return None, total
    per_class = integer("max_detections_per_class", max_detections_per_class, minimum=1)
    if class_agnostic and per_class < total:
        raise ValueError(f"max_detections_per_class: class_agnostic NMS has no per-class cap, so "
                         f"it must be None or >= max_total_detections ({total}), got "
                         f"{per_class}")
    return per_class, total


def one_value_when_agnostic(name: str, values: Sequence[float], class_agnostic: bool) -> None:
    """Class-agnostic NMS is one NMS: it takes a single IoU threshold and a single sigma."""
    if class_agnostic and len(set(values)) > 1:
        raise ValueError(f"{name}: class_agnostic needs a single value, got {list(values)}")


def window_frame(change_coordinate_frame: bool, clip_window) -> bool:
    """`change_coordinate_frame` as a bool; it needs a clip window (the frame to change to)."""
    change = boolean("change_coordinate_frame", change_coordinate_frame)
    if change and (clip_window is None or (hasattr(clip_window, "__len__")
                                           and len(clip_window) == 0)):
        raise ValueError(f"change_coordinate_frame: needs a clip_window (the frame to change "
                         f"to), got clip_window {clip_window!r}")
    return change
