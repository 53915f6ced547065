"""Tests of tfcal.calibration.temperature: golden values derived by hand, fit properties."""

import math

import numpy as np
import pytest

from tfcal import TfcalWarning
from tfcal import calibration as cal
from .data import LN3, miscalibrated, two_point_data


def test_apply_temperature_golden():
    # sigmoid(ln3 / 1) = 3 / (3 + 1) = 0.75; sigmoid(ln3 / 0.5) = 9 / (9 + 1) = 0.9;
    # sigmoid(0 / T) = 0.5 for any T.
    q = cal.apply_temperature([0.0, LN3, LN3], [1.0, 1.0, 0.5])
    np.testing.assert_allclose(q, [0.5, 0.75, 0.9], rtol=1e-6)
    assert q.dtype == np.float32


def test_apply_temperature_softmax_golden():
    # log-probabilities of (1/2, 1/4, 1/4) at T = 2: softmax(log p / 2) is proportional to
    # sqrt(p) = (0.7071, 0.5, 0.5), sum 1.7071 -> (0.4142, 0.2929, 0.2929).
    z = np.log([[0.5, 0.25, 0.25]])
    q = cal.apply_temperature(z, 2.0, softmax=True)
    np.testing.assert_allclose(q, [[math.sqrt(2) - 1, 1 - math.sqrt(0.5), 1 - math.sqrt(0.5)]],
                               rtol=1e-5)


def test_calibrate_scores_softmax_temperature_per_class_keeps_background_at_one():
    # p = (1/2, 1/4, 1/4), T = (1, 1) on the class columns, background T = 1: unchanged.
    q = cal.calibrate_scores([[0.5, 0.25, 0.25]], score_converter="softmax",
                             method="temperature", temperature=(1.0, 1.0))
    np.testing.assert_allclose(q, [[0.25, 0.25]], rtol=1e-6)


def test_fit_temperature_binary_golden():
    # By symmetry the NLL is minimized when sigmoid(L / T) equals the empirical frequency 3/4:
    # L / T = ln 3, so T = 2 / ln 3 = 1.820478...
    z, y = two_point_data()
    assert cal.fit_temperature(z, y) == pytest.approx(2 / LN3, rel=1e-7)


def test_fit_temperature_softmax_golden():
    # Rows [2, 0] with labels 0, 0, 0, 1: softmax(z / T)[0] = sigmoid(2 / T) must be 3/4,
    # so T = 2 / ln 3 as in the binary case.
    z = np.array([[2.0, 0.0]] * 4)
    y = np.array([0, 0, 0, 1])
    assert cal.fit_temperature(z, y) == pytest.approx(2 / LN3, rel=1e-7)


def test_fit_temperature_grid_returns_best_grid_value():
    # The NLL is convex in 1/T with its minimum at T = 1.8205 (above): among the grid values
    # 1.8 is nearest in 1/T and has the lowest NLL.
    z, y = two_point_data()
    assert cal.fit_temperature(z, y, grid=[0.5, 1.0, 1.8, 3.0, 10.0]) == 1.8


def test_fit_per_class_shrinkage_rule_for_temperature():
    z, y, c = miscalibrated(3, 3000, 3, [0.5, 1.0, 2.0])
    idx = np.concatenate([np.flatnonzero(c != 2), np.flatnonzero(c == 2)[:15]])
    z, y, c = z[idx], y[idx], c[idx]  # class 2 keeps 15 detections; class 3 has none
    r = cal.fit_per_class("temperature", z, y, c, 4, min_samples=30)
    pooled = cal.fit_temperature(z, y)
    own = cal.fit_temperature(z[c == 2], y[c == 2])
    # class 2 has 15 < 30 samples: w = 15/30 = 0.5 -> log T = 0.5 log T_own + 0.5 log T_pooled
    assert r.temperature[2] == pytest.approx(math.sqrt(own * pooled), rel=1e-6)
    assert r.temperature[0] == pytest.approx(cal.fit_temperature(z[c == 0], y[c == 0]), rel=1e-6)
    # class 3 has no detections: the pooled value
    assert r.temperature[3] == pytest.approx(pooled, rel=1e-6)
    assert r.fallback_classes == [2, 3]
    assert r.weights == (1.0, 1.0, 0.5, 0.0)
    assert r.pooled["temperature"] == pytest.approx(pooled, rel=1e-6)
    assert r.config_fields() == {"calibration": "temperature", "temperature": r.temperature}


def test_per_class_temperature_recovers_true_temperatures():
    temps = [0.5, 1.0, 2.0, 4.0]
    z, y, c = miscalibrated(8, 40000, 4, temps)
    r = cal.fit_per_class("temperature", z, y, c, 4)
    np.testing.assert_allclose(r.temperature, temps, rtol=0.1)
    assert r.fallback_classes == []


