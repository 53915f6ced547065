"""Tests of tfcal.validation: the argument checks PostProcessConfig, methods and layers share."""

from __future__ import annotations

import numpy as np
import pytest

from tfcal import validation


def test_floats_accepts_lists_arrays_and_scalars_only_when_asked():
    assert validation.floats("t", [1, np.float32(0.5)]) == (1.0, 0.5)
    assert validation.floats("t", np.array([0.25])) == (0.25,)
    assert validation.floats("t", 0.3, scalar_ok=True) == (0.3,)
    with pytest.raises(ValueError, match="t: expected a list of numbers, got 0.3"):
        validation.floats("t", 0.3)
    with pytest.raises(ValueError, match="t: expected a number or a list of numbers, got 'a'"):
        validation.floats("t", "a", scalar_ok=True)


@pytest.mark.parametrize("value, kw, message", [
    ([], {}, "expected at least one value"),
    ([1.0, 2.0], dict(lengths=(1, 3)), "expected 1 or 3 values, got 2"),
    ([np.nan], {}, "expected finite numbers"),
    ([True], {}, "expected finite numbers"),
    ([[0.5]], {}, "expected finite numbers"),
    ([1.5], dict(lo=0.0, hi=1.0), r"each value must be in \[0.0, 1.0\], got \[1.5\]"),
    ([0.0], dict(positive=True), "each value must be > 0"),
])
def test_floats_rejects_with_the_name_and_the_value(value, kw, message):
    with pytest.raises(ValueError, match=f"^x: {message}"):
        validation.floats("x", value, **kw)


def test_integer_boolean_booleans_and_choice():
    assert validation.integer("n", np.int64(3), minimum=1) == 3
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="n: expected an int >= 1"):
            validation.integer("n", bad, minimum=1)
    assert validation.boolean("b", np.bool_(True)) is True
    with pytest.raises(ValueError, match="b: expected true or false, got 1"):
        validation.boolean("b", 1)
    assert validation.booleans("e", [True, False], lengths=(0, 2)) == (True, False)
    assert validation.booleans("e", [False]) == (False,)
    with pytest.raises(ValueError, match="e: expected a non-empty list of booleans"):
        validation.booleans("e", [])
    with pytest.raises(ValueError, match="e: expected 0 or 3 booleans"):
        validation.booleans("e", [1, 0, 1], lengths=(0, 3))
    with pytest.raises(ValueError, match=r"c: expected one of \['a', 'b'\], got 'z'"):
        validation.choice("c", "z", ("a", "b"))


def test_knot_rows_name_the_row():
    kx, ky = validation.knot_rows([[0.0, 1.0], np.array([0.5])], [[0.1, 0.9], [0.4]], rows=2)
    assert kx == ((0.0, 1.0), (0.5,)) and ky == ((0.1, 0.9), (0.4,))
    with pytest.raises(ValueError, match="knots_x/knots_y: expected 3 rows each, got 2 and 2"):
        validation.knot_rows(kx, ky, rows=3)
    with pytest.raises(ValueError, match=r"knots_x\[1\]: must be strictly increasing"):
        validation.knot_rows([[0.0, 1.0], [0.5, 0.5]], [[0.1, 0.9], [0.4, 0.4]])
    with pytest.raises(ValueError, match=r"knots_y\[0\]: must be non-decreasing"):
        validation.knot_rows([[0.0, 1.0]], [[0.9, 0.1]])
    with pytest.raises(ValueError, match=r"knots_y\[0\]: expected 2 values"):
        validation.knot_rows([[0.0, 1.0]], [[0.9]])


# (max_detections_per_class, max_total_detections, class_agnostic) and the message, if refused.
CAP_CASES = [
    (None, 100, True, None),
    (100, 100, True, None),  # the OD API's defaults with use_class_agnostic_nms
    (300, 100, True, None),
    (10, 100, True, "max_detections_per_class: class_agnostic NMS has no per-class cap"),
    (None, 100, False, None),
    (10, 100, False, None),
    (300, 100, False, None),
    (0, 100, False, "max_detections_per_class: expected an int >= 1, got 0"),
    (2.5, 100, True, "max_detections_per_class: expected an int >= 1, got 2.5"),
    (True, 100, False, "max_detections_per_class: expected an int >= 1, got True"),
    (None, 0, True, "max_total_detections: expected an int >= 1, got 0"),
]


@pytest.mark.parametrize("per_class, total, agnostic, message", CAP_CASES)
def test_detection_caps_are_one_rule_for_config_record_layer_and_op(per_class, total, agnostic,
                                                                    message):
    from tfcal import ops
    from tfcal.layers import CombinedNMS, PostProcessor
    from tfcal.postprocess import PostProcessConfig

    entries = {
        "validation": lambda: validation.detection_caps(per_class, total,
                                                        class_agnostic=agnostic),
        "PostProcessConfig": lambda: PostProcessConfig(
            num_classes=2, class_agnostic=agnostic, max_detections_per_class=per_class,
            max_total_detections=total),
        "CombinedNMS": lambda: CombinedNMS(class_agnostic=agnostic,
                                           max_detections_per_class=per_class,
                                           max_total_detections=total),
        "NmsOptions": lambda: ops.NmsOptions(class_agnostic=agnostic,
                                             max_detections_per_class=per_class,
                                             max_total_detections=total),
    }
    for where, build in entries.items():
        if message is None:
            build()
        else:
            with pytest.raises(ValueError, match=message):
                build()
    if message is None:
        # What the record accepts, the serving layer built from it accepts, and it round-trips.
        cfg = PostProcessConfig(num_classes=2, class_agnostic=agnostic,
                                max_detections_per_class=per_class, max_total_detections=total)
        assert PostProcessConfig.from_json(cfg.to_json()) == cfg
        assert PostProcessor(cfg).nms.max_detections_per_class == per_class
