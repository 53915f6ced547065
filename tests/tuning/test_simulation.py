"""Tests of tfcal.tuning.simulation: the exact curves against hand-derived values, quadrature and
Monte Carlo; the structure of simulated tune sets (duplicates and crowds grow with the NMS IoU,
seeded determinism, grid independence, an empty class); and the coverage bookkeeping."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
from scipy import integrate, stats

from tfcal.tuning.search import Objective, joint_search
from tfcal.tuning.simulation import (
    ClassModel,
    CoverageResult,
    coverage,
    coverage_runs,
    default_scenario,
    expected_counts,
    simulate,
    true_precision,
    true_recall,
)


def hand_model(**kw):
    """Scores with polynomial survival functions, so every curve is a hand-derivable number.

    TP ~ Beta(2, 1): S_tp(t) = 1 - t^2. Background FP ~ Beta(1, 1): 1 - t. Confident FP ~
    Beta(2, 1): 1 - t^2. At NMS IoU 0.5 (= dup_mid = crowd_mid) dup_prob = 0.6 / 2 = 0.3 and
    crowd_keep = 1/2, so r = 1 - 0.5 (1 - 1/2) = 0.75 of the detected boxes survive.
    Duplicate score s U, U ~ U(0.5, 1): for t <= 0.5 the score passes for sure when s >= 2t and
    with probability 2 (1 - t/s) when t <= s < 2t, so
    D(t) = (1 - 4t^2) + 2 int_t^2t 2s (1 - t/s) ds = 1 - 4t^2 + 2t^2 = 1 - 2t^2;
    for t > 0.5, D(t) = 2 int_t^1 (2s - 2t) ds = 2 (1 - t)^2.
    """
    params = dict(name="hand", num_gt=100, detect_prob=0.8, a_tp=2.0, b_tp=1.0, fp_rate=0.5,
                  a_fp=1.0, b_fp=1.0, hard_fp_rate=0.1, a_hard=2.0, b_hard=1.0, dup_max=0.6,
                  dup_mid=0.5, dup_lo=0.5, crowd_frac=0.5, crowd_mid=0.5)
    params.update(kw)
    return ClassModel(**params)


def _hand_counts(t):
    """Per box at IoU 0.5: TP = 0.8 * 0.75 (1 - t^2); FP = 0.5 (1 - t) + 0.1 (1 - t^2)
    + 0.8 * 0.75 * 0.3 D(t)."""
    d = 1 - 2 * t * t if t <= 0.5 else 2 * (1 - t) ** 2
    return 0.6 * (1 - t * t), 0.5 * (1 - t) + 0.1 * (1 - t * t) + 0.18 * d


@pytest.mark.parametrize("t", [0.0, 0.1, 0.3, 0.5, 0.6, 0.9, 0.99])
def test_curves_match_the_hand_derivation(t):
    # e.g. t = 0.6: TP 0.384, FP 0.2 + 0.064 + 0.18 * 0.32 = 0.3216, precision 0.384 / 0.7056.
    tp, fp = _hand_counts(t)
    m = hand_model()
    got_tp, got_fp = expected_counts(m, [t], 0.5)
    # The float32 cut moves the threshold by < 3e-8, so a curve by < 3e-8 times its slope
    # (< 2, here): far below this tolerance.
    np.testing.assert_allclose(got_tp, [tp], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_fp, [fp], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(true_precision(m, [t], 0.5), [tp / (tp + fp)], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(true_recall(m, [t], 0.5), [tp], rtol=1e-6, atol=1e-7)


def test_hand_values_at_t_0_6():
    # The worked example of the docstring, written out.
    np.testing.assert_allclose(true_precision(hand_model(), 0.6, 0.5), 0.384 / 0.7056,
                               rtol=1e-6)


def test_curves_are_vectorized_and_zero_above_one():
    m = hand_model()
    t = np.array([[0.2, 0.4], [0.7, 1.5]])
    p = true_precision(m, t, 0.5)
    assert p.shape == (2, 2)
    assert p[1, 1] == 0.0 and true_recall(m, t, 0.5)[1, 1] == 0.0  # nothing scores >= 1.5
    for idx in np.ndindex(2, 2):
        if t[idx] <= 1:
            tp, fp = _hand_counts(t[idx])
            np.testing.assert_allclose(p[idx], tp / (tp + fp), rtol=1e-6)


def test_iou_moves_crowds_and_duplicates():
    lo, hi = 0.3, 0.8
    # Duplicates only: the same true positives, more false positives at the higher IoU.
    dups = hand_model(crowd_frac=0.0)
    (tp_lo, fp_lo), (tp_hi, fp_hi) = (expected_counts(dups, 0.5, g) for g in (lo, hi))
    assert tp_hi == tp_lo and fp_hi > fp_lo
    # Crowds only: more true positives (recall), the same false positives.
    crowds = hand_model(dup_max=0.0)
    (tp_lo, fp_lo), (tp_hi, fp_hi) = (expected_counts(crowds, 0.5, g) for g in (lo, hi))
    assert tp_hi > tp_lo and fp_hi == fp_lo
    m = hand_model()
    assert m.dup_prob(hi) > m.dup_prob(lo) and m.crowd_keep(hi) > m.crowd_keep(lo)


@pytest.mark.parametrize("a, b, lo", [(3.0, 1.5, 0.5), (6.0, 1.5, 0.3), (1.5, 4.0, 0.0)])
def test_duplicate_score_term_matches_quadrature(a, b, lo):
    # D(t) = P(s U >= t) = int f(s) P(U >= t / s) ds, integrated numerically.
    m = hand_model(a_tp=a, b_tp=b, dup_lo=lo, fp_rate=0.0, hard_fp_rate=0.0, crowd_frac=0.0,
                   dup_max=1.0, dup_width=1e-3)  # dup_prob(0.9) = 1 up to e^-400
    ts = np.array([0.05, 0.2, 0.45, 0.7, 0.95])
    _, fp = expected_counts(m, ts, 0.9)

    def d(t):
        def integrand(s):
            return stats.beta.pdf(s, a, b) * np.clip((1 - t / s) / (1 - lo), 0.0, 1.0)
        points = [t / lo] if lo > 0 and t / lo < 1 else None
        return integrate.quad(integrand, t, 1.0, points=points, epsabs=1e-12, limit=200)[0]

    np.testing.assert_allclose(fp / m.detect_prob, [d(t) for t in ts], rtol=1e-6, atol=1e-9)


def test_thresholds_are_compared_in_float32():
    m = default_scenario()[7]
    t32 = float(np.float32(0.7))
    # Any float64 threshold in (previous float32, t32] selects the same float32 scores.
    just_below = t32 - 0.25 * (t32 - float(np.nextafter(np.float32(t32), np.float32(0))))
    assert true_recall(m, just_below, 0.5) == true_recall(m, t32, 0.5)
    # A rounded score can be exactly 1.0: its probability is P(s >= 1 - 2^-25).
    top = true_recall(m, 1.0, 0.5)
    np.testing.assert_allclose(top, m.detect_prob * stats.beta.sf(1 - 2.0 ** -25, m.a_tp, m.b_tp),
                               rtol=1e-6)
    assert top > 0 and true_precision(m, 1.0, 0.5) > 0


def _mc_check(model, thresholds, nms_iou, seed, z=4.0):
    """Empirical TP, FP and precision of one huge set against the exact curves, each within
    `z` standard errors. Per box TP is Bernoulli(tp), so Var = tp (1 - tp); FP is Poisson plus
    a Bernoulli duplicate, so Var <= fp. The precision SE is the delta method's, dropping the
    (negative) TP-FP covariance term of the duplicates, so it is an upper bound."""
    n = model.num_gt
    md = simulate([model], [nms_iou], np.random.default_rng(seed))[nms_iou]
    s = md.score[:, None]
    t32 = np.asarray(thresholds, np.float32)[None, :]
    emp_tp = (md.tp[:, None] & (s >= t32)).sum(0) / n
    emp_fp = (~md.tp[:, None] & (s >= t32)).sum(0) / n
    tp, fp = expected_counts(model, thresholds, nms_iou)
    assert np.all(np.abs(emp_tp - tp) <= z * np.sqrt(tp * (1 - tp) / n))
    assert np.all(np.abs(emp_fp - fp) <= z * np.sqrt(fp / n))
    se_p = np.sqrt((fp ** 2 * tp * (1 - tp) + tp ** 2 * fp) / n) / (tp + fp) ** 2
    emp_p = emp_tp / (emp_tp + emp_fp)
    assert np.all(np.abs(emp_p - true_precision(model, thresholds, nms_iou)) <= z * se_p)


@pytest.mark.parametrize("column, nms_iou, seed", [(4, 0.4, 0), (4, 0.7, 1), (8, 0.5, 2),
                                                    (8, 0.7, 3), (9, 0.6, 4), (5, 0.5, 5)])
def test_monte_carlo_matches_the_exact_curves(column, nms_iou, seed):
    model = dataclasses.replace(default_scenario()[column], num_gt=200_000)
    _mc_check(model, [0.05, 0.3, 0.5, 0.7, 0.85, 0.95], nms_iou, seed)


def test_monte_carlo_hand_model():
    _mc_check(hand_model(num_gt=200_000), [0.0, 0.2, 0.5, 0.6, 0.9], 0.5, seed=7)


def _scores(md, col, tp):
    m = (md.column == col) & (md.tp == tp)
    return np.sort(md.score[m])


def _is_sub_multiset(a, b):
    return not Counter(a.tolist()) - Counter(b.tolist())


def test_higher_iou_keeps_a_superset():
    grid = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    models = [dataclasses.replace(m, num_gt=2000) for m in default_scenario()[7:]]
    sets = simulate(models, grid, np.random.default_rng(11))
    for col, m in enumerate(models):
        n_tp, n_fp = [], []
        for lo, hi in zip(grid[:-1], grid[1:]):
            for tp in (True, False):
                assert _is_sub_multiset(_scores(sets[lo], col, tp), _scores(sets[hi], col, tp))
        for g in grid:
            n_tp.append(_scores(sets[g], col, True).size)
            n_fp.append(_scores(sets[g], col, False).size)
        assert n_fp[-1] > n_fp[0]  # duplicates grow with the IoU
        if m.crowd_frac == 0:
            assert len(set(n_tp)) == 1  # no crowds: the same true positives at every IoU
        else:
            assert n_tp[-1] > n_tp[0]  # crowded boxes are found at a higher IoU


def test_duplicates_score_below_their_true_positive():
    # One class, no background: every false positive is a duplicate, and the duplicates'
    # scores are below the top true positive.
    m = hand_model(num_gt=500, fp_rate=0.0, hard_fp_rate=0.0, crowd_frac=0.0)
    md = simulate([m], [0.8], np.random.default_rng(3))[0.8]
    assert 0 < (~md.tp).sum() <= md.tp.sum()
    assert md.score[~md.tp].max() <= md.score[md.tp].max()


def test_seeded_determinism_and_grid_independence():
    scenario = default_scenario()
    a = simulate(scenario, [0.4, 0.5, 0.6, 0.7], np.random.default_rng(5))
    b = simulate(scenario, [0.4, 0.5, 0.6, 0.7], np.random.default_rng(5))
    wide = simulate(scenario, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], np.random.default_rng(5))
    other = simulate(scenario, [0.4, 0.5, 0.6, 0.7], np.random.default_rng(6))
    assert list(a) == [0.4, 0.5, 0.6, 0.7]
    for g in a:
        for field in ("score", "column", "tp", "ignored", "num_gt"):
            np.testing.assert_array_equal(getattr(a[g], field), getattr(b[g], field))
            np.testing.assert_array_equal(getattr(a[g], field), getattr(wide[g], field))
        assert not np.array_equal(a[g].score[:50], other[g].score[:50])
    np.testing.assert_array_equal(a[0.5].num_gt, [m.num_gt for m in scenario])
    assert not any(md.ignored.any() for md in a.values())


def test_class_with_no_ground_truth():
    empty = hand_model(name="empty", num_gt=0)
    full = hand_model(num_gt=50)
    sets = simulate([full, empty], [0.4, 0.6], np.random.default_rng(0))
    for md in sets.values():
        assert md.num_gt.tolist() == [50, 0]
        assert not np.any(md.column == 1)  # false positives come per box: none without boxes
    # The curves are per box: the same for any num_gt.
    t = np.linspace(0, 1, 11)
    np.testing.assert_array_equal(true_precision(empty, t, 0.5), true_precision(full, t, 0.5))
    result = joint_search(sets, Objective(confidence=0.95))
    assert result.classes[1].status == "insufficient_data"


@pytest.mark.parametrize("field, value", [
    ("num_gt", -1), ("num_gt", 2.5), ("detect_prob", 1.2), ("a_tp", 1.0), ("b_tp", 0.0),
    ("fp_rate", -0.1), ("fp_rate", float("nan")), ("a_fp", 0.0), ("dup_max", -0.1),
    ("dup_lo", 1.0), ("dup_width", 0.0), ("crowd_frac", 2.0), ("crowd_mid", float("inf")),
])
def test_class_model_validation(field, value):
    with pytest.raises(ValueError, match=field):
        hand_model(**{field: value})


def test_simulate_validation():
    with pytest.raises(ValueError, match="models"):
        simulate([], [0.5], np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct"):
        simulate([hand_model()], [0.5, 0.5], np.random.default_rng(0))


def test_default_scenario_figures():
    """The figures the scenario's docstring promises, recomputed on a coarser grid."""
    scenario = default_scenario()
    assert [m.num_gt for m in scenario] == [5, 10, 20, 50, 100, 200, 300, 500, 500, 500]
    t = np.linspace(0, 1, 1001)
    grid = (0.4, 0.5, 0.6, 0.7)
    max_p = {m.name: max(true_precision(m, t, g).max() for g in grid) for m in scenario}
    assert 0.91 <= max_p["just-50"] <= 0.935 and 0.91 <= max_p["just-300"] <= 0.935
    assert max_p["never-200"] < 0.85
    assert all(max_p[n] >= 0.96 for n in ("easy-500", "crowd-500", "dup-500"))
    assert sum(true_precision(m, 1.0, 0.5) < 1.0 for m in scenario) >= 6  # confident FPs


