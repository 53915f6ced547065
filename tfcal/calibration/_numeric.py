"""NumPy score spaces and array checks shared by the calibration methods (float64 inside).

Score spaces (the NumPy side of `tfcal.ops.scores_to_logits`): for the `sigmoid` converter the
raw score `p` is a probability and `z = logit(clip(p, EPS, 1 - EPS))` with `EPS = 1e-7`, clipped
in float32; for `identity` the raw score is the logit; for `softmax`,
`z = log(clip(p, EPS, 1))` over all columns.
"""

from __future__ import annotations

import numpy as np

from tfcal.ops import EPS

__all__ = [
    "EPS", "as_binary_labels", "as_float_array", "binary_nll", "check_probs", "class_names",
    "clip32",
    "probs_to_logits", "scores_to_logits", "sigmoid", "sigmoid_fast", "softmax",
    "solve_convex_1d",
]


def as_float_array(x, name: str, *, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
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


def as_binary_labels(y, name: str, n: int) -> np.ndarray:
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


def check_probs(p: np.ndarray, name: str) -> None:
    if np.any((p < 0) | (p > 1)):
        bad = p[(p < 0) | (p > 1)].ravel()[0]
        raise ValueError(f"{name}: probabilities must be in [0, 1], got {bad}")


# ----------------------------------------------------------------------------- score spaces


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Stable logistic function, full relative precision in both tails."""
    e = np.exp(-np.abs(x))
    d = 1.0 + e
    return np.where(x >= 0, 1.0 / d, e / d)


def sigmoid_fast(x: np.ndarray) -> np.ndarray:
    """`sigmoid(x) = (1 + tanh(x / 2)) / 2`: one transcendental pass, for the fitting loops.

    Absolute error ~1e-16; tiny tail probabilities lose relative precision, which the fits' sums
    do not notice. The `apply_*` maps use the exact `sigmoid`.
    """
    t = np.tanh(0.5 * x)
    t *= 0.5
    t += 0.5
    return t


def clip32(p, lo: float, hi: float) -> np.ndarray:
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
    p = as_float_array(probs, "probs")
    check_probs(p, "probs")
    c = clip32(p, EPS, 1.0 - EPS)
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
    s = as_float_array(scores, "scores")
    if score_converter == "sigmoid":
        return probs_to_logits(s)
    if score_converter == "identity":
        return s
    if score_converter == "softmax":
        check_probs(s, "scores")
        return np.log(clip32(s, EPS, 1.0))
    raise ValueError("score_converter: expected 'sigmoid', 'identity' or 'softmax', "
                     f"got {score_converter!r}")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- fitting core


def binary_nll(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise `-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] = softplus(x) - y x`."""
    return np.logaddexp(0.0, x) - y * x


def solve_convex_1d(grad_hess, lo: np.ndarray, hi: np.ndarray, *, tol: float = 1e-10,
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


def class_names(columns, class_labels) -> str:
    """`[names]` of the class `columns` for warnings (indices when `class_labels` is None)."""
    if class_labels is None:
        return str(list(columns))
    return "[" + ", ".join(str(class_labels[k]) for k in columns) + "]"
