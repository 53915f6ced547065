"""Temperature scaling: `q = sigmoid(z / T)` per class (softmax converter: `softmax(z / T)`).

Temperature scales logits, never probabilities. Fit: the mean negative log-likelihood is convex
in `1/T`, minimized by a bracketed Newton search (all classes at once); small classes shrink
toward the pooled fit in `log T`. Parameters: `temperature`, 1 (shared) or K values, each > 0.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfcal import TfcalWarning, ops, validation
from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, register

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Default search range of `fit_temperature`; the fit never leaves it."""

__all__ = ["TEMPERATURE_BOUNDS", "Temperature", "apply_temperature", "fit_temperature"]


def apply_temperature(logits, temperature, *, softmax: bool = False) -> np.ndarray:
    """Temperature scaling of logits: `sigmoid(z / T)`, or `softmax(z / T)` over the last axis.

    Args:
      logits: float `[..., K]` (or `[N]` with a scalar temperature) logits.
      temperature: float scalar or `[K]`, each > 0; broadcast along the last axis.
      softmax: normalize over the last axis (softmax converter) instead of per element.

    Returns:
      float32, same shape as `logits`: calibrated probabilities.
    """
    z = nx.as_float_array(logits, "logits")
    t = np.asarray(temperature, dtype=np.float64)
    if t.size == 0 or np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"temperature: must be finite and > 0, got {t.tolist()}")
    x = z / t
    return (nx.softmax(x) if softmax else nx.sigmoid(x)).astype(np.float32)



