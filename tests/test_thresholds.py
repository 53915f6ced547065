"""Tests for tfcal.thresholds: hand-derived operating points, a brute-force reference, bounds."""

import math

import numpy as np
import pytest
import scipy.special  # noqa: F401  (imported here so its start-up is not timed in a test)

from tfcal import thresholds as th

# Five scores, P = 3 positives, N = 2 negatives. At each candidate threshold:
#   thr  tp fp fn | precision recall  F1 = 2tp/(2tp+fp+fn)
#   0.9   1  0  2 |   1        1/3    2/4 = 0.5
#   0.8   2  0  1 |   1        2/3    4/5 = 0.8
#   0.7   2  1  1 |   2/3      2/3    4/6 = 0.667
#   0.6   3  1  0 |   3/4      1      6/7 = 0.857
#   0.5   3  2  0 |   3/5      1      6/8 = 0.75
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
LABELS = np.array([1, 1, 0, 1, 0])


def test_f1_golden():
    r = th.select_threshold(SCORES, LABELS, "f1")
    assert r.threshold == 0.6 and r.feasible
    assert (r.tp, r.fp, r.fn, r.tn) == (3, 1, 0, 1)
    assert r.value == pytest.approx(6 / 7) and r.f1 == pytest.approx(6 / 7)
    assert r.precision == pytest.approx(0.75) and r.recall == 1.0


def test_order_of_input_does_not_matter():
    perm = np.array([3, 0, 4, 1, 2])
    assert th.select_threshold(SCORES[perm], LABELS[perm]) == th.select_threshold(SCORES, LABELS)


def test_fbeta_golden():
    # beta = 0.5, b2 = 0.25: F = 1.25 tp / (1.25 tp + 0.25 fn + fp):
    # 0.9: 1.25/1.75 = .714; 0.8: 2.5/2.75 = .909; 0.7: 2.5/3.75 = .667; 0.6: 3.75/4.75 = .789;
    # 0.5: 3.75/5.75 = .652 -> 0.8 with 10/11.
    r = th.select_threshold(SCORES, LABELS, th.ThresholdObjective("fbeta", beta=0.5))
    assert r.threshold == 0.8 and r.value == pytest.approx(10 / 11)


def test_youden_golden():
    # TPR - FPR: 0.9: 1/3; 0.8: 2/3; 0.7: 2/3 - 1/2; 0.6: 1 - 1/2; 0.5: 0 -> 0.8.
    r = th.select_threshold(SCORES, LABELS, "youden")
    assert r.threshold == 0.8 and r.value == pytest.approx(2 / 3)


def test_cost_golden():
    # c_fp = 1, c_fn = 5: cost = fp + 5 fn: 10, 5, 6, 1, 2 -> 0.6, mean cost 1/5 = 0.2.
    r = th.select_threshold(SCORES, LABELS, th.ThresholdObjective("cost", c_fp=1.0,
                                                                  c_fn=5.0))
    assert r.threshold == 0.6 and r.value == pytest.approx(0.2)


@pytest.mark.parametrize("target, threshold, recall", [
    (0.75, 0.6, 1.0),      # precision >= .75 at 0.9, 0.8, 0.6; best recall at 0.6
    (0.8, 0.8, 2 / 3),     # only 0.9 and 0.8 qualify; 0.8 has more recall
    (1.0, 0.8, 2 / 3),
])
def test_precision_target_golden(target, threshold, recall):
    r = th.select_threshold(SCORES, LABELS,
                            th.ThresholdObjective("precision_target", target=target))
    assert r.feasible and r.threshold == threshold and r.value == pytest.approx(recall)
    assert r.precision >= target


def test_recall_target_golden_and_infeasible():
    # recall >= 0.9 at 0.6 (precision 3/4) and 0.5 (3/5) -> 0.6
    r = th.select_threshold(SCORES, LABELS, th.ThresholdObjective("recall_target", target=0.9))
    assert r.threshold == 0.6 and r.value == pytest.approx(0.75)
    # with 4 ground truths the best recall is 3/4: infeasible, and says so
    r = th.select_threshold(SCORES, LABELS, th.ThresholdObjective("recall_target", target=0.9),
                            num_positives=4)
    assert not r.feasible and r.threshold is None and math.isnan(r.value)
    assert "no threshold reaches recall >= 0.9" in r.message and "0.7500" in r.message