# ----------------------------------------------------------------------------------------------
# Coverage bookkeeping


def _result(enabled, precision, recall, judged=(True, True), objective=Objective()):
    enabled = np.asarray(enabled, bool)
    k = enabled.shape[1]
    return CoverageResult(objective, "per_class", (0.5,), tuple("ab"[:k]),
                          np.full(k, 100), np.asarray(judged), 0.9, enabled,
                          np.where(enabled, 0.5, np.nan), np.where(enabled, 0.5, np.nan),
                          np.asarray(precision, float), np.asarray(recall, float))


def test_coverage_summaries_by_hand():
    # 4 sets x 2 classes. Class a: enabled in 3 sets, precision 0.95, 0.85, 0.92 -> covered in
    # sets 0, 2, 3 (set 3 disabled): coverage 3/4, conditional 2/3. Class b: never enabled:
    # coverage 1, conditional NaN. Simultaneous: sets 0, 2, 3 -> 3/4.
    r = _result([[1, 0], [1, 0], [1, 0], [0, 0]],
                [[0.95, 0], [0.85, 0], [0.92, 0], [0, 0]],
                [[0.6, 0], [0.8, 0], [0.7, 0], [0, 0]])
    np.testing.assert_allclose(r.class_coverage, [0.75, 1.0])
    np.testing.assert_allclose(r.class_coverage_se, [np.sqrt(0.75 * 0.25 / 4), 0.0])
    np.testing.assert_allclose(r.conditional_coverage[0], 2 / 3)
    assert np.isnan(r.conditional_coverage[1])
    np.testing.assert_allclose(r.enabled_rate, [0.75, 0.0])
    assert r.simultaneous_coverage == 0.75
    np.testing.assert_allclose(r.mean_recall, [2.1 / 4, 0.0])
    np.testing.assert_allclose(r.mean_precision, [2.72 / 4, 0.0])


