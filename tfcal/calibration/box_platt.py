"""Box-dependent Platt scaling: `q = sigmoid(a_k * z + b_k + c_k * s(box))` per class.

`z` is the logit of the raw score (as for `platt`) and `s` the box's relative log size

    s = 1 + log10(clip(area, AREA_MIN, 1)) / 4,   area = (ymax - ymin) * (xmax - xmin),

on normalized `[ymin, xmin, ymax, xmax]` boxes, with `AREA_MIN = 1e-4` (a box of 1% x 1% of the
image); so `s` is in [0, 1]: 0 for boxes of area <= 1e-4, 1 for a box filling the image. A
per-class threshold on `q` is, in raw-score terms, a threshold that moves with the box size.

Fit, per class, minimum NLL against Platt's smoothed targets over `(a, b, c)` (vectorized Newton
with backtracking). Shrinkage, where data are thin, goes to the class-only fit: the class-only
Platt fit `(a0_k, b0_k)` (itself shrunk toward the pooled Platt fit by `fit_per_class`'s rule)
is blended with the class's own box fit by `v_k = min(1, n_k / (BOX_SAMPLES_FACTOR *
min_samples))` (a box fit has three parameters): `(a, b, c)_k = v_k (a, b, c)_own + (1 - v_k)
(a0_k, b0_k, 0)`. A class with one label value, or whose own fit has a slope `a < 0` (which
would reverse the ranking), gets `v_k = 0`.

Pre-filter. With `a_k > 0`, `q >= t` needs `a z + b + c s >= logit(t)` for some `s` in [0, 1],
so `z >= (logit(t) - b - max(c, 0)) / a` bounds the raw score of every box size
(`raw_lower_bounds`). The serving graph knows each box's size before calibrating, so it uses a
tighter floor per box (`box_candidate_floor_tf`): with the size range cut into `FLOOR_BINS`
equal bins, bin `j = floor(s * FLOOR_BINS)` (exact in float32: the scale is a power of two) has
per-class bounds `(logit(t) - b - c * s_worst) / a`, `s_worst` the bin's upper end for `c > 0` and
its lower end otherwise, and a box is a candidate when its best class score reaches the least of
its bin's bounds; the same safety margins as `raw_lower_bounds`.

Every op of the TF map is elementwise (`LOG`, `MAXIMUM`, `MINIMUM`, `MUL`, `ADD`, `LOGISTIC`
in TFLite's builtin set).

Parameters: `box_a` (K values >= 0), `box_b`, `box_c` (K values each).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfcal import validation
from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, get, register

__all__ = ["AREA_MIN", "BOX_SAMPLES_FACTOR", "BoxPlatt", "box_size_feature",
           "box_size_feature_tf"]

#: Boxes smaller than this normalized area share the size feature 0.
AREA_MIN = 1e-4
#: A class needs this many times `min_samples` detections for full weight on its box fit.
BOX_SAMPLES_FACTOR = 3
#: Size bins of the per-box candidate floor (a power of two, so binning is exact).
FLOOR_BINS = 8
_LOG10_AREA_MIN = math.log10(AREA_MIN)


def box_size_feature(boxes) -> np.ndarray:
    """`s = 1 - log10(clip(area, AREA_MIN, 1)) / log10(AREA_MIN)` of float `[..., 4]` normalized
    `[ymin, xmin, ymax, xmax]` boxes: float64 `[...]` in [0, 1]."""
    b = nx.as_float_array(boxes, "boxes")
    if b.shape[-1] != 4:
        raise ValueError(f"boxes: expected a last axis of 4 [ymin, xmin, ymax, xmax], got shape "
                         f"{b.shape}")
    area = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    return 1.0 - np.log10(np.clip(area, AREA_MIN, 1.0)) / _LOG10_AREA_MIN


def box_size_feature_tf(boxes: tf.Tensor) -> tf.Tensor:
    """TF twin of `box_size_feature`: float32 `[..., 4]` -> `[...]` (elementwise ops only)."""
    b = tf.cast(boxes, tf.float32)
    h = tf.maximum(b[..., 2] - b[..., 0], 0.0)
    w = tf.maximum(b[..., 3] - b[..., 1], 0.0)
    area = tf.minimum(tf.maximum(h * w, AREA_MIN), 1.0)
    return 1.0 - tf.math.log(area) / float(math.log(AREA_MIN))


def _fit_groups(z, s, t, group, num_groups, start, *, max_iter: int = 60):
    """Minimum mean NLL of `sigmoid(a z + b + c s)` against targets `t`, per group.

    Vectorized Newton with backtracking on the per-group loss; a tiny ridge keeps the 3x3
    systems solvable when `s` or `z` is constant in a group.

    Returns:
      float64 `[G, 3]` `(a, b, c)`.
    """
    x = np.stack([z, np.ones_like(z), s], axis=1)  # [N, 3]
    theta = np.array(start, dtype=np.float64).copy()  # [G, 3]
    counts = np.maximum(np.bincount(group, minlength=num_groups), 1).astype(np.float64)

    def loss(th):
        m = np.einsum("nj,nj->n", x, th[group])
        return np.bincount(group, weights=np.logaddexp(0.0, m) - t * m,
                           minlength=num_groups) / counts

    cur = loss(theta)
    pairs = [(i, j) for i in range(3) for j in range(3)]
    for _ in range(max_iter):
        m = np.einsum("nj,nj->n", x, theta[group])
        p = nx.sigmoid(m)
        r = p - t
        g = np.stack([np.bincount(group, weights=r * x[:, j], minlength=num_groups)
                      for j in range(3)], axis=1) / counts[:, None]
        wgt = p * (1 - p)
        h = np.zeros((num_groups, 3, 3))
        for i, j in pairs:
            h[:, i, j] = np.bincount(group, weights=wgt * x[:, i] * x[:, j],
                                     minlength=num_groups) / counts
        h += 1e-9 * np.eye(3)
        step = np.linalg.solve(h, g[..., None])[..., 0]
        scale = np.ones(num_groups)
        new = theta - step
        trial = loss(new)
        for _ in range(30):
            worse = trial > cur + 1e-15
            if not np.any(worse):
                break
            scale = np.where(worse, scale / 2, scale)
            new = theta - scale[:, None] * step
            trial = np.where(worse, loss(new), trial)
        done = np.max(np.abs(new - theta), axis=1) < 1e-10
        theta, cur = new, np.minimum(trial, cur)
        if np.all(done):
            break
    return theta


def _vector(weights, name) -> tf.Tensor:
    return tf.reshape(tf.cast(weights[name], tf.float32), [-1])


@register
class BoxPlatt(CalibrationMethod):
    """`q = sigmoid(a_k z + b_k + c_k s(box))`, `s` the relative log size (module docstring)."""

    name = "box_platt"
    space = "logit"
    params = ("box_a", "box_b", "box_c")
    uses_boxes = True

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        self.own_params(params)
        lengths = (num_classes,) if num_classes is not None else None
        a = validation.floats("box_a", params["box_a"], lengths=lengths, lo=0.0)
        b = validation.floats("box_b", params["box_b"], lengths=(len(a),))
        c = validation.floats("box_c", params["box_c"], lengths=(len(a),))
        return {"box_a": a, "box_b": b, "box_c": c}

    def classes_of(self, params):
        return len(params["box_a"])

    def check_fit_converter(self, score_converter: str) -> None:
        if score_converter == "softmax":
            raise ValueError("box_platt with score_converter softmax is not supported; use "
                             "platt or isotonic")

    def fit(self, x, y, c, num_classes, w, *, class_labels=None, boxes=None,
            min_samples=30):
        if boxes is None:
            raise ValueError("box_platt: the fit needs the detections' boxes")
        s = box_size_feature(boxes)
        if s.shape != x.shape:
            raise ValueError(f"boxes: expected {x.size} boxes, got shape {np.shape(boxes)}")
        k, n = num_classes, x.size
        base, base_pooled, w = get("platt").fit(x, y, c, k, w, class_labels=class_labels)
        a0 = np.append(np.asarray(base["platt_a"]), base_pooled["platt_a"])
        b0 = np.append(np.asarray(base["platt_b"]), base_pooled["platt_b"])
        # Group K is the pooled fit, solved with the classes.
        zz, ss, yy = (np.concatenate([v, v]) for v in (x, s, y))
        gg = np.concatenate([c, np.full(n, k, dtype=np.intp)])
        pos = np.bincount(gg, weights=yy, minlength=k + 1)
        cnt = np.bincount(gg, minlength=k + 1).astype(np.float64)
        t_pos, t_neg = (pos + 1) / (pos + 2), 1 / (cnt - pos + 2)
        t = np.where(yy > 0, t_pos[gg], t_neg[gg])
        start = np.stack([np.maximum(a0, 0.0), b0, np.zeros(k + 1)], axis=1)
        own = _fit_groups(zz, ss, t, gg, k + 1, start)
        v = np.minimum(1.0, cnt / float(BOX_SAMPLES_FACTOR * min_samples))
        single = (pos == 0) | (pos == cnt)
        v[single | (own[:, 0] < 0) | ~np.all(np.isfinite(own), axis=1)] = 0.0
        v[:k][w == 0] = 0.0
        fit_a = v * own[:, 0] + (1 - v) * a0
        fit_b = v * own[:, 1] + (1 - v) * b0
        fit_c = v * np.where(np.isfinite(own[:, 2]), own[:, 2], 0.0)
        fit_a = np.maximum(fit_a, 0.0)

        def floats(a):
            return tuple(float(q) for q in a)

        return ({"box_a": floats(fit_a[:k]), "box_b": floats(fit_b[:k]),
                 "box_c": floats(fit_c[:k])},
                {"box_a": float(fit_a[k]), "box_b": float(fit_b[k]), "box_c": float(fit_c[k])},
                np.minimum(w, v[:k]))

    # ------------------------------------------------------------------------- maps

    def apply(self, x, params, class_index=None, boxes=None):
        if boxes is None:
            raise ValueError("box_platt: calibrating needs the boxes")
        z = nx.as_float_array(x, "x")
        s = box_size_feature(boxes)
        a, b, c = (np.asarray(params[p], dtype=np.float64) for p in self.params)
        if class_index is not None:
            a, b, c = a[class_index], b[class_index], c[class_index]
        elif s.shape != z.shape:
            s = s[..., None]  # one box per row for every class column
        return nx.sigmoid(a * z + b + c * s).astype(np.float32)

    def apply_tf(self, x, weights, boxes=None):
        if boxes is None:
            raise ValueError("box_platt: calibrating needs the boxes")
        boxes = tf.convert_to_tensor(boxes)
        s = box_size_feature_tf(boxes)
        if boxes.shape.rank == x.shape.rank:  # [..., 4] boxes for [..., K] scores
            s = s[..., None]
        a, b, c = (_vector(weights, p) for p in self.params)
        return tf.sigmoid(a * x + b + c * s)

    def lower_bound_tf(self, t, weights, num_classes):
        a, b, c = (tf.broadcast_to(_vector(weights, p), [num_classes]) for p in self.params)
        lt = tf.math.log(t) - tf.math.log1p(-t)  # logit(t); -inf at t = 0
        # The most any box size adds to the logit: c * s at s = 1 (c > 0) or s = 0 (c <= 0).
        top = b + tf.maximum(c, 0.0)
        return tf.where(a > 0, (lt - top) / tf.where(a > 0, a, 1.0), -np.inf)

    def box_candidate_floor_tf(self, boxes, min_score_thresh, weights, *, num_classes: int,
                               score_converter: str = "sigmoid", class_enabled=None):
        """Per-box raw-score floors of the candidate pre-filter (see the module docstring).

        Args:
          boxes: float `[batch, num_boxes, 4]` normalized boxes (per-class boxes `[..., K, 4]`
            are not supported: use `raw_lower_bounds`).
          min_score_thresh, weights, num_classes, score_converter, class_enabled: as for
            `raw_lower_bounds`.

        Returns:
          float32 `[batch, num_boxes]`: a box whose best class raw score is below its floor
          passes no class threshold.
        """
        bins = np.arange(FLOOR_BINS, dtype=np.float32)
        s_lo, s_hi = bins / FLOOR_BINS, (bins + 1) / FLOOR_BINS
        a, b, c = (tf.broadcast_to(_vector(weights, p), [num_classes]) for p in self.params)
        worst = tf.where(c[None, :] > 0, s_hi[:, None], s_lo[:, None])  # [bins, K]
        table = tf.stack([
            tf.reduce_min(self.raw_lower_bounds(
                min_score_thresh, {"box_a": a, "box_b": b + c * worst[j], "box_c": 0.0 * c},
                num_classes=num_classes, score_converter=score_converter,
                class_enabled=class_enabled))
            for j in range(FLOOR_BINS)])
        s = box_size_feature_tf(boxes)
        index = tf.clip_by_value(tf.cast(tf.floor(s * FLOOR_BINS), tf.int32), 0, FLOOR_BINS - 1)
        return tf.gather(table, index)

    def report_entry(self, params, k):
        return {"a": float(params["box_a"][k]), "b": float(params["box_b"][k]),
                "c": float(params["box_c"][k])}

    def describe(self, entry):
        return f"a={entry['a']:.3g}, b={entry['b']:.3g}, size c={entry['c']:.3g}"