def test_num_positives_counts_undetected_ground_truths():
    # 4 ground truths: fn += 1. F1 = 2tp / (2tp + fp + fn): 2/5, 4/6, 4/7, 6/8, 6/9 -> 0.6.
    r = th.select_threshold(SCORES, LABELS, "f1", num_positives=4)
    assert r.threshold == 0.6 and (r.tp, r.fn) == (3, 1)
    assert r.recall == pytest.approx(0.75) and r.value == pytest.approx(0.75)


def test_ties_go_together():
    # Scores 0.9, 0.5, 0.5, 0.1 with labels 1, 1, 0, 0. The two 0.5s are one candidate:
    # 0.9: tp1 fp0 fn1 F1 2/3; 0.5: tp2 fp1 fn0 F1 4/5; 0.1: tp2 fp2 F1 4/6 -> 0.5 with fp = 1.
    r = th.select_threshold([0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0])
    assert r.threshold == 0.5 and (r.tp, r.fp) == (2, 1)
    # an infeasible precision: the tie cannot be split to reach precision 1 with recall 1
    r = th.select_threshold([0.5, 0.5], [1, 0],
                            th.ThresholdObjective("precision_target", target=0.9))
    assert not r.feasible and r.threshold is None
    assert "best is 0.5000 at threshold 0.5" in r.message


def _brute_force(s, y, objective, P, **kw):
    best, best_t = -np.inf, None
    N = int((y == 0).sum())
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int((pred & (y == 1)).sum())
        fp = int((pred & (y == 0)).sum())
        fn = P - tp
        prec, rec = tp / (tp + fp), tp / P
        if objective == "f1":
            v = 2 * tp / (2 * tp + fp + fn)
        elif objective == "youden":
            v = tp / P - fp / N
        elif objective == "cost":
            v = -(kw["c_fp"] * fp + kw["c_fn"] * fn)
        elif objective == "precision_target":
            v = rec if prec >= kw["target"] else -np.inf
        else:
            v = prec if rec >= kw["target"] else -np.inf
        if v > best + 1e-12:
            best, best_t = v, t
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("objective, kw", [
    ("f1", {}), ("youden", {}), ("cost", {"c_fp": 1.0, "c_fn": 3.0}),
    ("precision_target", {"target": 0.7}), ("recall_target", {"target": 0.8}),
])
def test_matches_brute_force_with_ties(seed, objective, kw):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(300), 2)  # many ties
    y = (rng.random(300) < s).astype(int)
    r = th.select_threshold(s, y, th.ThresholdObjective(objective, **kw))
    expect = _brute_force(s, y, objective, int(y.sum()), **kw)
    assert r.threshold == expect
    pred = s >= r.threshold
    assert r.tp == int((pred & (y == 1)).sum()) and r.fp == int((pred & (y == 0)).sum())


def test_clopper_pearson_golden():
    # k = 0: upper solves (1 - u)^n = alpha/2 -> u = 1 - 0.025^(1/10) = 0.30850 (n = 10).
    # k = n: lower solves l^n = alpha/2 -> l = 0.025^(1/10) = 0.69150.
    lo, hi = th.clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1)
    lo, hi = th.clopper_pearson(10, 10)
    assert lo == pytest.approx(0.025 ** 0.1) and hi == 1.0
    # one-sided: l^n = alpha -> 0.05^(1/10)
    assert th.clopper_pearson(10, 10, sided="one")[0] == pytest.approx(0.05 ** 0.1)
    assert th.clopper_pearson(0, 0) == (0.0, 1.0)
    # vectorized, and symmetric: lower(k, n) = 1 - upper(n - k, n)
    k = np.array([0, 3, 7, 10])
    lo, hi = th.clopper_pearson(k, 10, 0.9)
    lo2, hi2 = th.clopper_pearson(10 - k, 10, 0.9)
    np.testing.assert_allclose(lo, 1 - hi2, atol=1e-12)
    assert lo.shape == (4,) and np.all(lo <= k / 10) and np.all(hi >= k / 10)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        th.clopper_pearson(5, 3)