def test_simultaneous_coverage_skips_unjudged_classes():
    r = _result([[1, 1], [1, 1]], [[0.95, 0.5], [0.95, 0.5]], [[0.5, 0.5], [0.5, 0.5]],
                judged=(True, False))
    assert r.simultaneous_coverage == 1.0
    np.testing.assert_allclose(r.class_coverage, [1.0, 0.0])


def test_recall_target_judges_recall():
    r = _result([[1, 1]], [[0.5, 0.99]], [[0.95, 0.85]],
                objective=Objective("recall_target", target_recall=0.9))
    np.testing.assert_allclose(r.class_coverage, [1.0, 0.0])


def test_coverage_runs_match_single_runs_and_budget_names():
    scenario = [dataclasses.replace(m, num_gt=60) for m in default_scenario()[7:9]]
    grid = [0.4, 0.6]
    obj = Objective(confidence=0.95)
    both = coverage_runs(scenario, [(obj, "per_class"), (obj, "simultaneous")], grid, 6, 3)
    alone = coverage(scenario, obj, grid, 6, 3, "per_class")
    simul = coverage(scenario, obj, grid, 6, 3, "simultaneous")
    np.testing.assert_array_equal(both[0].enabled, alone.enabled)
    np.testing.assert_array_equal(both[0].precision, alone.precision)
    np.testing.assert_array_equal(both[1].min_score_thresh, simul.min_score_thresh)
    assert simul.budget == "simultaneous" and both[1].budget == "simultaneous"
    with pytest.raises(ValueError, match="budget"):
        coverage(scenario, obj, grid, 6, 3, "bonferroni")
    # With a learn split the certified run searches the certify part, planned by the learn part.
    learned = coverage(scenario, obj, grid, 6, 3, learn_fraction=0.3)
    assert learned.num_sets == 6 and learned.enabled.shape == alone.enabled.shape
    assert alone.num_sets == 6
    # True metrics are read at the chosen points.
    s, c = np.argwhere(alone.enabled)[0]
    np.testing.assert_allclose(
        alone.precision[s, c],
        true_precision(scenario[c], alone.min_score_thresh[s, c], alone.nms_iou[s, c]))


@pytest.mark.parametrize("kw, match", [
    (dict(budget="bogus"), "budget"), (dict(num_sets=0), "num_sets"), (dict(seed=-1), "seed"),
    (dict(objective=Objective("f1")), "precision_target or recall_target"),
])
def test_coverage_validation(kw, match):
    args = dict(scenario=[hand_model()], objective=Objective(), grid=[0.5], num_sets=2, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        coverage(**args)