def _grouped_temperature(z: np.ndarray, y: np.ndarray, group: np.ndarray, num_groups: int,
                         bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Binary temperature per group: minimizes mean NLL of `sigmoid(beta * z)`, `beta = 1/T`.

    The loss is convex in `beta` (a one-feature logistic regression without bias): gradient
    `mean((sigmoid(beta z) - y) z)`, Hessian `mean(sigmoid' z^2)`; both are summed per group with
    `np.bincount`, so every iteration is a few passes over the data for all groups at once.

    Returns:
      (temperature [G], hit_bound [G] bool).
    """
    counts = np.bincount(group, minlength=num_groups).astype(np.float64)
    lo = np.full(num_groups, 1.0 / bounds[1])
    hi = np.full(num_groups, 1.0 / bounds[0])
    yz = np.bincount(group, weights=y * z, minlength=num_groups)
    z2 = z * z

    def grad_hess(beta):
        s = nx.sigmoid_fast(beta[group] * z)
        sz = s * z
        g = np.bincount(group, weights=sz, minlength=num_groups) - yz
        s -= 1.0
        s *= sz
        s *= z  # -s (1 - s) z^2
        h = -np.bincount(group, weights=s, minlength=num_groups)
        return g, h

    beta = nx.solve_convex_1d(grad_hess, lo, hi)
    beta = np.where(counts > 0, beta, 1.0)
    hit = (counts > 0) & ((beta <= lo * (1 + 1e-9)) | (beta >= hi * (1 - 1e-9)))
    return 1.0 / beta, hit


def _softmax_temperature(z: np.ndarray, labels: np.ndarray,
                         bounds: tuple[float, float]) -> tuple[float, bool]:
    """Softmax temperature: minimizes mean `logsumexp(beta z) - beta z_y`, convex in beta."""
    zy = z[np.arange(z.shape[0]), labels]

    def grad_hess(beta):
        p = nx.softmax(beta[0] * z)
        m1 = np.sum(p * z, axis=1)
        m2 = np.sum(p * z * z, axis=1)
        return np.array([np.sum(m1 - zy)]), np.array([np.sum(m2 - m1 * m1)])

    lo, hi = np.array([1.0 / bounds[1]]), np.array([1.0 / bounds[0]])
    beta = float(nx.solve_convex_1d(grad_hess, lo, hi)[0])
    hit = beta <= lo[0] * (1 + 1e-9) or beta >= hi[0] * (1 - 1e-9)
    return 1.0 / beta, hit


def _check_bounds(bounds) -> tuple[float, float]:
    lo, hi = (float(v) for v in bounds)
    if not (0 < lo < hi < np.inf):
        raise ValueError(f"bounds: need 0 < low < high < inf, got {bounds}")
    return lo, hi


def fit_temperature(logits, labels, *, grid: Sequence[float] | None = None,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Fits the temperature `T` minimizing the mean negative log-likelihood.

    Binary case: `logits` float `[N]` and 0/1 `labels` `[N]`, model `sigmoid(z / T)`.
    Multi-class case: `logits` float `[N, C]` and integer `labels` `[N]` in `[0, C)`, model
    `softmax(z / T)`.

    The NLL is convex in `1/T`, so a bracketed Newton search on `1/T` over `bounds` finds the
    global minimum (no TF start-up cost). On separable data the NLL keeps falling as `T -> 0`;
    the result then stays at `bounds[0]` and a `TfcalWarning` says so (likewise at `bounds[1]`).

    Args:
      logits: float `[N]` or `[N, C]` logits (`probs_to_logits` turns probabilities into logits).
      labels: `[N]` 0/1 labels (binary) or int class indices (multi-class).
      grid: optional candidate temperatures; returns the one with the lowest mean NLL (first on
        ties). `bounds` is ignored then.
      bounds: (low, high) temperature range, default (0.05, 20.0).

    Returns:
      The temperature, a float in `bounds` (or from `grid`).

    Raises:
      ValueError: empty or non-finite input, bad labels, bad bounds or grid.
    """
    z = nx.as_float_array(logits, "logits", ndim=(1, 2))
    n = z.shape[0]
    if z.ndim == 1:
        y = nx.as_binary_labels(labels, "labels", n)
        if np.all(y == y[0]):
            warnings.warn(f"fit_temperature: all {n} labels are {int(y[0])}; the temperature is "
                          "not identifiable from one label value", TfcalWarning, stacklevel=2)
    else:
        y = np.asarray(labels)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels: expected int class indices of shape ({n},), got "
                             f"{y.dtype} {y.shape}")
        if np.any((y < 0) | (y >= z.shape[1])):
            raise ValueError(f"labels: class indices must be in [0, {z.shape[1]}), got "
                             f"{y[(y < 0) | (y >= z.shape[1])][0]}")
    if grid is not None:
        g = nx.as_float_array(grid, "grid", ndim=1)
        if np.any(g <= 0):
            raise ValueError(f"grid: temperatures must be > 0, got {g[g <= 0][0]}")
        if z.ndim == 1:
            nll = [np.mean(nx.binary_nll(z / t, y)) for t in g]
        else:
            zy = z[np.arange(n), y]
            nll = [np.mean(_logsumexp(z / t) - zy / t) for t in g]
        return float(g[int(np.argmin(nll))])
    lo, hi = _check_bounds(bounds)
    if z.ndim == 1:
        t, hit = _grouped_temperature(z, y, np.zeros(n, dtype=np.intp), 1, (lo, hi))
        t, hit = float(t[0]), bool(hit[0])
    else:
        t, hit = _softmax_temperature(z, y, (lo, hi))
    if hit:
        why = ("the labels are (nearly) separable by the logits, so the NLL keeps falling as "
               "T -> 0" if t <= lo * (1 + 1e-6) else
               "the logits carry (almost) no information about the labels")
        warnings.warn(f"fit_temperature: temperature stopped at the bound {t:.6g} of {(lo, hi)}: "
                      f"{why}", TfcalWarning, stacklevel=2)
    return t


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    return m + np.log(np.sum(np.exp(x - m[:, None]), axis=1))




def _vector(value) -> tf.Tensor:
    return tf.reshape(tf.cast(value, tf.float32), [-1])