def test_separable_data_temperature_stays_at_bound_with_warning():
    z = np.array([-3.0, -1.0, 1.0, 3.0])
    y = np.array([0, 0, 1, 1])
    with pytest.warns(TfcalWarning, match="separable"):
        t = cal.fit_temperature(z, y)
    assert t == pytest.approx(cal.TEMPERATURE_BOUNDS[0])
    with pytest.warns(TfcalWarning, match="separable"):
        assert cal.fit_temperature(z, y, bounds=(0.1, 5.0)) == pytest.approx(0.1)


def test_separable_data_per_class_warns_and_stays_finite():
    z = np.concatenate([np.linspace(-4, -1, 40), np.linspace(1, 4, 40)])
    y = np.repeat([0, 1], 40)
    c = np.zeros(80, dtype=int)
    with pytest.warns(TfcalWarning, match="bound"):
        r = cal.fit_per_class("temperature", z, y, c, 1)
    assert r.temperature[0] == pytest.approx(0.05)


def test_separable_class_uses_the_pooled_temperature():
    # Class 0 is separable (its own NLL keeps falling as T -> 0, so its fit stops at 0.05);
    # class 1 overlaps. The pooled data overlap, so the pooled T is interior, and class 0 takes
    # it (weight 0, listed as a fallback) instead of the bound.
    rng = np.random.default_rng(3)
    z0 = np.concatenate([np.linspace(-4, -1, 40), np.linspace(1, 4, 40)])
    y0 = np.repeat([0, 1], 40)
    z1 = rng.normal(0, 2, 400)
    y1 = (rng.uniform(size=400) < 1 / (1 + np.exp(-z1 / 2))).astype(int)
    z, y = np.concatenate([z0, z1]), np.concatenate([y0, y1])
    c = np.repeat([0, 1], [80, 400])
    with pytest.warns(TfcalWarning, match=r"classes \[0\].*pooled fit"):
        r = cal.fit_per_class("temperature", z, y, c, 2, min_samples=30)
    assert r.fallback_classes == [0] and r.weights == (0.0, 1.0)
    assert r.temperature[0] == pytest.approx(r.pooled["temperature"])
    assert cal.TEMPERATURE_BOUNDS[0] < r.temperature[0] < cal.TEMPERATURE_BOUNDS[1]
    assert r.temperature[1] == pytest.approx(2.0, rel=0.3)


def test_tf_map_golden_values():
    p = np.array([[[0.0, 0.5, 1 / (1 + np.exp(-2.0))]]], np.float32)  # background column first
    # Temperature 2: sigmoid(logit(p) / 2): 0.5 -> 0.5; sigmoid(2) -> sigmoid(1) = 0.7310586.
    q = cal.calibrate_scores_tf(p, method="temperature", temperature=[2.0]).numpy()
    np.testing.assert_allclose(q, [[[0.5, 0.7310586]]], atol=1e-6)


def test_tf_softmax_temperature_golden_values():
    # p = [0.5 (background), 0.25, 0.25]. Scalar T = 2 scales every column: softmax(log p / 2)
    # is proportional to sqrt(p) = [0.7071, 0.5, 0.5] -> class probs 0.5 / 1.7071 = 0.2928932.
    p = np.array([[[0.5, 0.25, 0.25]]], np.float32)
    q = cal.calibrate_scores_tf(p, score_converter="softmax", method="temperature",
                                temperature=[2.0])
    np.testing.assert_allclose(q.numpy(), [[[0.2928932, 0.2928932]]], atol=1e-6)
    # Per-class T = [2, 2] keeps background at T = 1: weights [0.5, 0.5, 0.5] -> 1/3 each.
    q = cal.calibrate_scores_tf(p, score_converter="softmax", method="temperature",
                                temperature=[2.0, 2.0])
    np.testing.assert_allclose(q.numpy(), [[[1 / 3, 1 / 3]]], atol=1e-6)


def test_softmax_temperature_is_neither_prefiltered_nor_fitted_per_detection():
    m = cal.get("temperature")
    assert not m.filters_raw_scores("softmax") and m.filters_raw_scores("sigmoid")
    with pytest.raises(ValueError, match="softmax is not tuned per detection"):
        m.check_fit_converter("softmax")
    bounds = cal.raw_score_lower_bounds([0.5], [1.0, 0.0], num_classes=2,
                                        score_converter="softmax", method="temperature",
                                        temperature=[2.0])
    assert bounds.numpy().tolist() == [-np.inf, np.inf]


def test_temperature_bounds_are_a_temperature_option_only():
    z, y = two_point_data()
    c = np.zeros(8, dtype=int)
    fitted = cal.fit_per_class("temperature", z, y, c, 1, min_samples=8, bounds=(0.1, 10.0))
    assert fitted.temperature[0] == pytest.approx(2 / LN3, rel=1e-7)  # as fit_temperature
    with pytest.raises(ValueError, match="bounds: not an option of calibration method 'platt'"):
        cal.fit_per_class("platt", z, y, c, 1, bounds=(2.0, 3.0))
