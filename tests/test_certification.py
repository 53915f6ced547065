"""Tests of tfcal.certification: exact binomial p-values against scipy, the fallback procedure
by hand, label-free sequences, the learn-split planning and the box estimate (derivations in
the comments). The coverage of the whole search is simulated in tests/tuning/test_coverage.py."""

import math

import numpy as np
import pytest
from scipy import stats

from tfcal import certification as C


def test_binomial_pvalue_matches_scipy_and_edges():
    k = np.array([0, 1, 29, 30, 17, 5])
    n = np.array([10, 10, 30, 30, 20, 5])
    want = stats.binom.sf(k - 1, n, 0.9)
    want[0] = 1.0  # P(X >= 0) = 1
    np.testing.assert_allclose(C.binomial_pvalue(k, n, 0.9), want, rtol=1e-12)
    assert C.binomial_pvalue(30, 30, 0.9) == pytest.approx(0.9 ** 30)
    assert np.all(C.binomial_pvalue([3, 5], [5, 5], 1.0) == 1.0)  # rate 1 never rejected
    with pytest.raises(ValueError, match="0 <= k <= n"):
        C.binomial_pvalue(6, 5, 0.9)
    with pytest.raises(ValueError, match="p0"):
        C.binomial_pvalue(1, 5, 0.0)


def test_pvalue_is_the_clopper_pearson_decision():
    from tfcal.thresholds import clopper_pearson

    # p <= a  <=>  the one-sided (1 - a) Clopper-Pearson lower bound >= target.
    for k, n in [(29, 30), (95, 100), (40, 40), (180, 200)]:
        lower = clopper_pearson(k, n, 0.95, sided="one")[0]
        assert (C.binomial_pvalue(k, n, 0.9) <= 0.05) == (lower >= 0.9)


def test_min_count():
    # 0.9^28 = 0.0523 > 0.05 >= 0.9^29 = 0.0471.
    assert C.min_count(0.9, 0.05) == 29
    assert C.min_count(0.5, 0.25) == 2  # 0.5^2 = 0.25 exactly
    assert C.min_count(1.0, 0.05) == math.inf
    with pytest.raises(ValueError):
        C.min_count(0.9, 1.0)


def test_fallback_reject_by_hand():
    # Level 0.1, weights (0.5, 0, 0.5, 0): point 0 at 0.05 rejects (0.04) and carries 0.05;
    # point 1 at 0.05 fails (0.06) and forfeits; point 2 at its own 0.05 rejects (0.01) and
    # carries it; point 3 at 0.05 rejects (0.05).
    p = [0.04, 0.06, 0.01, 0.05]
    np.testing.assert_array_equal(C.fallback_reject(p, [0.5, 0, 0.5, 0], 0.1),
                                  [True, False, True, True])
    # All weight first: fixed-sequence testing stops at the first failure.
    np.testing.assert_array_equal(C.fallback_reject(p, [1, 0, 0, 0], 0.1),
                                  [True, True, True, True])
    np.testing.assert_array_equal(C.fallback_reject([0.2, 0.01], [1, 0], 0.1), [False, False])
    np.testing.assert_array_equal(C.fixed_sequence([0.01, 0.2, 0.01], 0.05),
                                  [True, False, False])
    with pytest.raises(ValueError, match="sum"):
        C.fallback_reject([0.1, 0.1], [0.7, 0.7], 0.1)


def test_certify_precision_tests_label_free_counts_from_the_top():
    rng = np.random.default_rng(1)
    y = rng.random(2000) < np.linspace(0.99, 0.7, 2000)
    n = np.arange(1, 2001)
    tp = np.cumsum(y)
    ok, p = C.certify_precision(tp, n, 0.9, 0.05)
    tested = ~np.isnan(p)
    # The tested points depend on the counts only: relabelling leaves them unchanged.
    _, p2 = C.certify_precision(np.cumsum(rng.random(2000) < 0.5), n, 0.9, 0.05)
    np.testing.assert_array_equal(tested, ~np.isnan(p2))
    # Nothing below the smallest count that can reject is tested (label-free skip).
    assert n[tested].min() >= C.min_count(0.9, 0.05 / C.CHECKPOINTS)
    # Every certified point passed its exact test at no more than the whole level.
    assert ok.any() and np.all(p[ok] <= 0.05)
    assert np.all(tp[ok] / n[ok] > 0.9)
    # A short curve keeps one sequence at the whole level: 29 of 29 is certified at 0.05.
    ok, _ = C.certify_precision(np.arange(1, 31), np.arange(1, 31), 0.9, 0.05)
    assert ok[28] and not ok[27]


