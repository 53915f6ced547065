"""Tests of tfcal.calibration.isotonic: golden values derived by hand, PAV against a reference."""

import numpy as np
import pytest

from tfcal import TfcalWarning
from tfcal import calibration as cal


def test_apply_piecewise_linear_golden_and_clamped():
    # knots (0.2, 0.1) -> (0.6, 0.5): u = 0.4 is halfway -> 0.3; below 0.2 -> 0.1, above -> 0.5.
    q = cal.apply_piecewise_linear([0.0, 0.2, 0.4, 0.6, 1.0], [0.2, 0.6], [0.1, 0.5])
    np.testing.assert_allclose(q, [0.1, 0.1, 0.3, 0.5, 0.5], rtol=1e-6)


def test_apply_piecewise_linear_per_column_rows_of_different_length():
    q = cal.apply_piecewise_linear([[0.5, 0.5]], [[0.0, 1.0], [0.0, 0.5, 1.0]],
                                   [[0.0, 1.0], [0.0, 0.2, 1.0]])
    np.testing.assert_allclose(q, [[0.5, 0.2]], rtol=1e-6)


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


def test_fit_per_class_isotonic_blend_is_pointwise_blend_and_monotone():
    rng = np.random.default_rng(5)
    u = rng.random(400)
    c = np.where(np.arange(400) < 390, 0, 1)  # class 1 has 10 samples
    y = (rng.random(400) < u ** 2).astype(int)
    y[-10:] = [0, 1] * 5
    r = cal.fit_per_class("isotonic", u, y, c, 2, min_samples=20)
    assert r.method == "isotonic" and r.fallback_classes == [1]
    px, py = cal.fit_isotonic(u, y)
    ox, oy = cal.fit_isotonic(u[c == 1], y[c == 1])
    grid = np.linspace(0, 1, 101)
    expect = 0.5 * np.interp(grid, ox, oy) + 0.5 * np.interp(grid, px, py)
    np.testing.assert_allclose(r.apply(grid, np.ones(101, dtype=int)), expect, atol=1e-6)
    for kx, ky in zip(r.knots_x, r.knots_y):
        assert np.all(np.diff(kx) > 0) and np.all(np.diff(ky) >= 0)


def test_single_label_isotonic_is_constant():
    with pytest.warns(TfcalWarning, match="constant 0"):
        kx, ky = cal.fit_isotonic([0.2, 0.4, 0.9], [0, 0, 0])
    np.testing.assert_array_equal(ky, np.zeros_like(kx))


def test_all_inputs_equal_isotonic_is_constant_mean():
    kx, ky = cal.fit_isotonic([0.5, 0.5, 0.5, 0.5], [0, 1, 1, 1])
    np.testing.assert_allclose(kx, [0.0, 1.0])
    np.testing.assert_allclose(ky, [0.75, 0.75])


def test_tf_map_golden_values():
    # Knots (0, 0), (0.5, 0.2), (1, 1): u = 0.25 -> 0.1; u = 0.75 -> 0.2 + 0.25 * 1.6 = 0.6.
    u = np.array([[[0.0, 0.25, 0.75]]], np.float32)
    knots = dict(knots_x=[[0, 0.5, 1], [0, 0.5, 1]], knots_y=[[0, 0.2, 1], [0, 0.2, 1]])
    q = cal.calibrate_scores_tf(u, method="isotonic", **knots).numpy()
    np.testing.assert_allclose(q, [[[0.1, 0.6]]], atol=1e-6)


def test_tf_map_clamps_and_handles_ragged_rows():
    u = np.array([[0.0, 0.05, 0.5, 0.99, 1.0]] * 2, np.float32).T[None]  # [1, 5, 2]
    q = cal.calibrate_scores_tf(u, background_column=False, method="isotonic",
                                knots_x=[[0.1, 0.9], [0.3]], knots_y=[[0.2, 0.6], [0.4]]).numpy()
    # Row 0: clamped to 0.2 below 0.1 and to 0.6 above 0.9; 0.5 -> 0.4. Row 1: a single knot
    # is a constant map.
    np.testing.assert_allclose(q[0, :, 0], [0.2, 0.2, 0.4, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(q[0, :, 1], 0.4, atol=1e-6)


def test_the_older_name_piecewise_linear_reads_as_isotonic():
    u = np.array([[[0.25, 0.75]]], np.float32)
    knots = dict(knots_x=[[0, 1]] * 2, knots_y=[[0, 0.5]] * 2)
    np.testing.assert_array_equal(
        cal.calibrate_scores_tf(u, background_column=False, method="piecewise_linear",
                                **knots).numpy(),
        cal.calibrate_scores_tf(u, background_column=False, method="isotonic", **knots).numpy())
