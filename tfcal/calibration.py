"""NumPy score calibration: fitting temperature, Platt and isotonic maps, and applying them.

The maps here are the NumPy twins of the TF calibration ops (`tfcal.ops.calibrate_scores`) and
produce exactly the parameters `PostProcessConfig` stores:

- `temperature`: `q = sigmoid(z / T)` (softmax converter: `q = softmax(z / T)` over all columns).
- `platt`: `q = sigmoid(a * z + b)`.
- `piecewise_linear`: `q = interp(u, knots_x, knots_y)` on the uncalibrated probability `u`,
  clamped to the end knots' `y` outside the knot range (what `fit_isotonic` returns).

Score spaces (shared with the ops): for the `sigmoid` converter the raw score `p` is a
probability and `z = logit(clip(p, EPS, 1 - EPS))` with `EPS = 1e-7`, clipped in float32; for
`identity` the raw score is the logit; for `softmax`, `z = log(clip(p, EPS, 1))` over all
columns. Fitting is done in float64; the `apply_*` functions return float32 like the ops.

Per-class fitting (`fit_per_class`) works on detections: one score per detection for its own
class, a 0/1 label (true or false positive after matching) and the class column. It is a
one-vs-rest binary fit per class, matching the `sigmoid`/`identity` converters for every method
and the `softmax` converter for `platt` and `piecewise_linear`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal, Sequence

import numpy as np

from tfcal import TfcalWarning

EPS = 1e-7
"""Probability clip used before taking logits (float32-safe; the ops use the same value)."""

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Default search range of `fit_temperature`; the fit never leaves it."""

Method = Literal["temperature", "platt", "piecewise_linear"]
_METHODS = ("temperature", "platt", "piecewise_linear")
_ALIASES = {"isotonic": "piecewise_linear"}

__all__ = [
    "EPS",
    "TEMPERATURE_BOUNDS",
    "PerClassCalibration",
    "apply_piecewise_linear",
    "apply_platt",
    "apply_temperature",
    "calibrate_scores",
    "fit_isotonic",
    "fit_per_class",
    "fit_platt",
    "fit_temperature",
    "probs_to_logits",
    "scores_to_logits",
]


# ----------------------------------------------------------------------------- validation


def _as_float_array(x, name: str, *, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected numbers, got {type(x).__name__}") from None
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if ndims is not None and arr.ndim not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in ndims)} array, "
                         f"got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty input (shape {arr.shape}); need at least one value")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr.ravel()))[0]
        raise ValueError(f"{name}: contains non-finite values (first at flat index {bad}: "
                         f"{arr.ravel()[bad]})")
    return arr


