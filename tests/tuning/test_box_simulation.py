"""The box-size simulator's exact rates (by symmetry and against seeded Monte Carlo), and the
coverage of per-class certification on box_platt-calibrated scores."""

from __future__ import annotations

import numpy as np
import pytest

from tfcal.calibration.box_platt import box_size_feature
from tfcal.tuning.box_simulation import (BoxClassModel, boxes_of_size, box_coverage, draw,
                                         true_rates)


def test_simulated_sizes_are_what_the_fit_reads():
    s = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(box_size_feature(boxes_of_size(s)), s, atol=1e-12)


def test_true_rates_by_symmetry():
    # z ~ N(0, 2), P(TP) = sigmoid(z + c (s - 1/2)): keeping everything gives precision 1/2
    # (sigmoid(x) + sigmoid(-x) = 1 and the law of (z, s - 1/2) is symmetric) and recall 1.
    m = BoxClassModel(1, a=1.0, b=-1.5, c=3.0, z_mean=0.0, z_sd=2.0)
    p, r = true_rates(m, 1.0, 0.0, 0.0, 0.0)
    assert (p, r) == (pytest.approx(0.5, abs=1e-6), pytest.approx(1.0))
    # Keeping z >= 0 (threshold 0.5 on sigmoid(z)): the kept TP mass over the kept mass (1/2)
    # and over all the TP mass (also 1/2) are equal.
    p, r = true_rates(m, 1.0, 0.0, 0.0, 0.5)
    assert p == pytest.approx(r, abs=1e-9) and p > 0.5


def test_true_rates_match_monte_carlo():
    m = BoxClassModel(1, a=0.9, b=0.3, c=2.5, z_mean=0.5, z_sd=1.5)
    rng = np.random.default_rng(0)
    n = 1_000_000
    s = rng.uniform(0, 1, n)
    z = rng.normal(m.z_mean, m.z_sd, n)
    p_tp = 1 / (1 + np.exp(-(m.a * z + m.b + m.c * s)))
    keep = 1 / (1 + np.exp(-(1.2 * z - 0.4 + 1.0 * s))) >= 0.7
    p, r = true_rates(m, 1.2, -0.4, 1.0, 0.7)
    # Monte Carlo standard errors are about 5e-4 here.
    assert p == pytest.approx(p_tp[keep].mean(), abs=3e-3)
    assert r == pytest.approx(p_tp[keep].sum() / p_tp.sum(), abs=3e-3)


def test_draw_counts():
    z, s, tp, col, gt = draw([BoxClassModel(100), BoxClassModel(50)],
                             np.random.default_rng(1), 0.5)
    assert np.bincount(col).tolist() == [50, 25]
    assert gt.tolist() == [int(tp[col == k].sum() + round(0.25 * tp[col == k].sum()))
                           for k in range(2)]


SCENARIO = [BoxClassModel(600, a=1.0, b=0.5, c=3.0, z_mean=0.5),
            BoxClassModel(300, a=1.2, b=1.0, c=2.0)]


@pytest.mark.slow
def test_certified_precision_holds_with_box_platt_and_buys_recall():
    # 40 seeded sets, 2 classes with a size effect: each certified class's true precision is
    # >= 0.9 in >= 95% of the sets (the promise); the observed share must not fall below 0.9.
    box = box_coverage(SCENARIO, 40, 7, method="box_platt")
    plain = box_coverage(SCENARIO, 40, 7, method="platt")
    assert box.enabled.sum() >= 60
    assert box.coverage >= 0.9, (box.coverage, box.coverage_se)
    assert plain.coverage >= 0.9
    # The size-aware threshold keeps more of the true positives on the same sets.
    assert np.all(box.mean_recall > plain.mean_recall)
