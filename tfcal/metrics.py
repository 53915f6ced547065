"""Calibration metrics: ECE, MCE, Brier score, NLL, reliability curves and detection ECE.

Binning (shared by every binned metric). Bins are `[e_0, e_1), [e_1, e_2), ..., [e_{B-1}, e_B]`:
half-open except the last, which includes its right edge, so a confidence of exactly 1.0 lands
in the last bin. `strategy="uniform"` uses `num_bins` equal-width bins on [0, 1];
`strategy="quantile"` uses the empirical quantiles of the confidences (equal-count bins,
duplicate edges merged); explicit `bin_edges` override both.

ECE = sum over bins of `(n_b / n) * |accuracy_b - confidence_b|` (empty bins contribute 0), where
`confidence_b` is the mean confidence and `accuracy_b` the mean label of the bin. MCE is the
largest `|accuracy_b - confidence_b|` over non-empty bins.

Detection ECE (D-ECE, Küppers et al., "Multivariate Confidence Calibration for Object
Detection", CVPR-W 2020) applies the same sum to detections labelled true/false positive by
matching, where a bin's "accuracy" is its precision; bins are over the confidence alone or over
the joint grid of the confidence and box features (`cx`, `cy`, `w`, `h` in normalized image
coordinates, and the relative log size `size = 1 + log10(clip(w * h, 1e-4, 1)) / 4`, in [0, 1]:
0 for boxes of at most 1e-4 of the image, 1 for the whole image; uniform bins on it separate
small, medium and large boxes, where uniform bins on `w * h` would put most boxes in the first).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

Strategy = Literal["uniform", "quantile"]
BOX_FEATURES = ("cx", "cy", "w", "h")
#: Every box feature `detection_ece` knows: `BOX_FEATURES` and the relative log size `size`.
BOX_FEATURE_NAMES = BOX_FEATURES + ("size",)

__all__ = [
    "ReliabilityCurve",
    "bin_edges_for",
    "brier_score",
    "detection_ece",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_curve",
]


def _validate(probs, labels, name: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    return validate_binary(probs, labels, name, probabilities=True)


def validate_binary(values, labels, name: str, *, probabilities: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """float64 `values` `[n]` (finite, non-empty; in [0, 1] if `probabilities`) and float64 0/1
    `labels` of the same shape, or a `ValueError`/`TypeError` naming the bad argument."""
    try:
        p = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected numbers, got {type(values).__name__}") from None
    if p.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {p.shape}")
    if p.size == 0:
        raise ValueError(f"{name}: empty input; need at least one value")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: contains non-finite values (first: "
                         f"{p[~np.isfinite(p)][0]})")
    if probabilities and np.any((p < 0) | (p > 1)):
        raise ValueError(f"{name}: probabilities must be in [0, 1], got "
                         f"{p[(p < 0) | (p > 1)][0]}")
    y = np.asarray(labels)
    if y.shape != p.shape:
        raise ValueError(f"labels: expected shape {p.shape} to match {name}, got {y.shape}")
    y = y.astype(np.float64)
    if np.any(np.isnan(y)):
        raise ValueError("labels: contains NaN")
    if np.any((y != 0) & (y != 1)):
        raise ValueError(f"labels: must be 0 or 1, got {y[(y != 0) & (y != 1)][0]}")
    return p, y


def bin_edges_for(probs, *, num_bins: int = 10, bin_edges: Sequence[float] | None = None,
                  strategy: Strategy = "uniform") -> np.ndarray:
    """The bin edges a binned metric uses (see the module docstring).

    Args:
      probs: float `[N]` confidences in [0, 1].
      num_bins: number of bins (>= 1), default 10; ignored when `bin_edges` is given.
      bin_edges: explicit strictly increasing edges `[B + 1]` covering every confidence.
      strategy: {'uniform', 'quantile'}, default='uniform'.

    Returns:
      float64 `[B + 1]` strictly increasing edges (quantile edges may give fewer than
      `num_bins` bins when confidences repeat).
    """
    p = np.asarray(probs, dtype=np.float64)
    if bin_edges is not None:
        e = np.asarray(bin_edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
            raise ValueError(f"bin_edges: need >= 2 finite strictly increasing values, got "
                             f"{e.tolist()}")
        if p.size and (p.min() < e[0] or p.max() > e[-1]):
            raise ValueError(f"bin_edges: [{e[0]}, {e[-1]}] does not cover the confidences "
                             f"[{p.min()}, {p.max()}]")
        return e
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins: must be an int >= 1, got {num_bins!r}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, num_bins + 1)
    if strategy == "quantile":
        e = np.unique(np.quantile(p, np.linspace(0.0, 1.0, num_bins + 1)))
        if e.size == 1:  # every confidence equal: one bin that holds them
            v = float(e[0])
            return np.array([v, v + 1e-12]) if v < 1 else np.array([1.0 - 1e-12, 1.0])
        return e
    raise ValueError(f"strategy: expected 'uniform' or 'quantile', got {strategy!r}")


def _bin_index(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: `[e_i, e_{i+1})`, last bin closed."""
    idx = np.searchsorted(edges, p, side="right") - 1
    return np.clip(idx, 0, edges.size - 2)


