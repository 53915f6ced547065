"""Isotonic calibration: a monotone piecewise-linear map of the uncalibrated probability.

`q = interp(u, knots_x[k], knots_y[k])`, clamped to the end knots' `y` outside the knot range.
Fit: pool-adjacent-violators on the tune detections (like scikit-learn's
`IsotonicRegression(out_of_bounds="clip")`); small classes get the pointwise blend of their own
map and the pooled one. Parameters: `knots_x`, `knots_y`, K rows each (lengths may differ per
row). Older records call the method `piecewise_linear`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfcal import TfcalWarning, ops, validation
from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, register

__all__ = ["Isotonic", "apply_piecewise_linear", "fit_isotonic"]


def _check_knots(kx: np.ndarray, ky: np.ndarray, where: str) -> None:
    if kx.ndim != 1 or kx.shape != ky.shape or kx.size == 0:
        raise ValueError(f"{where}: knots_x and knots_y must be equal-length non-empty 1-D rows, "
                         f"got shapes {kx.shape} and {ky.shape}")
    if np.any(np.diff(kx) <= 0):
        raise ValueError(f"{where}: knots_x must be strictly increasing, got {kx.tolist()}")
    if np.any(np.diff(ky) < 0):
        raise ValueError(f"{where}: knots_y must be non-decreasing, got {ky.tolist()}")


def apply_piecewise_linear(probs, knots_x, knots_y) -> np.ndarray:
    """Piecewise-linear map of uncalibrated probabilities, clamped at the end knots.

    Args:
      probs: float `[N]` (one row of knots) or `[..., K]` (one row per column) probabilities.
      knots_x: float `[M]` or `K` rows (lengths may differ per row), strictly increasing.
      knots_y: float, same shapes as `knots_x`, non-decreasing, in [0, 1].

    Returns:
      float32, same shape as `probs`.
    """
    u = nx.as_float_array(probs, "probs")
    nx.check_probs(u, "probs")
    single_row = len(knots_x) > 0 and np.ndim(knots_x[0]) == 0
    rows_x, rows_y = _knot_rows(knots_x, knots_y)
    if single_row:
        return np.interp(u, rows_x[0], rows_y[0]).astype(np.float32)
    if u.shape[-1] != len(rows_x):
        raise ValueError(f"probs: last axis {u.shape[-1]} != number of knot rows {len(rows_x)}")
    out = np.empty_like(u)
    for k, (kx, ky) in enumerate(zip(rows_x, rows_y)):
        out[..., k] = np.interp(u[..., k], kx, ky)
    return out.astype(np.float32)


def _knot_rows(knots_x, knots_y) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(knots_x) and np.ndim(knots_x[0]) == 0:
        knots_x, knots_y = [knots_x], [knots_y]
    if len(knots_x) != len(knots_y) or len(knots_x) == 0:
        raise ValueError(f"knots: {len(knots_x)} rows of knots_x vs {len(knots_y)} of knots_y")
    rows_x, rows_y = [], []
    for k, (rx, ry) in enumerate(zip(knots_x, knots_y)):
        kx = np.asarray(rx, dtype=np.float64)
        ky = np.asarray(ry, dtype=np.float64)
        _check_knots(kx, ky, f"knots row {k}")
        rows_x.append(kx)
        rows_y.append(ky)
    return rows_x, rows_y



def _pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators for a non-decreasing fit of `y` with weights `w`.

    Returns:
      (block_start indices [B], block_value [B]) over the input positions.
    """
    vals: list[float] = []
    wts: list[float] = []
    starts: list[int] = []
    for i, (v, wi) in enumerate(zip(y.tolist(), w.tolist())):  # O(n): each merge pops one block
        vals.append(v)
        wts.append(wi)
        starts.append(i)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2 = vals.pop(), wts.pop()
            starts.pop()
            wsum = wts[-1] + w2
            vals[-1] = (vals[-1] * wts[-1] + v2 * w2) / wsum
            wts[-1] = wsum
    return np.asarray(starts, dtype=np.intp), np.asarray(vals)


