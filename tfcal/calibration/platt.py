"""Platt scaling: `q = sigmoid(a_k * z + b_k)` per class, on logits.

Fit: minimum NLL against Platt's smoothed targets (Newton with backtracking, all classes at
once), with the slope constrained to `a >= 0` so the ranking is never reversed; small classes
shrink toward the pooled fit in `(a, b)`. Parameters: `platt_a`, `platt_b`, K values each.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfcal import TfcalWarning, validation
from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, register

__all__ = ["Platt", "apply_platt", "fit_platt"]


def apply_platt(logits, a, b) -> np.ndarray:
    """Platt scaling: `sigmoid(a * z + b)`.

    Args:
      logits: float `[..., K]` or `[N]` logits.
      a: float scalar or `[K]` slope, broadcast along the last axis.
      b: float scalar or `[K]` offset, broadcast along the last axis.

    Returns:
      float32, same shape as `logits`: calibrated probabilities.
    """
    z = nx.as_float_array(logits, "logits")
    a = nx.as_float_array(a, "platt_a")
    b = nx.as_float_array(b, "platt_b")
    return nx.sigmoid(a * z + b).astype(np.float32)



def _grouped_platt(z: np.ndarray, y: np.ndarray, group: np.ndarray, num_groups: int,
                   *, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Platt's method per group: Newton with backtracking (Lin, Lin & Weng 2007), vectorized.

    Targets are smoothed as in Platt (1999): positives `(N+ + 1) / (N+ + 2)`, negatives
    `1 / (N- + 2)`, so the minimizer is finite even on separable data. The slope is constrained
    to `a >= 0` so the map never reverses the ranking (a group whose unconstrained optimum has
    `a < 0` gets `a = 0`, the best constant).

    Returns:
      (a [G], b [G], clamped [G] bool: `a` was clamped to 0).
    """
    n_pos = np.bincount(group, weights=y, minlength=num_groups)
    n_all = np.bincount(group, minlength=num_groups).astype(np.float64)
    n_neg = n_all - n_pos
    t = np.where(y == 1, ((n_pos + 1) / (n_pos + 2))[group], (1.0 / (n_neg + 2))[group])
    a = np.zeros(num_groups)
    # start at the prior log-odds of the smoothed targets (Platt's initialization)
    b = np.log((n_pos + 1) / (n_neg + 1))

    def loss(a_, b_):
        return np.bincount(group, weights=nx.binary_nll(a_[group] * z + b_[group], t),
                           minlength=num_groups)

    f = loss(a, b)
    active = n_all > 0
    for _ in range(max_iter):
        if not np.any(active):
            break
        p = nx.sigmoid_fast(a[group] * z + b[group])
        r = p - t
        w = p * (1 - p)
        ga = np.bincount(group, weights=r * z, minlength=num_groups)
        gb = np.bincount(group, weights=r, minlength=num_groups)
        haa = np.bincount(group, weights=w * z * z, minlength=num_groups) + 1e-12
        hab = np.bincount(group, weights=w * z, minlength=num_groups)
        hbb = np.bincount(group, weights=w, minlength=num_groups) + 1e-12
        det = haa * hbb - hab * hab
        det = np.where(det > 1e-300, det, np.inf)
        da = -(hbb * ga - hab * gb) / det
        db = -(-hab * ga + haa * gb) / det
        decrement = -(ga * da + gb * db)  # Newton decrement squared, >= 0
        active &= decrement > 1e-12 * np.maximum(n_all, 1.0)
        step = np.ones(num_groups)
        pending = active.copy()
        for _ in range(40):
            if not np.any(pending):
                break
            a_new = np.where(pending, a + step * da, a)
            b_new = np.where(pending, b + step * db, b)
            f_new = loss(a_new, b_new)
            ok = pending & (f_new <= f + 1e-4 * step * (ga * da + gb * db))
            a = np.where(ok, a_new, a)
            b = np.where(ok, b_new, b)
            f = np.where(ok, f_new, f)
            pending &= ~ok
            step = np.where(pending, step * 0.5, step)
        # no decrease possible, or only a negligible step: converged to machine precision
        active &= ~pending & (step > 1e-6)
    # a < 0 would reverse the ranking: clamp to a = 0 and refit b alone (sigmoid(b) = mean target)
    negative = a < 0
    if np.any(negative):
        t_sum = np.bincount(group, weights=t, minlength=num_groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            b_flat = np.log(t_sum) - np.log(n_all - t_sum)
        a = np.where(negative, 0.0, a)
        b = np.where(negative, b_flat, b)
    return a, b, negative


def _separable(z: np.ndarray, y: np.ndarray) -> bool:
    pos, neg = z[y == 1], z[y == 0]
    return pos.size > 0 and neg.size > 0 and pos.min() > neg.max()


def fit_platt(logits, labels) -> tuple[float, float]:
    """Fits Platt scaling `sigmoid(a * z + b)` by minimum NLL against Platt's smoothed targets.

    Targets are `(N+ + 1) / (N+ + 2)` for positives and `1 / (N- + 2)` for negatives (Platt,
    1999), which keeps `a` and `b` finite on separable data; a `TfcalWarning` flags separable
    data (the slope is then set by the smoothing, not by the data) and a single label value.
    The slope is constrained to `a >= 0` so the ranking is never reversed (a warning says when
    the constraint binds).

    Args:
      logits: float `[N]` logits.
      labels: `[N]` 0/1 labels.

    Returns:
      `(a, b)` floats.

    Raises:
      ValueError: empty or non-finite input, or labels other than 0/1.
    """
    z = nx.as_float_array(logits, "logits", ndim=1)
    y = nx.as_binary_labels(labels, "labels", z.shape[0])
    if np.all(y == y[0]):
        warnings.warn(f"fit_platt: all {y.size} labels are {int(y[0])}; returning a = 0 and the "
                      "smoothed prior log-odds as b", TfcalWarning, stacklevel=2)
    elif _separable(z, y):
        warnings.warn("fit_platt: the labels are separable by the logits; a and b are finite "
                      "only through Platt's target smoothing", TfcalWarning, stacklevel=2)
    a, b, clamped = _grouped_platt(z, y, np.zeros(z.shape[0], dtype=np.intp), 1)
    if clamped[0]:
        warnings.warn("fit_platt: the logits rank the labels backwards (best slope < 0); a is "
                      "clamped to 0 so the ranking is kept, and b is the best constant",
                      TfcalWarning, stacklevel=2)
    return float(a[0]), float(b[0])


@register
class Platt(CalibrationMethod):
    """`q = sigmoid(a_k * z + b_k)` (one-vs-rest for the softmax converter)."""

    name = "platt"
    space = "logit"
    params = ("platt_a", "platt_b")

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        self.own_params(params)
        lengths = (num_classes,) if num_classes is not None else None
        a = validation.floats("platt_a", params["platt_a"], lengths=lengths)
        b = validation.floats("platt_b", params["platt_b"], lengths=(len(a),))
        return {"platt_a": a, "platt_b": b}

    def classes_of(self, params):
        return len(params["platt_a"])

    def fit(self, x, y, c, num_classes, w, *, class_labels=None):
        n, k = x.size, num_classes
        zz = np.concatenate([x, x])
        yy = np.concatenate([y, y])
        gg = np.concatenate([c, np.full(n, k, dtype=np.intp)])
        a, b, clamped = _grouped_platt(zz, yy, gg, k + 1)
        bad = [int(i) for i in np.flatnonzero(clamped[:k] & (w == 1))]
        if clamped[k] or bad:
            warnings.warn(f"fit_per_class: Platt slope clamped to a = 0 (logits rank the labels "
                          f"backwards) for {'the pooled fit and ' if clamped[k] else ''}classes "
                          f"{nx.class_names(bad, class_labels)}", TfcalWarning, stacklevel=3)
        pa = w * a[:k] + (1 - w) * a[k]
        pb = w * b[:k] + (1 - w) * b[k]
        return ({"platt_a": tuple(float(v) for v in pa), "platt_b": tuple(float(v) for v in pb)},
                {"platt_a": float(a[k]), "platt_b": float(b[k])}, w)

    def apply(self, x, params, class_index=None):
        a = np.asarray(params["platt_a"], dtype=np.float64)
        b = np.asarray(params["platt_b"], dtype=np.float64)
        if class_index is not None:
            a, b = a[class_index], b[class_index]
        return apply_platt(x, a, b)

    def apply_tf(self, x, weights):
        a = tf.reshape(tf.cast(weights["platt_a"], tf.float32), [-1])
        b = tf.reshape(tf.cast(weights["platt_b"], tf.float32), [-1])
        return tf.sigmoid(a * x + b)

    def lower_bound_tf(self, t, weights, num_classes):
        a = tf.broadcast_to(tf.reshape(tf.cast(weights["platt_a"], tf.float32), [-1]),
                            [num_classes])
        b = tf.broadcast_to(tf.reshape(tf.cast(weights["platt_b"], tf.float32), [-1]),
                            [num_classes])
        lt = tf.math.log(t) - tf.math.log1p(-t)  # logit(t); -inf at t = 0
        # a <= 0: flat or (never fitted) decreasing map, no lower bound on z.
        return tf.where(a > 0, (lt - b) / tf.where(a > 0, a, 1.0), -np.inf)

    def report_entry(self, params, k):
        return {"a": float(params["platt_a"][k]), "b": float(params["platt_b"][k])}

    def describe(self, entry):
        return f"a={entry['a']:.3g}, b={entry['b']:.3g}"