def test_certify_recall_fixed_sequence_from_the_bottom():
    # 100 boxes; tp by descending threshold, tested from the bottom. Target 0.9: 95 of 100
    # has P(Bin(100, .9) >= 95) = 0.0576 > 0.05 and fails at once. Target 0.85: 95 passes
    # (0.0016), 91 fails (0.0551), and the sequence stops there although 80 would fail too.
    tp = np.array([50, 80, 91, 95])
    ok, _ = C.certify_recall(tp, 100, 0.9, 0.05)
    assert not ok.any()
    ok, p = C.certify_recall(tp, 100, 0.85, 0.05)
    np.testing.assert_array_equal(ok, [False, False, False, True])
    assert p[3] == pytest.approx(stats.binom.sf(94, 100, 0.85))
    assert p[2] == pytest.approx(0.0551, abs=1e-4)


def test_critical_count_and_pass_probability():
    n = np.array([29, 100, 377, 1000])
    k = C.critical_count(n, 0.9, 0.05)
    # k is the smallest count whose p-value is <= 0.05.
    assert np.all(C.binomial_pvalue(k, n, 0.9) <= 0.05)
    assert np.all(C.binomial_pvalue(k - 1, n, 0.9) > 0.05)
    assert C.critical_count(np.array([28]), 0.9, 0.05)[0] == 29  # n + 1: cannot reject
    got = C.pass_probability(np.array([0.95, 0.95]), np.array([100, 28]), 0.9, 0.05)
    assert got[0] == pytest.approx(stats.binom.sf(k[1] - 1, 100, 0.95)) and got[1] == 0.0


def test_boxes_to_certify():
    # 9 of 9 on 12 boxes: 29 of 29 detections pass at 0.05 (0.9^29 = 0.047), i.e.
    # ceil(29 * 12 / 9) = 39 boxes.
    assert C.boxes_to_certify(np.arange(1, 10), np.arange(1, 10), 12, 0.9, 0.05) == 39
    # Never above the target: more of the same data cannot certify it.
    assert C.boxes_to_certify([0, 1, 2], [1, 2, 4], 10, 0.9, 0.05) is None


def test_predictive_pass_probability_accounts_for_thin_learn_evidence():
    # Jeffreys posterior Beta(t + 1/2, f + 1/2), certify count beta-binomial (its
    # tail is summed exactly when it is short, as here).
    n = np.array([100])
    k = C.critical_count(n, 0.9, 0.05)[0]
    got = C.predictive_pass_probability([95], [5], n, 0.9, 0.05)[0]
    assert got == pytest.approx(stats.betabinom.sf(k - 1, 100, 95.5, 5.5), rel=1e-9)
    # The same 95% seen on 20 instead of 100 detections predicts a lower chance of passing
    # (here; the posterior is wider), and both sit below the plug-in binomial's.
    thin = C.predictive_pass_probability([19], [1], n, 0.9, 0.05)[0]
    plug_in = C.pass_probability(np.array([0.95]), n, 0.9, 0.05)[0]
    assert thin < got < plug_in