@register
class Temperature(CalibrationMethod):
    """`q = sigmoid(z / T_k)`; with the softmax converter `q = softmax(z / T)` over all columns
    (a shared `T` scales every column, a per-class one leaves the background column at 1)."""

    name = "temperature"
    space = "logit"
    params = ("temperature",)

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        self.own_params(params)
        lengths = (1, num_classes) if num_classes is not None else None
        return {"temperature": validation.floats("temperature", params["temperature"],
                                                 lengths=lengths, positive=True,
                                                 scalar_ok=True)}

    def classes_of(self, params):
        n = len(params["temperature"])
        return n if n > 1 else None

    def filters_raw_scores(self, score_converter: str) -> bool:
        return score_converter != "softmax"

    def check_fit_converter(self, score_converter: str) -> None:
        if score_converter == "softmax":
            raise ValueError("temperature with score_converter softmax is not tuned per "
                             "detection; use platt or isotonic")

    def fit(self, x, y, c, num_classes, w, *, class_labels=None, bounds=None):
        lo, hi = _check_bounds(TEMPERATURE_BOUNDS if bounds is None else bounds)
        n, k = x.size, num_classes
        # the pooled fit is group K in the same vectorized solve
        zz = np.concatenate([x, x])
        yy = np.concatenate([y, y])
        gg = np.concatenate([c, np.full(n, k, dtype=np.intp)])
        t, hit = _grouped_temperature(zz, yy, gg, k + 1, (lo, hi))
        t_pool = t[k]
        if hit[k]:
            warnings.warn(f"fit_per_class: pooled temperature stopped at the bound {t_pool:.6g} "
                          f"of {(lo, hi)} (separable or uninformative data)", TfcalWarning,
                          stacklevel=3)
        bad = [int(i) for i in np.flatnonzero(hit[:k] & (w > 0))]
        if bad:
            # A bound says nothing about the class's own temperature (separable: "as low as
            # allowed"; uninformative: "as high as allowed"): use the pooled fit instead.
            warnings.warn(f"fit_per_class: temperature stopped at a bound {(lo, hi)} for classes "
                          f"{nx.class_names(bad, class_labels)} (separable or uninformative "
                          f"data); they use the pooled fit", TfcalWarning, stacklevel=3)
            w = w.copy()
            w[bad] = 0.0
        temp = np.exp(w * np.log(t[:k]) + (1 - w) * np.log(t_pool))
        return ({"temperature": tuple(float(v) for v in temp)},
                {"temperature": float(t_pool)}, w)

    def apply(self, x, params, class_index=None):
        t = np.asarray(params["temperature"], dtype=np.float64)
        return apply_temperature(x, t if class_index is None else t[class_index])

    def apply_tf(self, x, weights):
        return tf.sigmoid(x / _vector(weights["temperature"]))

    def lower_bound_tf(self, t, weights, num_classes):
        temp = tf.broadcast_to(_vector(weights["temperature"]), [num_classes])
        return temp * (tf.math.log(t) - tf.math.log1p(-t))  # T logit(t); -inf at t = 0

    def report_entry(self, params, k):
        return {"temperature": float(params["temperature"][k])}

    def describe(self, entry):
        return f"T={entry['temperature']:.3g}"

    # The softmax converter mixes every column: its own raw-score maps, and no per-column bound.

    def calibrate(self, raw_scores, params, *, score_converter="sigmoid",
                  background_column=True, boxes=None):
        if score_converter != "softmax":
            return super().calibrate(raw_scores, params, score_converter=score_converter,
                                     background_column=background_column)
        s = nx.as_float_array(raw_scores, "raw_scores")
        start = 1 if background_column else 0
        t = np.asarray(self.check_params(params, s.shape[-1] - start)["temperature"])
        z = nx.scores_to_logits(s, "softmax")
        t_full = np.ones(s.shape[-1]) * (t[0] if t.size == 1 else 1.0)
        if t.size > 1:
            t_full[start:] = t
        return apply_temperature(z, t_full, softmax=True)[..., start:]

    def calibrate_tf(self, raw_scores, weights, *, score_converter="sigmoid",
                     background_column=True, boxes=None):
        if score_converter != "softmax":
            return super().calibrate_tf(raw_scores, weights, score_converter=score_converter,
                                        background_column=background_column)
        raw = tf.cast(raw_scores, tf.float32)
        start = 1 if background_column else 0
        t = _vector(weights["temperature"])
        z = ops.scores_to_logits(raw, "softmax")
        num_columns = tf.shape(raw)[-1]
        # A scalar temperature scales every column; a per-class one leaves background at 1.
        t_full = tf.cond(
            tf.equal(tf.size(t), 1),
            lambda: tf.fill([num_columns], t[0]),
            lambda: tf.concat([tf.ones([start], tf.float32), t], axis=0))
        q = tf.nn.softmax(z / t_full, axis=-1)
        return q[..., start:]

    def raw_lower_bounds(self, min_score_thresh, weights, *, num_classes,
                         score_converter="sigmoid", class_enabled=None):
        if score_converter != "softmax":
            return super().raw_lower_bounds(min_score_thresh, weights, num_classes=num_classes,
                                            score_converter=score_converter,
                                            class_enabled=class_enabled)
        bound = tf.fill([num_classes], tf.constant(-np.inf, tf.float32))
        if class_enabled is not None:
            bound = tf.where(tf.cast(class_enabled, tf.float32) > 0.5, bound, np.inf)
        return bound
