"""Tests for tfcal.calibration: golden values derived by hand, properties and edge cases."""

import math

import numpy as np
import pytest

from tfcal import TfcalWarning, metrics
from tfcal import calibration as cal

LN3 = math.log(3.0)


def _miscalibrated(seed: int, n: int, num_classes: int, temps):
    """Detections whose true probability is sigmoid(z / T_k): logits z are over-confident."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, num_classes, n)
    z = rng.normal(0.5, 3.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z / np.asarray(temps)[c]))).astype(np.int64)
    return z, y, c


# ----------------------------------------------------------------------------- apply maps


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


def test_apply_platt_golden():
    # a z + b = 2 ln3 - ln3 = ln3 -> 0.75; at z = 0: sigmoid(-ln3) = 0.25.
    np.testing.assert_allclose(cal.apply_platt([LN3, 0.0], 2.0, -LN3), [0.75, 0.25], rtol=1e-6)


def test_apply_piecewise_linear_golden_and_clamped():
    # knots (0.2, 0.1) -> (0.6, 0.5): u = 0.4 is halfway -> 0.3; below 0.2 -> 0.1, above -> 0.5.
    q = cal.apply_piecewise_linear([0.0, 0.2, 0.4, 0.6, 1.0], [0.2, 0.6], [0.1, 0.5])
    np.testing.assert_allclose(q, [0.1, 0.1, 0.3, 0.5, 0.5], rtol=1e-6)


def test_apply_piecewise_linear_per_column_rows_of_different_length():
    q = cal.apply_piecewise_linear([[0.5, 0.5]], [[0.0, 1.0], [0.0, 0.5, 1.0]],
                                   [[0.0, 1.0], [0.0, 0.2, 1.0]])
    np.testing.assert_allclose(q, [[0.5, 0.2]], rtol=1e-6)


def test_probs_to_logits_clips_0_and_1_in_float32():
    z = cal.probs_to_logits([0.0, 0.5, 1.0])
    assert np.all(np.isfinite(z)) and z[1] == 0.0
    lo = np.float32(1e-7)
    assert z[0] == pytest.approx(math.log(float(lo)) - math.log1p(-float(lo)))
    hi = np.float32(1.0) - np.float32(1e-7)  # 0.99999988 in float32
    assert z[2] == pytest.approx(math.log(float(hi)) - math.log1p(-float(hi)))


def test_calibrate_scores_none_is_identity_and_drops_background():
    rng = np.random.default_rng(0)
    raw = rng.random((2, 5, 4)).astype(np.float32)
    q = cal.calibrate_scores(raw, score_converter="sigmoid", background_column=True)
    np.testing.assert_allclose(q, raw[..., 1:], atol=1e-6)
    z = rng.normal(size=(3, 4))
    q = cal.calibrate_scores(z, score_converter="identity", background_column=False)
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-z)), atol=1e-6)


def test_calibrate_scores_softmax_temperature_per_class_keeps_background_at_one():
    # p = (1/2, 1/4, 1/4), T = (1, 1) on the class columns, background T = 1: unchanged.
    q = cal.calibrate_scores([[0.5, 0.25, 0.25]], score_converter="softmax",
                             method="temperature", temperature=(1.0, 1.0))
    np.testing.assert_allclose(q, [[0.25, 0.25]], rtol=1e-6)


@pytest.mark.parametrize("method", ["temperature", "platt", "piecewise_linear"])
def test_per_class_apply_matches_calibrate_scores(method):
    # PerClassCalibration.apply (what the fit saw: logits, or probabilities for piecewise) must
    # equal calibrate_scores on raw sigmoid scores with a background column, given config_fields.
    z, y, c = _miscalibrated(1, 900, 3, [0.5, 1.0, 2.0])
    p = (1 / (1 + np.exp(-z))).astype(np.float32)
    x = p if method == "piecewise_linear" else cal.probs_to_logits(p)
    r = cal.fit_per_class(method, x, y, c, 3)
    cols = p.reshape(300, 3)
    raw = np.concatenate([np.full((300, 1), 0.3, np.float32), cols], axis=1)
    fields = r.config_fields()
    expect = cal.calibrate_scores(raw, method=fields.pop("calibration"), **fields)
    xc = cols if method == "piecewise_linear" else cal.probs_to_logits(cols)
    np.testing.assert_allclose(r.apply(xc), expect, atol=1e-6)
    np.testing.assert_allclose(r.apply(xc.ravel(), np.tile(np.arange(3), 300)), expect.ravel(),
                               atol=1e-6)


# ----------------------------------------------------------------------------- fitting goldens


def _two_point_data(L=2.0):
    # z = +L: labels 1, 1, 1, 0 (frequency 3/4); z = -L: labels 1, 0, 0, 0 (frequency 1/4).
    z = np.array([L] * 4 + [-L] * 4)
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    return z, y


def test_fit_temperature_binary_golden():
    # By symmetry the NLL is minimized when sigmoid(L / T) equals the empirical frequency 3/4:
    # L / T = ln 3, so T = 2 / ln 3 = 1.820478...
    z, y = _two_point_data()
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
    z, y = _two_point_data()
    assert cal.fit_temperature(z, y, grid=[0.5, 1.0, 1.8, 3.0, 10.0]) == 1.8


def test_fit_platt_golden():
    # N+ = N- = 4: smoothed targets t+ = 5/6, t- = 1/6. Two distinct logits, two parameters: the
    # fit matches each group's mean target. z = +1: (3 * 5/6 + 1/6) / 4 = 2/3; z = -1:
    # (5/6 + 3/6) / 4 = 1/3. sigmoid(a + b) = 2/3 and sigmoid(-a + b) = 1/3 give a = ln 2, b = 0.
    z, y = _two_point_data(1.0)
    a, b = cal.fit_platt(z, y)
    assert a == pytest.approx(math.log(2), abs=1e-7)
    assert b == pytest.approx(0.0, abs=1e-7)


def test_fit_isotonic_golden_pav():
    # labels 0, 1, 0, 1 at 0.1 .. 0.4: the 1 then 0 at 0.2, 0.3 violate monotonicity and pool to
    # 0.5. Blocks {0.1}: 0, {0.2, 0.3}: 0.5, {0.4}: 1 -> knots at the block ends.
    kx, ky = cal.fit_isotonic([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    np.testing.assert_allclose(kx, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(ky, [0.0, 0.5, 0.5, 1.0])


def test_fit_isotonic_ties_get_one_value_whatever_the_order():
    # Two samples at 0.5 with labels 0 and 1 are one input with mean 0.5 (not a 0 then 1 step).
    for labels in ([0, 0, 1, 1], [0, 1, 0, 1]):
        kx, ky = cal.fit_isotonic([0.1, 0.5, 0.5, 0.9], labels)
        np.testing.assert_allclose(kx, [0.1, 0.5, 0.9])
        np.testing.assert_allclose(ky, [0.0, 0.5, 1.0])


def test_fit_isotonic_knots_are_valid_and_match_reference_pav():
    rng = np.random.default_rng(2)
    u = np.round(rng.random(500), 2).astype(np.float32)  # many ties; the fit works in float32
    y = (rng.random(500) < u).astype(int)
    kx, ky = cal.fit_isotonic(u, y)
    assert np.all(np.diff(kx) > 0) and np.all(np.diff(ky) >= 0)
    assert kx.min() >= 0 and kx.max() <= 1 and ky.min() >= 0 and ky.max() <= 1
    # Reference: brute-force PAV on the tie-grouped means (repeat passes until monotone).
    ux = np.unique(u)
    vals = [[y[u == x].mean(), float((u == x).sum())] for x in ux]
    blocks = [[v, w, [i]] for i, (v, w) in enumerate(vals)]
    merged = True
    while merged:
        merged = False
        for i in range(len(blocks) - 1):
            if blocks[i][0] > blocks[i + 1][0]:
                a, b = blocks[i], blocks.pop(i + 1)
                a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1])
                a[1] += b[1]
                a[2] += b[2]
                merged = True
                break
    ref = np.empty(ux.size)
    for v, _, idx in blocks:
        ref[idx] = v
    np.testing.assert_allclose(np.interp(ux, kx, ky), ref, atol=1e-12)


# ----------------------------------------------------------------------------- per class


def test_fit_per_class_shrinkage_rule_for_temperature():
    z, y, c = _miscalibrated(3, 3000, 3, [0.5, 1.0, 2.0])
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


def test_fit_per_class_single_label_class_falls_back():
    z, y, c = _miscalibrated(4, 2000, 2, [1.0, 1.0])
    y[c == 1] = 0  # class 1: all false positives
    r = cal.fit_per_class("platt", z, y, c, 2, min_samples=10)
    pa, pb = cal.fit_platt(z, y)
    assert r.fallback_classes == [1]
    assert (r.platt_a[1], r.platt_b[1]) == pytest.approx((pa, pb), rel=1e-6)
    assert (r.platt_a[0], r.platt_b[0]) == pytest.approx(cal.fit_platt(z[c == 0], y[c == 0]),
                                                         rel=1e-6)


def test_fit_per_class_isotonic_blend_is_pointwise_blend_and_monotone():
    rng = np.random.default_rng(5)
    u = rng.random(400)
    c = np.where(np.arange(400) < 390, 0, 1)  # class 1 has 10 samples
    y = (rng.random(400) < u ** 2).astype(int)
    y[-10:] = [0, 1] * 5
    r = cal.fit_per_class("isotonic", u, y, c, 2, min_samples=20)
    assert r.method == "piecewise_linear" and r.fallback_classes == [1]
    px, py = cal.fit_isotonic(u, y)
    ox, oy = cal.fit_isotonic(u[c == 1], y[c == 1])
    grid = np.linspace(0, 1, 101)
    expect = 0.5 * np.interp(grid, ox, oy) + 0.5 * np.interp(grid, px, py)
    np.testing.assert_allclose(r.apply(grid, np.ones(101, dtype=int)), expect, atol=1e-6)
    for kx, ky in zip(r.knots_x, r.knots_y):
        assert np.all(np.diff(kx) > 0) and np.all(np.diff(ky) >= 0)


@pytest.mark.parametrize("method", ["temperature", "platt", "piecewise_linear"])
def test_calibration_never_reverses_ranking_within_a_class(method):
    z, y, c = _miscalibrated(6, 4000, 5, [0.4, 0.8, 1.0, 1.5, 3.0])
    x = 1 / (1 + np.exp(-z)) if method == "piecewise_linear" else z
    r = cal.fit_per_class(method, x, y, c, 5)
    q = r.apply(x, c)
    for k in range(5):
        m = c == k
        order = np.argsort(x[m], kind="stable")
        assert np.all(np.diff(q[m][order]) >= 0), f"class {k}"


@pytest.mark.parametrize("method", ["temperature", "platt", "piecewise_linear"])
def test_brier_and_nll_do_not_get_worse_on_fitting_data(method):
    z, y, c = _miscalibrated(7, 6000, 3, [0.4, 1.0, 2.5])
    p = 1 / (1 + np.exp(-z))
    x = p if method == "piecewise_linear" else z
    q = cal.fit_per_class(method, x, y, c, 3).apply(x, c)
    assert metrics.brier_score(q, y) <= metrics.brier_score(p, y) + 1e-12
    assert metrics.negative_log_likelihood(q, y) <= metrics.negative_log_likelihood(p, y) + 1e-12


def test_per_class_temperature_recovers_true_temperatures():
    temps = [0.5, 1.0, 2.0, 4.0]
    z, y, c = _miscalibrated(8, 40000, 4, temps)
    r = cal.fit_per_class("temperature", z, y, c, 4)
    np.testing.assert_allclose(r.temperature, temps, rtol=0.1)
    assert r.fallback_classes == []


# ----------------------------------------------------------------------------- edge cases


def test_separable_data_temperature_stays_at_bound_with_warning():
    z = np.array([-3.0, -1.0, 1.0, 3.0])
    y = np.array([0, 0, 1, 1])
    with pytest.warns(TfcalWarning, match="separable"):
        t = cal.fit_temperature(z, y)
    assert t == pytest.approx(cal.TEMPERATURE_BOUNDS[0])
    with pytest.warns(TfcalWarning, match="separable"):
        assert cal.fit_temperature(z, y, bounds=(0.1, 5.0)) == pytest.approx(0.1)


def test_separable_data_platt_is_finite_with_warning():
    z = np.array([-3.0, -1.0, 1.0, 3.0])
    y = np.array([0, 0, 1, 1])
    with pytest.warns(TfcalWarning, match="separable"):
        a, b = cal.fit_platt(z, y)
    assert np.isfinite(a) and np.isfinite(b) and a > 0
    # the smoothed targets (3/4 for positives, 1/4 for negatives) bound the fitted probabilities
    q = cal.apply_platt(z, a, b)
    assert q.max() < 0.9 and q.min() > 0.1


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


def test_backwards_logits_platt_clamps_slope():
    z = np.array([-2.0, -1.0, 1.0, 2.0] * 3)
    y = np.array([1, 1, 0, 0] * 3)
    with pytest.warns(TfcalWarning, match="backwards"):
        a, b = cal.fit_platt(z, y)
    assert a == 0.0 and b == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fit", [cal.fit_temperature, cal.fit_platt])
def test_single_label_warns(fit):
    with pytest.warns(TfcalWarning, match="all 4 labels"):
        fit(np.array([0.1, 0.2, -0.3, 1.0]), np.ones(4))


def test_single_label_isotonic_is_constant():
    with pytest.warns(TfcalWarning, match="constant 0"):
        kx, ky = cal.fit_isotonic([0.2, 0.4, 0.9], [0, 0, 0])
    np.testing.assert_array_equal(ky, np.zeros_like(kx))


def test_probs_exactly_0_and_1():
    u = np.array([0.0, 0.0, 0.3, 0.7, 1.0, 1.0])
    y = np.array([0, 0, 1, 0, 1, 1])
    kx, ky = cal.fit_isotonic(u, y)
    assert kx[0] == 0.0 and kx[-1] == 1.0 and ky[0] == 0.0 and ky[-1] == 1.0
    t = cal.fit_temperature(cal.probs_to_logits(u), y)
    assert np.isfinite(t)
    q = cal.apply_temperature(cal.probs_to_logits(u), t)
    assert np.all((q >= 0) & (q <= 1))


def test_all_inputs_equal_isotonic_is_constant_mean():
    kx, ky = cal.fit_isotonic([0.5, 0.5, 0.5, 0.5], [0, 1, 1, 1])
    np.testing.assert_allclose(kx, [0.0, 1.0])
    np.testing.assert_allclose(ky, [0.75, 0.75])


@pytest.mark.parametrize("call", [
    lambda: cal.fit_temperature([], []),
    lambda: cal.fit_platt(np.array([]), np.array([])),
    lambda: cal.fit_isotonic([], []),
    lambda: cal.fit_per_class("temperature", [], [], np.array([], dtype=int), 3),
])
def test_empty_input_raises(call):
    with pytest.raises(ValueError, match="empty"):
        call()


@pytest.mark.parametrize("call", [
    lambda: cal.fit_temperature([0.1, np.nan], [0, 1]),
    lambda: cal.fit_platt([0.1, np.nan], [0, 1]),
    lambda: cal.fit_isotonic([0.1, np.nan], [0, 1]),
    lambda: cal.fit_per_class("platt", [np.inf, 1.0], [0, 1], np.array([0, 0]), 1),
    lambda: cal.apply_temperature([np.nan], 1.0),
])
def test_nan_raises(call):
    with pytest.raises(ValueError, match="non-finite"):
        call()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2"):
        cal.fit_platt([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"probabilities must be in \[0, 1\], got 1.5"):
        cal.fit_isotonic([0.1, 1.5], [0, 1])
    with pytest.raises(ValueError, match="method"):
        cal.fit_per_class("histogram", [0.1], [1], np.array([0]), 1)
    with pytest.raises(ValueError, match="class_index: must be in"):
        cal.fit_per_class("platt", [0.1, 0.2], [0, 1], np.array([0, 5]), 2)
    with pytest.raises(ValueError, match="temperature: must be finite and > 0"):
        cal.apply_temperature([0.1], 0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        cal.apply_piecewise_linear([0.1], [0.5, 0.5], [0.1, 0.2])


def test_class_params_are_json_ready():
    import json

    r = cal.fit_per_class("platt", *_miscalibrated(9, 300, 2, [1.0, 2.0]), 3, min_samples=50)
    params = r.class_params(2)
    assert params["fallback"] and params["weight"] == 0.0 and params["num_samples"] == 0
    assert (params["a"], params["b"]) == (r.pooled["platt_a"], r.pooled["platt_b"])
    json.dumps([r.class_params(k) for k in range(3)])


def test_per_class_warnings_use_class_labels():
    # One separable class beside an overlapping one (the pooled fit is interior).
    rng = np.random.default_rng(4)
    z1 = rng.normal(0, 2, 400)
    z = np.concatenate([np.linspace(-4, -1, 40), np.linspace(1, 4, 40), z1])
    y = np.concatenate([np.repeat([0, 1], 40),
                        (rng.uniform(size=400) < 1 / (1 + np.exp(-z1 / 2))).astype(int)])
    c = np.repeat([0, 1], [80, 400])
    with pytest.warns(TfcalWarning, match=r"classes \[defect \(id 7\)\]"):
        cal.fit_per_class("temperature", z, y, c, 2, class_labels=["defect (id 7)", "scratch"])
    with pytest.raises(ValueError, match="class_labels: expected 2 names, got 1"):
        cal.fit_per_class("temperature", z, y, c, 2, class_labels=["a"])
