"""Tests for tfcal.raw.checks: the one box-range check every path uses (precomputed outputs, the
cache writer, the local runner, the Beam pipeline and the value-range check), at its edges."""

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.raw import RawOutputs
from tfcal.raw.checks import (BOX_TOLERANCE, SCORE_TOLERANCE, check_box_range,
                              check_boxes_normalized, check_value_ranges)


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-BOX_TOLERANCE, 1.0 + BOX_TOLERANCE),
                                   (0.3, 0.4), (-0.05, 1.05)])
def test_boxes_within_the_tolerance_pass(lo, hi):
    check_box_range(lo, hi)


@pytest.mark.parametrize("lo,hi", [(-BOX_TOLERANCE - 1e-6, 0.5), (0.0, 1.0 + BOX_TOLERANCE + 1e-6),
                                   (0.0, 640.0)])
def test_boxes_beyond_the_tolerance_are_pixel_coordinates(lo, hi):
    with pytest.raises(ValueError, match=r"^output 'b': must be normalized \[ymin, xmin, ymax, "
                                         r"xmax\] in \[0, 1\] \(pixel coordinates\?\), got "
                                         r"values in \[.*\]$"):
        check_box_range(lo, hi, "output 'b'")


def test_a_batch_is_checked_by_its_own_min_and_max():
    boxes = np.float32([[[0.5, 0.5, 0.6, 300.0]]])
    with pytest.raises(ValueError, match=r"^boxes: .*got values in \[0\.5, 300\]$"):
        check_boxes_normalized(boxes)
    check_boxes_normalized(np.zeros((0, 5, 4), np.float32))  # nothing to check


def _raw(boxes, scores, value_ranges=None):
    n = boxes.shape[0]
    return RawOutputs(np.arange(n), boxes, scores, np.full(n, 10), np.full(n, 10),
                      value_ranges=value_ranges)


def test_value_ranges_name_the_source_and_the_output():
    boxes = np.full((1, 2, 4), 0.5, np.float32)
    boxes[0, 1, 2] = 2.0
    with pytest.raises(TfcalError, match=r"^model/: raw_boxes: must be normalized .* got values "
                                         r"in \[0\.5, 2\]$"):
        check_value_ranges(_raw(boxes, np.zeros((1, 2, 3), np.float32)),
                           score_converter="sigmoid", source="model/", boxes_key="raw_boxes")
    # The recorded ranges are read instead of the arrays when present.
    ok = _raw(boxes, np.zeros((1, 2, 3), np.float32),
              value_ranges={"boxes": [0.0, 1.0], "scores": [0.0, 1.0]})
    check_value_ranges(ok, score_converter="sigmoid", source="model/")


@pytest.mark.parametrize("converter,hi,refused", [
    ("sigmoid", 1.0 + SCORE_TOLERANCE / 2, False), ("sigmoid", 1.0 + 2 * SCORE_TOLERANCE, True),
    ("softmax", 3.0, True), ("identity", 30.0, False)])
def test_scores_must_be_probabilities_unless_identity(converter, hi, refused):
    raw = _raw(np.full((1, 1, 4), 0.5, np.float32), np.float32([[[0.0, hi]]]))
    if refused:
        with pytest.raises(TfcalError, match=rf"model.score_converter: {converter} says"):
            check_value_ranges(raw, score_converter=converter, source="m")
    else:
        check_value_ranges(raw, score_converter=converter, source="m")