def _as_binary_labels(y, name: str, n: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match the scores, got {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    try:
        f = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected 0/1 labels, got dtype {arr.dtype}") from None
    if np.any(np.isnan(f)):
        raise ValueError(f"{name}: contains NaN")
    bad = (f != 0) & (f != 1)
    if np.any(bad):
        raise ValueError(f"{name}: labels must be 0 or 1, got {f[bad][0]}")
    return f


def _check_probs(p: np.ndarray, name: str) -> None:
    if np.any((p < 0) | (p > 1)):
        bad = p[(p < 0) | (p > 1)].ravel()[0]
        raise ValueError(f"{name}: probabilities must be in [0, 1], got {bad}")


def _canonical_method(method: str) -> str:
    method = _ALIASES.get(method, method)
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS + tuple(_ALIASES)}, got {method!r}")
    return method


# ----------------------------------------------------------------------------- score spaces


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Stable logistic function, full relative precision in both tails."""
    e = np.exp(-np.abs(x))
    d = 1.0 + e
    return np.where(x >= 0, 1.0 / d, e / d)


def _sigmoid_fast(x: np.ndarray) -> np.ndarray:
    """`sigmoid(x) = (1 + tanh(x / 2)) / 2`: one transcendental pass, for the fitting loops.

    Absolute error ~1e-16; tiny tail probabilities lose relative precision, which the fits' sums
    do not notice. The `apply_*` maps use the exact `_sigmoid`.
    """
    t = np.tanh(0.5 * x)
    t *= 0.5
    t += 0.5
    return t


def _clip32(p, lo: float, hi: float) -> np.ndarray:
    """Clips in float32 exactly as the ops do, then widens to float64."""
    p32 = np.asarray(p, dtype=np.float32)
    return np.clip(p32, np.float32(lo), np.float32(hi)).astype(np.float64)


def probs_to_logits(probs) -> np.ndarray:
    """`logit(clip(probs, EPS, 1 - EPS))`, the clip done in float32 like the ops.

    Args:
      probs: float `[...]` probabilities in [0, 1] (0 and 1 are allowed and clipped).

    Returns:
      float64 `[...]` logits, within about ±15.9.
    """
    p = _as_float_array(probs, "probs")
    _check_probs(p, "probs")
    c = _clip32(p, EPS, 1.0 - EPS)
    return np.log(c) - np.log1p(-c)


def scores_to_logits(scores, score_converter: str = "sigmoid") -> np.ndarray:
    """NumPy twin of `tfcal.ops.scores_to_logits`.

    Args:
      scores: float `[..., C]` raw detector scores.
      score_converter: {'sigmoid', 'identity', 'softmax'}, default='sigmoid'. `sigmoid`: scores
        are probabilities, `z = logit(clip(p, EPS, 1 - EPS))`; `identity`: scores are logits;
        `softmax`: scores are softmax probabilities, `z = log(clip(p, EPS, 1))`.

    Returns:
      float64 `[..., C]` logits.
    """
    s = _as_float_array(scores, "scores")
    if score_converter == "sigmoid":
        return probs_to_logits(s)
    if score_converter == "identity":
        return s
    if score_converter == "softmax":
        _check_probs(s, "scores")
        return np.log(_clip32(s, EPS, 1.0))
    raise ValueError("score_converter: expected 'sigmoid', 'identity' or 'softmax', "
                     f"got {score_converter!r}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- apply


def apply_temperature(logits, temperature, *, softmax: bool = False) -> np.ndarray:
    """Temperature scaling of logits: `sigmoid(z / T)`, or `softmax(z / T)` over the last axis.

    Args:
      logits: float `[..., K]` (or `[N]` with a scalar temperature) logits.
      temperature: float scalar or `[K]`, each > 0; broadcast along the last axis.
      softmax: normalize over the last axis (softmax converter) instead of per element.

    Returns:
      float32, same shape as `logits`: calibrated probabilities.
    """
    z = _as_float_array(logits, "logits")
    t = np.asarray(temperature, dtype=np.float64)
    if t.size == 0 or np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"temperature: must be finite and > 0, got {t.tolist()}")
    x = z / t
    return (_softmax(x) if softmax else _sigmoid(x)).astype(np.float32)


def apply_platt(logits, a, b) -> np.ndarray:
    """Platt scaling: `sigmoid(a * z + b)`.

    Args:
      logits: float `[..., K]` or `[N]` logits.
      a: float scalar or `[K]` slope, broadcast along the last axis.
      b: float scalar or `[K]` offset, broadcast along the last axis.

    Returns:
      float32, same shape as `logits`: calibrated probabilities.
    """
    z = _as_float_array(logits, "logits")
    a = _as_float_array(a, "platt_a")
    b = _as_float_array(b, "platt_b")
    return _sigmoid(a * z + b).astype(np.float32)


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
    u = _as_float_array(probs, "probs")
    _check_probs(u, "probs")
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


def calibrate_scores(raw_scores, *, score_converter: str = "sigmoid",
                     background_column: bool = True, method: str = "none",
                     temperature: Sequence[float] = (), platt_a: Sequence[float] = (),
                     platt_b: Sequence[float] = (), knots_x=(), knots_y=()) -> np.ndarray:
    """NumPy twin of `tfcal.ops.calibrate_scores` (same arguments, same semantics).

    Args:
      raw_scores: float `[..., C]` raw detector scores; `C = K + 1` when `background_column`.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'.
      background_column: raw column 0 is background and is dropped from the output.
      method: {'none', 'temperature', 'platt', 'piecewise_linear'}, default='none'.
      temperature: length 1 or K, each > 0.
      platt_a, platt_b: length K.
      knots_x, knots_y: K rows of knots.

    Returns:
      float32 `[..., K]` calibrated class probabilities.
    """
    s = _as_float_array(raw_scores, "raw_scores")
    if s.ndim < 1:
        raise ValueError(f"raw_scores: need a class axis, got shape {s.shape}")
    if method not in ("none",) + _METHODS:
        raise ValueError(f"method: expected 'none' or one of {_METHODS}, got {method!r}")
    start = 1 if background_column else 0
    if score_converter == "softmax" and method == "temperature":
        z = scores_to_logits(s, "softmax")
        t = np.asarray(temperature, dtype=np.float64)
        if t.size not in (1, s.shape[-1] - start):
            raise ValueError(f"temperature: expected length 1 or {s.shape[-1] - start}, "
                             f"got {t.size}")
        t_full = np.ones(s.shape[-1]) * (t[0] if t.size == 1 else 1.0)
        if t.size > 1:
            t_full[start:] = t
        return apply_temperature(z, t_full, softmax=True)[..., start:]
    probs = s[..., start:]
    if score_converter == "identity":
        logits = probs
        u = _sigmoid(logits)
    elif score_converter in ("sigmoid", "softmax"):
        _check_probs(probs, "raw_scores")
        u = probs
        logits = None
    else:
        raise ValueError("score_converter: expected 'sigmoid', 'identity' or 'softmax', "
                         f"got {score_converter!r}")
    if method == "none":
        return u.astype(np.float32)
    if method == "piecewise_linear":
        return apply_piecewise_linear(u, knots_x, knots_y)
    if logits is None:
        logits = probs_to_logits(u)
    if method == "temperature":
        return apply_temperature(logits, temperature)
    return apply_platt(logits, platt_a, platt_b)


# ----------------------------------------------------------------------------- fitting core


def _binary_nll(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise `-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] = softplus(x) - y x`."""
    return np.logaddexp(0.0, x) - y * x


def _solve_convex_1d(grad_hess, lo: np.ndarray, hi: np.ndarray, *, tol: float = 1e-10,
                     max_iter: int = 60) -> np.ndarray:
    """Minimizes G independent convex 1-D losses on [lo, hi] (vectorized safeguarded Newton).

    `grad_hess(beta) -> (grad [G], hess [G])`. The derivative of a convex loss is monotone, so a
    bracket [lo, hi] on its sign change is kept; a Newton step that leaves the bracket is
    replaced by bisection. Groups whose derivative does not change sign end at a bound.
    """
    g_lo, _ = grad_hess(lo)
    g_hi, _ = grad_hess(hi)
    at_lo = g_lo >= 0
    at_hi = g_hi <= 0
    a, b = lo.copy(), hi.copy()
    beta = np.where(at_lo, lo, np.where(at_hi, hi, np.clip(1.0, lo, hi)))
    active = ~(at_lo | at_hi)
    for _ in range(max_iter):
        if not np.any(active):
            break
        g, h = grad_hess(beta)
        a = np.where(active & (g < 0), beta, a)
        b = np.where(active & (g > 0), beta, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = beta - g / h
        bad = ~np.isfinite(newton) | (newton <= a) | (newton >= b)
        step = np.where(bad, 0.5 * (a + b), newton)
        done = (np.abs(step - beta) <= tol * np.maximum(1.0, np.abs(beta))) | (g == 0)
        beta = np.where(active, step, beta)
        active &= ~done
    return beta


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
        s = _sigmoid_fast(beta[group] * z)
        sz = s * z
        g = np.bincount(group, weights=sz, minlength=num_groups) - yz
        s -= 1.0
        s *= sz
        s *= z  # -s (1 - s) z^2
        h = -np.bincount(group, weights=s, minlength=num_groups)
        return g, h

    beta = _solve_convex_1d(grad_hess, lo, hi)
    beta = np.where(counts > 0, beta, 1.0)
    hit = (counts > 0) & ((beta <= lo * (1 + 1e-9)) | (beta >= hi * (1 - 1e-9)))
    return 1.0 / beta, hit


def _softmax_temperature(z: np.ndarray, labels: np.ndarray,
                         bounds: tuple[float, float]) -> tuple[float, bool]:
    """Softmax temperature: minimizes mean `logsumexp(beta z) - beta z_y`, convex in beta."""
    zy = z[np.arange(z.shape[0]), labels]

    def grad_hess(beta):
        p = _softmax(beta[0] * z)
        m1 = np.sum(p * z, axis=1)
        m2 = np.sum(p * z * z, axis=1)
        return np.array([np.sum(m1 - zy)]), np.array([np.sum(m2 - m1 * m1)])

    lo, hi = np.array([1.0 / bounds[1]]), np.array([1.0 / bounds[0]])
    beta = float(_solve_convex_1d(grad_hess, lo, hi)[0])
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
    z = _as_float_array(logits, "logits", ndim=(1, 2))
    n = z.shape[0]
    if z.ndim == 1:
        y = _as_binary_labels(labels, "labels", n)
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
        g = _as_float_array(grid, "grid", ndim=1)
        if np.any(g <= 0):
            raise ValueError(f"grid: temperatures must be > 0, got {g[g <= 0][0]}")
        if z.ndim == 1:
            nll = [np.mean(_binary_nll(z / t, y)) for t in g]
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
        return np.bincount(group, weights=_binary_nll(a_[group] * z + b_[group], t),
                           minlength=num_groups)

    f = loss(a, b)
    active = n_all > 0
    for _ in range(max_iter):
        if not np.any(active):
            break
        p = _sigmoid_fast(a[group] * z + b[group])
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
    z = _as_float_array(logits, "logits", ndim=1)
    y = _as_binary_labels(labels, "labels", z.shape[0])
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
    the `piecewise_linear` map (like scikit-learn's `IsotonicRegression(out_of_bounds="clip")`).

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
    u = _as_float_array(probs, "probs", ndim=1)
    _check_probs(u, "probs")
    y = _as_binary_labels(labels, "labels", u.size)
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


# ----------------------------------------------------------------------------- per class


@dataclasses.dataclass(frozen=True)
class PerClassCalibration:
    """Per-class calibration parameters, in `PostProcessConfig` field shapes.

    Attributes:
      method: {'temperature', 'platt', 'piecewise_linear'}.
      num_classes: K.
      temperature: length K (`temperature`), else ().
      platt_a, platt_b: length K (`platt`), else ().
      knots_x, knots_y: K rows (`piecewise_linear`), else ().
      fallback_classes: columns whose parameters were shrunk toward, or replaced by, the pooled
        fit (fewer than `min_samples` detections, or one label value).
      num_samples: detections per class, length K.
      weights: the per-class weight `w_k` in [0, 1] of the shrinkage rule, length K.
      pooled: the pooled fit's parameters (a dict with the same keys as above, one class).
    """

    method: Method
    num_classes: int
    temperature: tuple[float, ...] = ()
    platt_a: tuple[float, ...] = ()
    platt_b: tuple[float, ...] = ()
    knots_x: tuple[tuple[float, ...], ...] = ()
    knots_y: tuple[tuple[float, ...], ...] = ()
    fallback_classes: list[int] = dataclasses.field(default_factory=list)
    num_samples: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    pooled: dict = dataclasses.field(default_factory=dict)

    def config_fields(self) -> dict:
        """The `PostProcessConfig` keyword arguments this calibration sets."""
        out: dict = {"calibration": self.method}
        if self.method == "temperature":
            out["temperature"] = self.temperature
        elif self.method == "platt":
            out.update(platt_a=self.platt_a, platt_b=self.platt_b)
        else:
            out.update(knots_x=self.knots_x, knots_y=self.knots_y)
        return out

    def class_params(self, k: int) -> dict:
        """JSON-able parameters of class column `k` (as the tuning report records them).

        Returns:
          `{"temperature": T}`, `{"a": a, "b": b}` or `{"knots": M, "knots_x": [...],
          "knots_y": [...]}`, plus `num_samples`, `weight` and `fallback` (bool).
        """
        if not 0 <= k < self.num_classes:
            raise ValueError(f"k: must be in [0, {self.num_classes}), got {k}")
        if self.method == "temperature":
            out: dict = {"temperature": self.temperature[k]}
        elif self.method == "platt":
            out = {"a": self.platt_a[k], "b": self.platt_b[k]}
        else:
            out = {"knots": len(self.knots_x[k]), "knots_x": list(self.knots_x[k]),
                   "knots_y": list(self.knots_y[k])}
        if self.num_samples:
            out.update(num_samples=self.num_samples[k], weight=self.weights[k])
        out["fallback"] = k in self.fallback_classes
        return out

    def apply(self, x, class_index=None) -> np.ndarray:
        """Calibrates scores exactly as the TF op does (sigmoid/identity converter semantics).

        Args:
          x: what `fit_per_class` took: logits for `temperature`/`platt`, uncalibrated
            probabilities for `piecewise_linear`. Either float `[N]` with `class_index`, or float
            `[..., K]` (one column per class) with `class_index=None`.
          class_index: int `[N]` class column per score, or None.

        Returns:
          float32, same shape as `x`: calibrated probabilities.
        """
        v = _as_float_array(x, "x")
        if class_index is None:
            if v.shape[-1] != self.num_classes:
                raise ValueError(f"x: last axis must be num_classes={self.num_classes} when "
                                 f"class_index is None, got shape {v.shape}")
            if self.method == "temperature":
                return apply_temperature(v, self.temperature)
            if self.method == "platt":
                return apply_platt(v, self.platt_a, self.platt_b)
            return apply_piecewise_linear(v, self.knots_x, self.knots_y)
        c = _as_class_index(class_index, v.shape, self.num_classes)
        if self.method == "temperature":
            return apply_temperature(v, np.asarray(self.temperature)[c])
        if self.method == "platt":
            return apply_platt(v, np.asarray(self.platt_a)[c], np.asarray(self.platt_b)[c])
        _check_probs(v, "x")
        out = np.empty_like(v)
        for k in np.unique(c):
            m = c == k
            out[m] = np.interp(v[m], self.knots_x[k], self.knots_y[k])
        return out.astype(np.float32)


def _as_class_index(class_index, shape, num_classes: int) -> np.ndarray:
    c = np.asarray(class_index)
    if c.shape != tuple(shape) or (c.size and not np.issubdtype(c.dtype, np.integer)):
        raise ValueError(f"class_index: expected int array of shape {tuple(shape)}, got "
                         f"{c.dtype} {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= num_classes):
        bad = c[(c < 0) | (c >= num_classes)][0]
        raise ValueError(f"class_index: must be in [0, {num_classes}), got {bad}")
    return c.astype(np.intp)


def _labels(columns: Sequence[int], class_labels: Sequence[str] | None) -> str:
    if class_labels is None:
        return str(list(columns))
    return "[" + ", ".join(str(class_labels[k]) for k in columns) + "]"


def fit_per_class(method: str, logits_or_probs, labels, class_index, num_classes: int, *,
                  min_samples: int = 30,
                  bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                  class_labels: Sequence[str] | None = None) -> PerClassCalibration:
    """Fits one calibration map per class column, shrinking small classes toward the pooled fit.

    Shrinkage rule. Let `n_k` be the number of detections of class `k` and
    `w_k = min(1, n_k / min_samples)`. A class with `n_k == 0` or with only one label value gets
    `w_k = 0` (the pooled fit). Otherwise its own fit is blended with the pooled fit (all classes
    together):

    - temperature: `log T_k = w_k log T_own + (1 - w_k) log T_pooled`;
    - platt: `(a_k, b_k) = w_k (a_own, b_own) + (1 - w_k) (a_pooled, b_pooled)` (so the logit
      map is the same blend of the two logit maps);
    - piecewise_linear: knots on the union of both knot sets with
      `y = w_k f_own(x) + (1 - w_k) f_pooled(x)`, which is exactly the pointwise blend of the
      two clamped piecewise-linear maps and stays monotone.

    Every class with `w_k < 1` is listed in `fallback_classes`. Temperature and Platt fits run on
    all classes at once (vectorized over classes with `np.bincount`). A class whose own
    temperature stopped at a bound (separable or uninformative data) carries no usable
    estimate: it gets `w_k = 0` (the pooled fit), and a `TfcalWarning` lists it.

    Args:
      method: {'temperature', 'platt', 'piecewise_linear'} ('isotonic' is an alias of the last).
      logits_or_probs: float `[N]`: logits for `temperature`/`platt` (`probs_to_logits` of the
        sigmoid scores), uncalibrated probabilities for `piecewise_linear`.
      labels: `[N]` 0/1 (1 = true positive).
      class_index: int `[N]` class column of each detection, in `[0, num_classes)`.
      num_classes: K >= 1.
      min_samples: detections a class needs for full weight on its own fit, default 30.
      bounds: temperature range, default (0.05, 20.0).
      class_labels: optional K names for the classes in warnings (default: column indices).

    Returns:
      A `PerClassCalibration`.

    Raises:
      ValueError: empty, non-finite or mismatched inputs; unknown method.
    """
    method = _canonical_method(method)
    x = _as_float_array(logits_or_probs, "logits_or_probs", ndim=1)
    n = x.size
    y = _as_binary_labels(labels, "labels", n)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
    if not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples: must be an int >= 1, got {min_samples!r}")
    c = _as_class_index(class_index, (n,), int(num_classes))
    K = int(num_classes)
    if class_labels is not None and len(class_labels) != K:
        raise ValueError(f"class_labels: expected {K} names, got {len(class_labels)}")
    counts = np.bincount(c, minlength=K)
    pos = np.bincount(c, weights=y, minlength=K)
    single = (pos == 0) | (pos == counts)
    w = np.minimum(1.0, counts / float(min_samples))
    w[(counts == 0) | single] = 0.0
    fallback = [int(k) for k in np.flatnonzero(w < 1)]
    common = dict(method=method, num_classes=K, fallback_classes=fallback,
                  num_samples=tuple(int(v) for v in counts), weights=tuple(float(v) for v in w))

    if method == "temperature":
        lo, hi = _check_bounds(bounds)
        # pooled fit is group K in the same vectorized solve
        zz = np.concatenate([x, x])
        yy = np.concatenate([y, y])
        gg = np.concatenate([c, np.full(n, K, dtype=np.intp)])
        t, hit = _grouped_temperature(zz, yy, gg, K + 1, (lo, hi))
        t_pool = t[K]
        if hit[K]:
            warnings.warn(f"fit_per_class: pooled temperature stopped at the bound {t_pool:.6g} "
                          f"of {(lo, hi)} (separable or uninformative data)", TfcalWarning,
                          stacklevel=2)
        bad = [int(k) for k in np.flatnonzero(hit[:K] & (w > 0))]
        if bad:
            # A bound says nothing about the class's own temperature (separable: "as low as
            # allowed"; uninformative: "as high as allowed"): use the pooled fit instead.
            warnings.warn(f"fit_per_class: temperature stopped at a bound {(lo, hi)} for classes "
                          f"{_labels(bad, class_labels)} (separable or uninformative data); "
                          f"they use the pooled fit",
                          TfcalWarning, stacklevel=2)
            w[bad] = 0.0
            common.update(fallback_classes=[int(k) for k in np.flatnonzero(w < 1)],
                          weights=tuple(float(v) for v in w))
        temp = np.exp(w * np.log(t[:K]) + (1 - w) * np.log(t_pool))
        return PerClassCalibration(temperature=tuple(float(v) for v in temp),
                                   pooled={"temperature": float(t_pool)}, **common)
    if method == "platt":
        zz = np.concatenate([x, x])
        yy = np.concatenate([y, y])
        gg = np.concatenate([c, np.full(n, K, dtype=np.intp)])
        a, b, clamped = _grouped_platt(zz, yy, gg, K + 1)
        bad = [int(k) for k in np.flatnonzero(clamped[:K] & (w == 1))]
        if clamped[K] or bad:
            warnings.warn(f"fit_per_class: Platt slope clamped to a = 0 (logits rank the labels "
                          f"backwards) for {'the pooled fit and ' if clamped[K] else ''}classes "
                          f"{_labels(bad, class_labels)}", TfcalWarning, stacklevel=2)
        pa = w * a[:K] + (1 - w) * a[K]
        pb = w * b[:K] + (1 - w) * b[K]
        return PerClassCalibration(platt_a=tuple(float(v) for v in pa),
                                   platt_b=tuple(float(v) for v in pb),
                                   pooled={"platt_a": float(a[K]), "platt_b": float(b[K])},
                                   **common)
    _check_probs(x, "logits_or_probs")
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
    return PerClassCalibration(knots_x=tuple(rows_x), knots_y=tuple(rows_y),
                               pooled={"knots_x": tuple(px.tolist()),
                                       "knots_y": tuple(py.tolist())}, **common)
