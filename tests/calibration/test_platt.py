"""Tests of tfcal.calibration.platt: golden values derived by hand, fit properties."""

import math

import numpy as np
import pytest

from tfcal import TfcalWarning
from tfcal import calibration as cal
from .data import LN3, miscalibrated, two_point_data


def test_apply_platt_golden():
    # a z + b = 2 ln3 - ln3 = ln3 -> 0.75; at z = 0: sigmoid(-ln3) = 0.25.
    np.testing.assert_allclose(cal.apply_platt([LN3, 0.0], 2.0, -LN3), [0.75, 0.25], rtol=1e-6)


def test_fit_platt_golden():
    # N+ = N- = 4: smoothed targets t+ = 5/6, t- = 1/6. Two distinct logits, two parameters: the
    # fit matches each group's mean target. z = +1: (3 * 5/6 + 1/6) / 4 = 2/3; z = -1:
    # (5/6 + 3/6) / 4 = 1/3. sigmoid(a + b) = 2/3 and sigmoid(-a + b) = 1/3 give a = ln 2, b = 0.
    z, y = two_point_data(1.0)
    a, b = cal.fit_platt(z, y)
    assert a == pytest.approx(math.log(2), abs=1e-7)
    assert b == pytest.approx(0.0, abs=1e-7)


def test_fit_per_class_single_label_class_falls_back():
    z, y, c = miscalibrated(4, 2000, 2, [1.0, 1.0])
    y[c == 1] = 0  # class 1: all false positives
    r = cal.fit_per_class("platt", z, y, c, 2, min_samples=10)
    pa, pb = cal.fit_platt(z, y)
    assert r.fallback_classes == [1]
    assert (r.platt_a[1], r.platt_b[1]) == pytest.approx((pa, pb), rel=1e-6)
    assert (r.platt_a[0], r.platt_b[0]) == pytest.approx(cal.fit_platt(z[c == 0], y[c == 0]),
                                                         rel=1e-6)


def test_separable_data_platt_is_finite_with_warning():
    z = np.array([-3.0, -1.0, 1.0, 3.0])
    y = np.array([0, 0, 1, 1])
    with pytest.warns(TfcalWarning, match="separable"):
        a, b = cal.fit_platt(z, y)
    assert np.isfinite(a) and np.isfinite(b) and a > 0
    # the smoothed targets (3/4 for positives, 1/4 for negatives) bound the fitted probabilities
    q = cal.apply_platt(z, a, b)
    assert q.max() < 0.9 and q.min() > 0.1


def test_backwards_logits_platt_clamps_slope():
    z = np.array([-2.0, -1.0, 1.0, 2.0] * 3)
    y = np.array([1, 1, 0, 0] * 3)
    with pytest.warns(TfcalWarning, match="backwards"):
        a, b = cal.fit_platt(z, y)
    assert a == 0.0 and b == pytest.approx(0.0, abs=1e-12)


def test_tf_map_golden_values():
    p = np.array([[[0.0, 0.5, 1 / (1 + np.exp(-2.0))]]], np.float32)  # background column first
    # Platt a = 2, b = -1 on p = 0.5 (z = 0): sigmoid(-1) = 0.2689414; on z = 2: sigmoid(3).
    q = cal.calibrate_scores_tf(p, method="platt", platt_a=[2.0, 2.0],
                                platt_b=[-1.0, -1.0]).numpy()
    np.testing.assert_allclose(q, [[[0.2689414, 0.9525741]]], atol=1e-6)


def test_platt_needs_one_slope_and_offset_per_class():
    with pytest.raises(ValueError, match="platt_a: expected 3 values"):
        cal.get("platt").check_params({"platt_a": [1.0], "platt_b": [0.0]}, 3)
    with pytest.raises(ValueError, match="platt_b: expected 2 values"):
        cal.get("platt").check_params({"platt_a": [1.0, 1.0], "platt_b": [0.0]})
