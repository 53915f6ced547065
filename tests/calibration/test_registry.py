"""Every registered calibration method against the same contract (tfcal.calibration registry).

A new method registers itself by its module alone; its example parameters go in `EXAMPLES` (and
an identity parameter set in `IDENTITY`, when it has one), and then it is held to every check
below: NumPy twin equals TF, exact 0/1 inputs stay finite, the raw-score bounds of the candidate
pre-filter are conservative down to float32 resolution, and its report entry is JSON.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfcal import calibration

CONVERTERS = ["sigmoid", "softmax", "identity"]
# Parameters for K = 2 classes.
EXAMPLES = {
    "none": {},
    "temperature": dict(temperature=[1.7, 0.6]),
    "platt": dict(platt_a=[1.3, 0.7], platt_b=[-0.2, 0.4]),
    "box_platt": dict(box_a=[1.3, 0.7], box_b=[-0.2, 0.4], box_c=[1.5, -2.0]),
    "isotonic": dict(knots_x=[[0.0, 0.4, 1.0], [0.2, 0.9]],
                     knots_y=[[0.05, 0.3, 0.95], [0.0, 1.0]]),
}
# Parameters whose map is the identity on probabilities, for K = 3.
IDENTITY = {
    "none": {},
    "temperature": dict(temperature=[1.0]),
    "platt": dict(platt_a=[1.0, 1.0, 1.0], platt_b=[0.0, 0.0, 0.0]),
    "box_platt": dict(box_a=[1.0] * 3, box_b=[0.0] * 3, box_c=[0.0] * 3),
    "isotonic": dict(knots_x=[[0, 1]] * 3, knots_y=[[0, 1]] * 3),
}
METHODS = list(calibration.names())


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def boxes_for(shape, seed=5):
    """Normalized boxes `[*shape, 4]` of every size from 1e-5 of the image to all of it (every
    method gets them; only box-dependent ones read them)."""
    rng = np.random.default_rng(seed)
    side = 10 ** rng.uniform(-2.5, 0, shape + (2,))
    y0 = rng.uniform(0, 1, shape) * (1 - side[..., 0])
    x0 = rng.uniform(0, 1, shape) * (1 - side[..., 1])
    return np.stack([y0, x0, y0 + side[..., 0], x0 + side[..., 1]], -1).astype(np.float32)


def test_every_registered_method_has_an_example():
    assert set(EXAMPLES) == set(METHODS) and set(IDENTITY) <= set(METHODS)
    assert METHODS[0] == "none" and calibration.get("piecewise_linear").name == "isotonic"
    with pytest.raises(ValueError, match="calibration method: expected one of"):
        calibration.get("histogram")


@pytest.mark.parametrize("method", METHODS)
def test_parameters_are_checked_once_and_their_owner_is_named(method):
    m = calibration.get(method)
    checked = m.check_params(EXAMPLES[method], 2)
    assert set(checked) == set(m.params) and m.check_params(checked, 2) == checked
    for name in m.params:
        with pytest.raises(ValueError, match=f"{name}: required"):
            m.check_params({k: v for k, v in EXAMPLES[method].items() if k != name}, 2)
    for other in METHODS:
        for name, value in EXAMPLES[other].items():
            if name in m.params:
                continue
            # Another method's empty field (as older records hold) is dropped; a set one would
            # be ignored, so it is an error that names its method.
            assert calibration.split_params(m, {name: []}) == {}
            with pytest.raises(ValueError, match=f"{name}: a parameter of calibration method "
                                                 f"'{other}'"):
                calibration.split_params(m, {name: value})
    with pytest.raises(ValueError, match="not a parameter of any calibration method"):
        calibration.split_params(m, {"temprature": [1.0]})


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("method", METHODS)
def test_scores_exactly_zero_and_one_through_every_converter(converter, method):
    if converter == "identity":
        raw = np.array([[[0.0, -30.0, 30.0], [0.0, 0.0, 1.0]]], np.float32)  # logits
    else:
        raw = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], np.float32)  # p = 0 and 1
    q = calibration.calibrate_scores_tf(raw, score_converter=converter, method=method,
                                        boxes=boxes_for(raw.shape[:-1]),
                                        **EXAMPLES[method]).numpy()
    assert q.shape == (1, 2, 2) and q.dtype == np.float32
    assert np.all(np.isfinite(q)) and np.all((q >= 0) & (q <= 1))
    if method == "none" and converter != "identity":
        np.testing.assert_array_equal(q, raw[..., 1:])


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("method", list(IDENTITY))
def test_identity_parameters_return_the_input(converter, method):
    rng = np.random.default_rng(11)
    if converter == "identity":
        raw = rng.normal(0, 4, (2, 5, 4)).astype(np.float32)
        expected = sigmoid(raw[..., 1:].astype(np.float64))
    else:
        raw = rng.dirichlet(np.ones(4), size=(2, 5)).astype(np.float32)
        raw[0, 0] = [0.0, 0.0, 1.0, 0.0]
        expected = raw[..., 1:]
    q = calibration.calibrate_scores_tf(raw, score_converter=converter, method=method,
                                        boxes=boxes_for(raw.shape[:-1]),
                                        **IDENTITY[method]).numpy()
    np.testing.assert_allclose(q, expected, atol=1e-6)


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("method", METHODS)
def test_numpy_twin_equals_the_tf_map(converter, method):
    rng = np.random.default_rng(13)
    if converter == "identity":
        raw = rng.normal(-1, 3, (3, 7, 3)).astype(np.float32)
    else:
        raw = rng.dirichlet(np.ones(3) * 0.5, size=(3, 7)).astype(np.float32)
    kw = dict(score_converter=converter, background_column=True, method=method,
              boxes=boxes_for(raw.shape[:-1]), **EXAMPLES[method])
    np.testing.assert_allclose(calibration.calibrate_scores_tf(raw, **kw).numpy(),
                               calibration.calibrate_scores(raw, **kw), atol=2e-6)


@pytest.mark.parametrize("converter", CONVERTERS)
@pytest.mark.parametrize("method", METHODS)
def test_raw_score_lower_bounds_are_conservative(converter, method):
    rng = np.random.default_rng(17)
    if converter == "identity":
        raw = rng.normal(-1, 3, (4, 300, 3)).astype(np.float32)
    else:
        raw = rng.dirichlet(np.ones(3) * 0.4, size=(4, 300)).astype(np.float32)
    params = EXAMPLES[method]
    thresh = np.array([0.3, 0.05], np.float32)
    q = calibration.calibrate_scores_tf(raw, score_converter=converter, method=method,
                                        boxes=boxes_for(raw.shape[:-1]), **params).numpy()
    bounds = calibration.raw_score_lower_bounds(thresh, [1.0, 1.0], score_converter=converter,
                                                method=method, num_classes=2, **params).numpy()
    passing = q >= thresh
    assert np.all(raw[..., 1:][passing] >= np.broadcast_to(bounds, q.shape)[passing])
    m = calibration.get(method)
    if m.filters_raw_scores(converter):
        assert np.all(np.isfinite(bounds[:1])), "the 0.3 threshold actually filters"
    disabled = calibration.raw_score_lower_bounds(thresh, [1.0, 0.0], score_converter=converter,
                                                  method=method, num_classes=2,
                                                  **params).numpy()
    assert disabled[1] == np.inf


@pytest.mark.parametrize("converter", ["sigmoid", "identity"])
@pytest.mark.parametrize("method", METHODS)
def test_raw_bounds_hold_at_float32_resolution(converter, method):
    # Every float32 raw value within 5,000 steps of each bound: none below the bound may reach
    # the calibrated threshold. Without the bounds' safety margins, rounding in the calibration
    # map lets values a few steps below an exact bound pass (the pre-filter would drop them).
    thresh = np.array([0.3, 0.05], np.float32)
    params = EXAMPLES[method]
    bounds = calibration.raw_score_lower_bounds(thresh, [1.0, 1.0], score_converter=converter,
                                                method=method, num_classes=2, **params).numpy()
    checked = 0
    for k in range(2):
        if not np.isfinite(bounds[k]):
            continue
        steps = np.arange(-5000, 5000, dtype=np.float32) * np.spacing(np.float32(bounds[k]))
        vals = (bounds[k] + steps).astype(np.float32)
        if converter == "sigmoid":
            vals = vals[(vals >= 0) & (vals <= 1)]
        raw = np.zeros((1, vals.size, 3), np.float32)
        raw[0, :, k + 1] = vals
        # The extreme box sizes (a box-dependent map is largest at one of them).
        for box in ([0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5001, 0.5001]):
            boxes = np.broadcast_to(np.float32(box), (1, vals.size, 4))
            q = calibration.calibrate_scores_tf(raw, score_converter=converter, method=method,
                                                boxes=boxes, **params).numpy()[0, :, k]
            assert not np.any((q >= thresh[k]) & (vals < bounds[k])), (k, bounds[k], box)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("method", METHODS)
def test_report_entry_is_json_and_has_a_text(method):
    m = calibration.get(method)
    params = m.check_params(EXAMPLES[method], 2)
    entries = [m.report_entry(params, k) for k in range(2)]
    json.dumps(entries)
    assert all(isinstance(m.describe(e), str) and m.describe(e) for e in entries)