def test_precision_target_with_confidence_is_certified():
    # Labels by descending score: 20 TP, 1 FP, 2 TP, 7 FP. Point precision >= 0.85 holds down to
    # the 23rd score (22/23 = 0.957, recall 1). Certified at delta 0.05: 30 scores leave room
    # for one fixed sequence (two shares would need 2 x 23 detections), starting at the
    # smallest count that can reject, ceil(log 0.05 / log 0.85) = 19. P(Bin(19, .85) >= 19) =
    # 0.85^19 = 0.0456 and 0.85^20 = 0.0388 pass; at 20 of 21, P(Bin(21, .85) >= 20) = 0.1096
    # fails and the sequence stops: the 20th score.
    s = np.linspace(1.0, 0.01, 30)
    y = np.array([1] * 20 + [0] + [1] * 2 + [0] * 7)
    r = th.select_threshold(s, y, th.ThresholdObjective("precision_target", target=0.85))
    assert r.threshold == s[22] and r.precision == pytest.approx(22 / 23) and r.recall == 1.0
    r = th.select_threshold(s, y, th.ThresholdObjective("precision_target", target=0.85,
                                                        confidence=0.95))
    assert r.feasible and r.threshold == s[19] and r.tp == 20
    assert r.precision_lower == pytest.approx(0.05 ** (1 / 20))
    assert r.precision_lower == pytest.approx(th.clopper_pearson(20, 20, 0.95, sided="one")[0])
    # 0.9 needs 29 of 29 (0.9^29 = 0.047): the 21st label is an FP, so nothing certifies.
    r = th.select_threshold(s, y, th.ThresholdObjective("precision_target", target=0.9,
                                                        confidence=0.95))
    assert not r.feasible and r.threshold is None
    assert "certified precision" in r.message and "0.8609" in r.message


def test_precision_recall_at_thresholds():
    c = th.precision_recall_at_thresholds(SCORES, LABELS, num_positives=4)
    np.testing.assert_array_equal(c.thresholds, SCORES)
    np.testing.assert_array_equal(c.tp, [1, 2, 2, 3, 3])
    np.testing.assert_array_equal(c.fp, [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(c.fn, [3, 2, 2, 1, 1])
    np.testing.assert_allclose(c.recall, [0.25, 0.5, 0.5, 0.75, 0.75])
    with pytest.raises(ValueError, match="non-increasing"):
        th.precision_recall_at_thresholds(SCORES[::-1], LABELS[::-1])


def test_cost_threshold():
    assert th.cost_threshold(1, 3) == 0.25
    # on calibrated probabilities the empirical cost optimum is near c_fp / (c_fp + c_fn)
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    r = th.select_threshold(p, y, th.ThresholdObjective("cost", c_fp=1.0, c_fn=3.0))
    assert abs(r.threshold - 0.25) < 0.05
    with pytest.raises(ValueError, match="c_fp"):
        th.cost_threshold(-1, 1)


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        th.select_threshold([], [])
    with pytest.raises(ValueError, match="non-finite"):
        th.select_threshold([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="objective"):
        th.select_threshold(SCORES, LABELS, "accuracy")
    with pytest.raises(ValueError, match="target: required"):
        th.select_threshold(SCORES, LABELS, "precision_target")
    with pytest.raises(ValueError, match="beta: must be a finite number > 0"):
        th.ThresholdObjective("fbeta", beta=0.0)
    with pytest.raises(ValueError, match="confidence: must be in"):
        th.ThresholdObjective("precision_target", target=0.9, confidence=1.5)
    with pytest.raises(ValueError, match="num_positives"):
        th.select_threshold(SCORES, LABELS, num_positives=2)
    with pytest.raises(ValueError, match="needs at least one positive"):
        th.select_threshold(SCORES, np.zeros(5))
    with pytest.raises(ValueError, match="needs at least one negative"):
        th.select_threshold(SCORES, np.ones(5), "youden")
    with pytest.raises(TypeError):
        th.select_threshold(SCORES, LABELS, "f1", gamma=2)
    with pytest.raises(TypeError):
        th.select_threshold(SCORES, LABELS, "fbeta", beta=2)  # arguments go in the record


def test_single_label_all_positive():
    r = th.select_threshold(SCORES, np.ones(5), "f1")
    assert r.threshold == 0.5 and r.recall == 1.0 and r.precision == 1.0


def test_sort_free_curve_equals_cumulative_sum_curve():
    rng = np.random.default_rng(4)
    s = np.round(rng.random(2000), 3)
    y = (rng.random(2000) < s).astype(np.int64)
    order = np.argsort(-s, kind="stable")
    a = th.precision_recall_at_thresholds(s[order], y[order], num_positives=1500)
    b = th._curve_unsorted(s, y, 1500)
    for field in ("thresholds", "tp", "fp", "fn", "precision", "recall", "f1"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