def test_tp_chance_model_recovers_a_known_logistic_and_survives_separable_data():
    # TP chance sigmoid(2 + 1.5 logit(s)) on 4,000 seeded detections: the fit is close to it
    # at every score, and its posterior narrows around it.
    rng = np.random.default_rng(3)
    s = rng.beta(2.0, 2.0, 4000)
    z = np.log(s) - np.log1p(-s)
    y = rng.random(s.size) < 1.0 / (1.0 + np.exp(-(2.0 + 1.5 * z)))
    model = C.TpChanceModel.fit(s, y)
    grid = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    gz = np.log(grid) - np.log1p(-grid)
    truth = 1.0 / (1.0 + np.exp(-(2.0 + 1.5 * gz)))
    draws = model.draw_chances(grid, 400, np.random.default_rng(0))
    np.testing.assert_allclose(np.median(draws, axis=0), truth, atol=0.03)
    assert np.all(draws.std(axis=0) < 0.03)
    # All TP (separable): finite, the chance high, and wider on 10 detections than on 200.
    thin = C.TpChanceModel.fit(np.linspace(0.9, 0.99, 10), np.ones(10, bool))
    thick = C.TpChanceModel.fit(np.linspace(0.9, 0.99, 200), np.ones(200, bool))
    assert np.all(np.isfinite(thin.beta)) and np.all(np.isfinite(thin.cov))
    d_thin = thin.draw_chances([0.95], 2000, np.random.default_rng(1))
    d_thick = thick.draw_chances([0.95], 2000, np.random.default_rng(1))
    assert np.median(d_thin) > 0.95 and np.quantile(d_thin, 0.1) < np.quantile(d_thick, 0.1)
    with pytest.raises(ValueError, match="score and tp"):
        C.TpChanceModel.fit([], [])


def _constant_model(q):
    """A model with TP chance q at every score and no posterior spread."""
    logit = math.log(q / (1.0 - q))
    return C.TpChanceModel(np.array([logit, 0.0, 0.0]), np.zeros((3, 3)), 0.0, 1.0)


def test_plan_precision_run_matches_the_exact_expectation():
    # TP chance q everywhere, tested counts 29 and 58 (the second 29 of 58 detections enter
    # there). Start 0 passes iff all 29 are TP (k0 = 29 at 0.05); the run then reaches point 1
    # iff its count X + 29 >= k1, X ~ Binomial(29, q): value_0 = q^29 * E[X + 29 if it passes,
    # else 29]. Start 1 alone: value_1 = E[T 1{T >= k1}], T ~ Binomial(58, q).
    q, level = 0.97, 0.05
    n = np.array([29, 58])
    k0, k1 = C.critical_count(n, 0.9, level)
    assert k0 == 29
    x = np.arange(30)
    px = stats.binom.pmf(x, 29, q)
    v0 = np.where(x + 29 >= k1, x + 29, 29)
    want0 = q ** 29 * np.sum(px * v0)
    sd0 = math.sqrt(q ** 29 * np.sum(px * v0 ** 2) - want0 ** 2)
    t = np.arange(59)
    pt = stats.binom.pmf(t, 58, q)
    want1 = np.sum(pt * t * (t >= k1))
    sd1 = math.sqrt(np.sum(pt * (t * (t >= k1)) ** 2) - want1 ** 2)
    thr = np.linspace(0.99, 0.5, 58)  # one detection per threshold
    got = C.plan_precision_run(_constant_model(q), thr, np.arange(1, 59), np.array([28, 57]),
                               0.9, level)
    # Monte Carlo over PLAN_DRAWS draws (seeded): within 4 standard errors of the exact value.
    assert got[0] == pytest.approx(want0, abs=4 * sd0 / math.sqrt(C.PLAN_DRAWS))
    assert got[1] == pytest.approx(want1, abs=4 * sd1 / math.sqrt(C.PLAN_DRAWS))
    assert got[1] > got[0]  # 58 detections at 0.97 pass far more often than 29 of 29
    # A hopeless rate certifies nothing anywhere; no tested point, no value.
    assert np.all(C.plan_precision_run(_constant_model(0.8), thr, np.arange(1, 59),
                                       np.array([28, 57]), 0.9, level) == 0.0)
    assert C.plan_precision_run(_constant_model(0.97), thr, np.arange(1, 59),
                                np.zeros(0, np.int64), 0.9, level).shape == (0,)