@dataclasses.dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin statistics of a reliability diagram.

    Attributes:
      bin_edges: float64 `[B + 1]`.
      confidence: float64 `[B]` mean confidence per bin (NaN for empty bins).
      accuracy: float64 `[B]` mean label per bin (NaN for empty bins).
      count: int64 `[B]` samples per bin.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """float64 `[B]` `|accuracy - confidence|` (NaN for empty bins)."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        """The expected calibration error these bins give."""
        n = self.count.sum()
        nz = self.count > 0
        return float(np.sum(self.count[nz] / n * self.gap[nz]))


def reliability_curve(probs, labels, *, num_bins: int = 10,
                      bin_edges: Sequence[float] | None = None,
                      strategy: Strategy = "uniform") -> ReliabilityCurve:
    """Per-bin mean confidence, accuracy and count.

    Args:
      probs: float `[N]` predicted probabilities of the positive label, in [0, 1].
      labels: `[N]` 0/1 (bool or int) labels.
      num_bins, bin_edges, strategy: see `bin_edges_for`.

    Returns:
      A `ReliabilityCurve`.

    Raises:
      ValueError: empty input, NaN, probabilities outside [0, 1], labels other than 0/1.
    """
    p, y = _validate(probs, labels)
    edges = bin_edges_for(p, num_bins=num_bins, bin_edges=bin_edges, strategy=strategy)
    b = _bin_index(p, edges)
    nb = edges.size - 1
    count = np.bincount(b, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=p, minlength=nb) / count
        acc = np.bincount(b, weights=y, minlength=nb) / count
    return ReliabilityCurve(edges, conf, acc, count.astype(np.int64))


def expected_calibration_error(probs, labels, *, num_bins: int = 10,
                               bin_edges: Sequence[float] | None = None,
                               strategy: Strategy = "uniform") -> float:
    """Expected calibration error: bin gaps weighted by each bin's share of samples.

    Args:
      probs: float `[N]` probabilities in [0, 1].
      labels: `[N]` 0/1 labels.
      num_bins: default 10. bin_edges: explicit edges (e.g. `[0, 0.33, 0.66, 1.0]`).
      strategy: {'uniform', 'quantile'}, default='uniform'.

    Returns:
      ECE in [0, 1].
    """
    return reliability_curve(probs, labels, num_bins=num_bins, bin_edges=bin_edges,
                             strategy=strategy).ece


def maximum_calibration_error(probs, labels, *, num_bins: int = 10,
                              bin_edges: Sequence[float] | None = None,
                              strategy: Strategy = "uniform") -> float:
    """Maximum calibration error: the largest bin gap over non-empty bins (same arguments as
    `expected_calibration_error`)."""
    rc = reliability_curve(probs, labels, num_bins=num_bins, bin_edges=bin_edges,
                           strategy=strategy)
    return float(np.max(rc.gap[rc.count > 0]))


def brier_score(probs, labels) -> float:
    """Mean squared error `mean((p - y)^2)` of float `[N]` probabilities against 0/1 labels."""
    p, y = _validate(probs, labels)
    return float(np.mean((p - y) ** 2))


def negative_log_likelihood(probs, labels, *, eps: float = 1e-7) -> float:
    """Mean binary NLL `-mean(y log p + (1 - y) log(1 - p))`, `p` clipped to `[eps, 1 - eps]`.

    Args:
      probs: float `[N]` probabilities in [0, 1] (0 and 1 are clipped, so the result is finite).
      labels: `[N]` 0/1 labels.
      eps: clip, default 1e-7 (the calibration ops' value).
    """
    p, y = _validate(probs, labels)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _box_features(boxes, n: int, features: Sequence[str]) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape != (n, 4):
        raise ValueError(f"boxes: expected shape ({n}, 4) [ymin, xmin, ymax, xmax], got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("boxes: contains non-finite values")
    ymin, xmin, ymax, xmax = b.T
    table = {"cx": (xmin + xmax) / 2, "cy": (ymin + ymax) / 2, "w": xmax - xmin,
             "h": ymax - ymin,
             "size": 1.0 + np.log10(np.clip(np.clip(xmax - xmin, 0, None)
                                            * np.clip(ymax - ymin, 0, None), 1e-4, 1.0)) / 4.0}
    bad = [f for f in features if f not in table]
    if bad:
        raise ValueError(f"box_features: expected names from {BOX_FEATURE_NAMES}, got {bad}")
    return np.stack([np.clip(table[f], 0.0, 1.0) for f in features], axis=1)


def detection_ece(scores, tp, *, boxes=None, num_bins: int = 10, box_bins: int = 5,
                  box_features: Sequence[str] = BOX_FEATURES) -> float:
    """Detection expected calibration error (D-ECE, Küppers et al. 2020).

    D-ECE = sum over bins `b` of `(n_b / n) * |precision_b - confidence_b|`, where
    `precision_b` is the share of true positives among the detections in bin `b`. Without
    `boxes` the bins are `num_bins` uniform confidence bins (the confidence-only D-ECE); with
    `boxes` they are the joint grid of `num_bins` confidence bins times `box_bins` uniform bins on
    [0, 1] for each of `box_features` (box center `cx`, `cy`, width `w`, height `h`, relative
    log size `size`, in
    normalized image coordinates, clipped to [0, 1]). Only non-empty bins count.

    Args:
      scores: float `[N]` detection confidences in [0, 1].
      tp: `[N]` 0/1: 1 if the detection matched a ground truth (true positive).
      boxes: optional float `[N, 4]` `[ymin, xmin, ymax, xmax]`, normalized to [0, 1].
      num_bins: confidence bins, default 10. box_bins: bins per box feature, default 5.
      box_features: subset of ('cx', 'cy', 'w', 'h', 'size'), default ('cx', 'cy', 'w', 'h');
        `size` is the relative log size `1 + log10(clip(w * h, 1e-4, 1)) / 4`.

    Returns:
      D-ECE in [0, 1].
    """
    p, y = _validate(scores, tp, "scores")
    for name, v in (("num_bins", num_bins), ("box_bins", box_bins)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {v!r}")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    cols = [_bin_index(p, edges)]
    dims = [num_bins]
    if boxes is not None:
        feats = _box_features(boxes, p.size, tuple(box_features))
        fe = np.linspace(0.0, 1.0, box_bins + 1)
        for j in range(feats.shape[1]):
            cols.append(_bin_index(feats[:, j], fe))
            dims.append(box_bins)
    flat = np.ravel_multi_index(tuple(cols), tuple(dims))
    _, b = np.unique(flat, return_inverse=True)
    count = np.bincount(b)
    conf = np.bincount(b, weights=p) / count
    prec = np.bincount(b, weights=y) / count
    return float(np.sum(count / p.size * np.abs(prec - conf)))
