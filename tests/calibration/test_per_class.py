"""Tests of tfcal.calibration.per_class: shrinkage toward the pooled fit, properties, edge cases."""

import math

import numpy as np
import pytest

from tfcal import TfcalWarning, metrics
from tfcal import calibration as cal
from .data import miscalibrated


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_per_class_apply_matches_calibrate_scores(method):
    # PerClassCalibration.apply (what the fit saw: logits, or probabilities for isotonic) must
    # equal calibrate_scores on raw sigmoid scores with a background column, given config_fields.
    z, y, c = miscalibrated(1, 900, 3, [0.5, 1.0, 2.0])
    p = (1 / (1 + np.exp(-z))).astype(np.float32)
    x = p if method == "isotonic" else cal.probs_to_logits(p)
    r = cal.fit_per_class(method, x, y, c, 3)
    cols = p.reshape(300, 3)
    raw = np.concatenate([np.full((300, 1), 0.3, np.float32), cols], axis=1)
    fields = r.config_fields()
    expect = cal.calibrate_scores(raw, method=fields.pop("calibration"), **fields)
    xc = cols if method == "isotonic" else cal.probs_to_logits(cols)
    np.testing.assert_allclose(r.apply(xc), expect, atol=1e-6)
    np.testing.assert_allclose(r.apply(xc.ravel(), np.tile(np.arange(3), 300)), expect.ravel(),
                               atol=1e-6)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibration_never_reverses_ranking_within_a_class(method):
    z, y, c = miscalibrated(6, 4000, 5, [0.4, 0.8, 1.0, 1.5, 3.0])
    x = 1 / (1 + np.exp(-z)) if method == "isotonic" else z
    r = cal.fit_per_class(method, x, y, c, 5)
    q = r.apply(x, c)
    for k in range(5):
        m = c == k
        order = np.argsort(x[m], kind="stable")
        assert np.all(np.diff(q[m][order]) >= 0), f"class {k}"


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_brier_and_nll_do_not_get_worse_on_fitting_data(method):
    z, y, c = miscalibrated(7, 6000, 3, [0.4, 1.0, 2.5])
    p = 1 / (1 + np.exp(-z))
    x = p if method == "isotonic" else z
    q = cal.fit_per_class(method, x, y, c, 3).apply(x, c)
    assert metrics.brier_score(q, y) <= metrics.brier_score(p, y) + 1e-12
    assert metrics.negative_log_likelihood(q, y) <= metrics.negative_log_likelihood(p, y) + 1e-12


@pytest.mark.parametrize("fit", [cal.fit_temperature, cal.fit_platt])
def test_single_label_warns(fit):
    with pytest.warns(TfcalWarning, match="all 4 labels"):
        fit(np.array([0.1, 0.2, -0.3, 1.0]), np.ones(4))


def test_probs_exactly_0_and_1():
    u = np.array([0.0, 0.0, 0.3, 0.7, 1.0, 1.0])
    y = np.array([0, 0, 1, 0, 1, 1])
    kx, ky = cal.fit_isotonic(u, y)
    assert kx[0] == 0.0 and kx[-1] == 1.0 and ky[0] == 0.0 and ky[-1] == 1.0
    t = cal.fit_temperature(cal.probs_to_logits(u), y)
    assert np.isfinite(t)
    q = cal.apply_temperature(cal.probs_to_logits(u), t)
    assert np.all((q >= 0) & (q <= 1))


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

    r = cal.fit_per_class("platt", *miscalibrated(9, 300, 2, [1.0, 2.0]), 3, min_samples=50)
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


def test_probs_to_logits_clips_0_and_1_in_float32():
    z = cal.probs_to_logits([0.0, 0.5, 1.0])
    assert np.all(np.isfinite(z)) and z[1] == 0.0
    lo = np.float32(1e-7)
    assert z[0] == pytest.approx(math.log(float(lo)) - math.log1p(-float(lo)))
    hi = np.float32(1.0) - np.float32(1e-7)  # 0.99999988 in float32
    assert z[2] == pytest.approx(math.log(float(hi)) - math.log1p(-float(hi)))