def fit_isotonic(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Fits an isotonic (non-decreasing) map by pool-adjacent-violators; returns its knots.

    Equal inputs are grouped first (their labels averaged with their counts as weights), so ties
    always get one value; inputs are compared in float32, the precision of the serving op, so the
    knots are exact float32 values. The returned knots are each block's smallest and largest
    input with the block's mean label; linear interpolation between them, clamped at the ends, is
    the isotonic map (like scikit-learn's `IsotonicRegression(out_of_bounds="clip")`).

    Args:
      probs: float `[N]` uncalibrated probabilities in [0, 1] (0 and 1 allowed).
      labels: `[N]` 0/1 labels.

    Returns:
      `(knots_x, knots_y)`: float64 `[M]` each, `M >= 2`; `knots_x` strictly increasing in
      [0, 1], `knots_y` non-decreasing in [0, 1]. If all inputs are equal the map is the constant
      mean label on knots `[0, 1]`.

    Raises:
      ValueError: empty, non-finite or out-of-range input, or labels other than 0/1.
    """
    u = nx.as_float_array(probs, "probs", ndim=1)
    nx.check_probs(u, "probs")
    y = nx.as_binary_labels(labels, "labels", u.size)
    if np.all(y == y[0]):
        warnings.warn(f"fit_isotonic: all {y.size} labels are {int(y[0])}; the map is the "
                      f"constant {int(y[0])}", TfcalWarning, stacklevel=2)
    return _isotonic_knots(u, y)


def _isotonic_knots(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Inputs are rounded to float32 first (the serving op's precision), so every knot x is
    # exactly representable there and the TF map equals this one (values equal in float32 tie).
    u = u.astype(np.float32).astype(np.float64)
    ux, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    ysum = np.bincount(inverse, weights=y, minlength=ux.size)
    if ux.size == 1:
        v = ysum[0] / counts[0]
        return np.array([0.0, 1.0]), np.array([v, v])
    starts, vals = _pav(ysum / counts, counts.astype(np.float64))
    ends = np.append(starts[1:], ux.size) - 1
    kx = np.stack([ux[starts], ux[ends]], axis=1).ravel()
    ky = np.repeat(vals, 2)
    keep = np.append(True, np.diff(kx) > 0)  # one-point blocks give duplicate x
    kx, ky = kx[keep], np.clip(ky[keep], 0.0, 1.0)
    # drop interior knots on a straight line of equal y (redundant for interpolation)
    if kx.size > 2:
        inner = np.ones(kx.size, dtype=bool)
        inner[1:-1] = ~((ky[1:-1] == ky[:-2]) & (ky[1:-1] == ky[2:]))
        kx, ky = kx[inner], ky[inner]
    return kx, ky


@register
class Isotonic(CalibrationMethod):
    """`q = interp(u, knots_x[k], knots_y[k])` on the uncalibrated probability, clamped."""

    name = "isotonic"
    aliases = ("piecewise_linear",)
    space = "probability"
    params = ("knots_x", "knots_y")

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        self.own_params(params)
        kx, ky = validation.knot_rows(params["knots_x"], params["knots_y"], rows=num_classes)
        return {"knots_x": kx, "knots_y": ky}

    def classes_of(self, params):
        return len(params["knots_x"])

    def broadcast(self, params, num_classes):
        return {k: tuple(tuple(r) for r in v) * num_classes for k, v in params.items()}

    def fit(self, x, y, c, num_classes, w, *, class_labels=None):
        nx.check_probs(x, "logits_or_probs")
        counts = np.bincount(c, minlength=num_classes)
        px, py = _isotonic_knots(x, y)
        order = np.argsort(c, kind="stable")
        splits = np.cumsum(counts)[:-1]
        rows_x, rows_y = [], []
        for k, idx in enumerate(np.split(order, splits)):
            if w[k] == 0:
                kx, ky = px, py
            else:
                ox, oy = _isotonic_knots(x[idx], y[idx])
                if w[k] == 1:
                    kx, ky = ox, oy
                else:
                    kx = np.union1d(ox, px)
                    ky = w[k] * np.interp(kx, ox, oy) + (1 - w[k]) * np.interp(kx, px, py)
                    ky = np.maximum.accumulate(np.clip(ky, 0.0, 1.0))
            rows_x.append(tuple(float(v) for v in kx))
            rows_y.append(tuple(float(v) for v in ky))
        return ({"knots_x": tuple(rows_x), "knots_y": tuple(rows_y)},
                {"knots_x": tuple(px.tolist()), "knots_y": tuple(py.tolist())}, w)

    def apply(self, x, params, class_index=None):
        if class_index is None:
            return apply_piecewise_linear(x, params["knots_x"], params["knots_y"])
        v = nx.as_float_array(x, "x")
        nx.check_probs(v, "x")
        out = np.empty_like(v)
        for k in np.unique(class_index):
            m = class_index == k
            out[m] = np.interp(v[m], params["knots_x"][k], params["knots_y"][k])
        return out.astype(np.float32)

    def weights(self, params):
        xs, ys = ops.pad_knots(params["knots_x"], params["knots_y"])
        return {"knots_x": xs, "knots_y": ys}

    def apply_tf(self, x, weights):
        return ops.piecewise_linear(x, weights["knots_x"], weights["knots_y"])

    def lower_bound_tf(self, t, weights, num_classes):
        xs = tf.cast(weights["knots_x"], tf.float32)
        ys = tf.cast(weights["knots_y"], tf.float32)
        inf = tf.constant(np.inf, tf.float32)
        # First knot with y >= t; the bound is where the segment before it reaches t.
        reach = ys >= t[:, None]
        j1 = tf.argmax(tf.cast(reach, tf.int32), axis=1, output_type=tf.int32)
        j0 = tf.maximum(j1 - 1, 0)
        x0 = tf.gather(xs, j0, batch_dims=1)
        x1 = tf.gather(xs, j1, batch_dims=1)
        y0 = tf.gather(ys, j0, batch_dims=1)
        y1 = tf.gather(ys, j1, batch_dims=1)
        frac = tf.clip_by_value(tf.math.divide_no_nan(t - y0, y1 - y0), 0.0, 1.0)
        cross = x0 + frac * (x1 - x0)
        any_reach = tf.reduce_any(reach, axis=1)
        bound = tf.where(any_reach, cross, inf)  # no knot reaches t: never passes
        return tf.where(any_reach & (j1 == 0), -inf, bound)  # the first knot reaches t

    def report_entry(self, params, k):
        return {"knots": len(params["knots_x"][k])}

    def describe(self, entry):
        return f"isotonic, {entry['knots']} knots"

