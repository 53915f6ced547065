"""Tests for tfcal.metrics: hand-derived ECE/MCE/Brier/NLL/D-ECE values and edge cases."""

import math

import numpy as np
import pytest

from tfcal import metrics

TEXTBOOK_EDGES = [0.0, 0.33, 0.66, 1.0]


def test_textbook_three_bin_ece():
    # bins [0, .33), [.33, .66), [.66, 1.0] (last edge inclusive, so 1.0 is in bin 3):
    #   bin 1: p = 0.1, 0.2  labels 0, 1 -> conf 0.15, acc 0.5, gap 0.35, weight 2/6
    #   bin 2: p = 0.4, 0.5  labels 0, 0 -> conf 0.45, acc 0.0, gap 0.45, weight 2/6
    #   bin 3: p = 0.9, 1.0  labels 1, 1 -> conf 0.95, acc 1.0, gap 0.05, weight 2/6
    # ECE = (0.35 + 0.45 + 0.05) / 3 = 0.283333...; MCE = 0.45.
    p = [0.1, 0.2, 0.4, 0.5, 0.9, 1.0]
    y = [0, 1, 0, 0, 1, 1]
    assert metrics.expected_calibration_error(p, y, bin_edges=TEXTBOOK_EDGES) == \
        pytest.approx(0.85 / 3)
    assert metrics.maximum_calibration_error(p, y, bin_edges=TEXTBOOK_EDGES) == \
        pytest.approx(0.45)


def test_left_edge_belongs_to_the_upper_bin():
    # Adding p = 0.33 (label 1): it falls in bin 2 (bins are [e_i, e_i+1)). Bin 2 becomes
    # p = 0.33, 0.4, 0.5 with labels 1, 0, 0: conf 0.41, acc 1/3, gap 0.076667, weight 3/7.
    # ECE = (2 * 0.35 + 3 * 0.076667 + 2 * 0.05) / 7 = 1.03 / 7 = 0.147142857.
    p = [0.1, 0.2, 0.33, 0.4, 0.5, 0.9, 1.0]
    y = [0, 1, 1, 0, 0, 1, 1]
    rc = metrics.reliability_curve(p, y, bin_edges=TEXTBOOK_EDGES)
    np.testing.assert_array_equal(rc.count, [2, 3, 2])
    np.testing.assert_allclose(rc.confidence, [0.15, 0.41, 0.95])
    np.testing.assert_allclose(rc.accuracy, [0.5, 1 / 3, 1.0])
    assert metrics.expected_calibration_error(p, y, bin_edges=TEXTBOOK_EDGES) == \
        pytest.approx(1.03 / 7)


def test_uniform_ece_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    p[:5] = [0.0, 1.0, 0.1, 0.5, 0.9]  # edges and extremes
    y = (rng.random(1000) < p ** 1.5).astype(int)
    ece = 0.0
    for i in range(10):
        lo, hi = i / 10, (i + 1) / 10
        m = (p >= lo) & ((p < hi) if i < 9 else (p <= hi))
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    assert metrics.expected_calibration_error(p, y) == pytest.approx(ece, abs=1e-12)


def test_reliability_curve_empty_bins_are_nan_with_zero_count():
    rc = metrics.reliability_curve([0.05, 0.95], [0, 1], num_bins=4)
    np.testing.assert_array_equal(rc.count, [1, 0, 0, 1])
    assert np.isnan(rc.confidence[1]) and np.isnan(rc.accuracy[2])
    assert rc.ece == pytest.approx(0.05)


def test_quantile_bins_have_equal_counts():
    # 8 distinct values, 2 quantile bins: edges (0.1, 0.45, 0.8) -> 4 and 4.
    p = np.arange(1, 9) / 10
    rc = metrics.reliability_curve(p, np.ones(8), num_bins=2, strategy="quantile")
    np.testing.assert_allclose(rc.bin_edges, [0.1, 0.45, 0.8])
    np.testing.assert_array_equal(rc.count, [4, 4])
    # all-equal confidences still give one bin holding everything
    rc = metrics.reliability_curve([1.0, 1.0], [1, 0], strategy="quantile")
    assert rc.count.tolist() == [2] and rc.ece == pytest.approx(0.5)


def test_brier_and_nll_golden():
    # Brier: ((0.8 - 1)^2 + (0.3 - 0)^2) / 2 = (0.04 + 0.09) / 2 = 0.065
    assert metrics.brier_score([0.8, 0.3], [1, 0]) == pytest.approx(0.065)
    # NLL: -(ln 0.8 + ln 0.7) / 2
    assert metrics.negative_log_likelihood([0.8, 0.3], [1, 0]) == \
        pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    # p = 1 with label 0 is clipped to 1 - 1e-7: -ln(1e-7) = 16.118...
    assert metrics.negative_log_likelihood([1.0], [0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert metrics.negative_log_likelihood([0.0, 1.0], [0, 1]) < 1e-6


def test_detection_ece_confidence_only_equals_uniform_ece():
    rng = np.random.default_rng(1)
    s = rng.random(500)
    tp = rng.random(500) < s
    assert metrics.detection_ece(s, tp, num_bins=10) == \
        pytest.approx(metrics.expected_calibration_error(s, tp, num_bins=10))


def test_detection_ece_joint_bins_golden():
    # Four detections at confidence 0.5. Left half (cx < 0.5) both TP, right half both FP.
    # Confidence only: one bin, precision 0.5, gap 0 -> D-ECE 0.
    # Joint with 2 cx bins: left bin precision 1, gap 0.5; right bin precision 0, gap 0.5;
    # weights 1/2 each -> D-ECE 0.5.
    s = [0.5] * 4
    tp = [1, 1, 0, 0]
    boxes = [[0.1, 0.1, 0.3, 0.2], [0.5, 0.2, 0.7, 0.3],
             [0.1, 0.7, 0.3, 0.8], [0.5, 0.8, 0.7, 0.9]]  # [ymin, xmin, ymax, xmax]
    assert metrics.detection_ece(s, tp) == pytest.approx(0.0)
    assert metrics.detection_ece(s, tp, boxes=boxes, box_bins=2, box_features=("cx",)) == \
        pytest.approx(0.5)
    # cy splits nothing here (both rows mix TP and FP): back to 0
    assert metrics.detection_ece(s, tp, boxes=boxes, box_bins=2, box_features=("cy",)) == \
        pytest.approx(0.0)


@pytest.mark.parametrize("fn", [metrics.expected_calibration_error,
                                metrics.maximum_calibration_error, metrics.brier_score,
                                metrics.negative_log_likelihood, metrics.reliability_curve,
                                metrics.detection_ece])
def test_empty_and_nan_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="non-finite"):
        fn([0.5, np.nan], [0, 1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.2"):
        metrics.brier_score([1.2], [1])
    with pytest.raises(ValueError, match="labels: must be 0 or 1, got 3"):
        metrics.brier_score([0.2], [3])
    with pytest.raises(ValueError, match="does not cover"):
        metrics.expected_calibration_error([0.9], [1], bin_edges=[0.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.expected_calibration_error([0.4], [1], bin_edges=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="strategy"):
        metrics.expected_calibration_error([0.4], [1], strategy="equal")
    with pytest.raises(ValueError, match=r"boxes: expected shape \(1, 4\)"):
        metrics.detection_ece([0.4], [1], boxes=[[0, 0, 1]])
