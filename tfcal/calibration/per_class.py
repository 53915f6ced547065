"""Per-class fitting with shrinkage toward the pooled fit, for any registered method.

`fit_per_class` works on detections: one score per detection for its own class, a 0/1 label
(true or false positive after matching) and the class column. It is a one-vs-rest binary fit per
class, matching the `sigmoid`/`identity` converters for every method and the `softmax` converter
for `platt` and `isotonic`. The method fits and blends; the shrinkage weights are decided here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Sequence

import numpy as np

from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, get

__all__ = ["PerClassCalibration", "fit_per_class"]

_FIT_ARGUMENTS = {"self", "x", "y", "c", "num_classes", "w", "class_labels", "boxes",
                  "min_samples"}


@dataclasses.dataclass(frozen=True)
class PerClassCalibration:
    """Per-class calibration parameters, in `PostProcessConfig` field shapes.

    The method's parameters are also attributes (`calib.temperature`, `calib.knots_x`, ...).

    Attributes:
      method: a registered method name (`tfcal.calibration.names()`).
      num_classes: K.
      params: the method's parameters for K classes (`PostProcessConfig` field shapes).
      fallback_classes: columns whose parameters were shrunk toward, or replaced by, the pooled
        fit (fewer than `min_samples` detections, or one label value).
      num_samples: detections per class, length K.
      weights: the per-class weight `w_k` in [0, 1] of the shrinkage rule, length K.
      pooled: the pooled fit's parameters (the method's parameter names, one class).
    """

    method: str
    num_classes: int
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fallback_classes: list[int] = dataclasses.field(default_factory=list)
    num_samples: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    pooled: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        m = get(self.method)
        object.__setattr__(self, "method", m.name)
        object.__setattr__(self, "params", m.check_params(self.params, self.num_classes))

    def __getattr__(self, name: str):
        params = self.__dict__.get("params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} of method "
                             f"{self.__dict__.get('method')!r} has no attribute {name!r}")

    @property
    def calibration_method(self) -> CalibrationMethod:
        """The registered method object."""
        return get(self.method)

    def config_fields(self) -> dict:
        """The `PostProcessConfig` keyword arguments this calibration sets."""
        return {"calibration": self.method, **self.params}

    def broadcast(self, num_classes: int) -> "PerClassCalibration":
        """A one-class (pooled) fit repeated for every one of `num_classes` columns."""
        if self.num_classes != 1:
            raise ValueError(f"broadcast: needs a one-class fit, got {self.num_classes} classes")
        return dataclasses.replace(
            self, num_classes=num_classes,
            params=self.calibration_method.broadcast(self.params, num_classes),
            fallback_classes=[], num_samples=(), weights=())

    def report_entry(self, k: int) -> dict:
        """What the tuning report records for class column `k` (see the method's
        `report_entry`: `{"temperature": T}`, `{"a": a, "b": b}`, `{"knots": M}`)."""
        return self.calibration_method.report_entry(self.params, k)

    def class_params(self, k: int) -> dict:
        """JSON-able parameters of class column `k`: the report entry, the method's parameters
        of that column, and `num_samples`, `weight` and `fallback` (bool)."""
        if not 0 <= k < self.num_classes:
            raise ValueError(f"k: must be in [0, {self.num_classes}), got {k}")
        out = self.report_entry(k)
        for name, value in self.params.items():
            row = value[k]
            out.setdefault(name, list(row) if isinstance(row, tuple) else row)
        if self.num_samples:
            out.update(num_samples=self.num_samples[k], weight=self.weights[k])
        out["fallback"] = k in self.fallback_classes
        return out

    def apply(self, x, class_index=None, boxes=None) -> np.ndarray:
        """Calibrates scores exactly as the TF map does (sigmoid/identity converter semantics).

        Args:
          x: what `fit_per_class` took (values in the method's space: logits for `temperature`
            and `platt`, uncalibrated probabilities for `isotonic`). Either float `[N]` with
            `class_index`, or float `[..., K]` (one column per class) with `class_index=None`.
          class_index: int `[N]` class column per score, or None.
          boxes: float `[N, 4]` (or `[..., 4]`) normalized boxes of the scores, for a method
            that `uses_boxes` (ignored by the others).

        Returns:
          float32, same shape as `x`: calibrated probabilities.
        """
        v = nx.as_float_array(x, "x")
        extra = {"boxes": boxes} if self.calibration_method.uses_boxes else {}
        if class_index is None:
            if v.shape[-1] != self.num_classes:
                raise ValueError(f"x: last axis must be num_classes={self.num_classes} when "
                                 f"class_index is None, got shape {v.shape}")
            return self.calibration_method.apply(v, self.params, **extra)
        c = _as_class_index(class_index, v.shape, self.num_classes)
        return self.calibration_method.apply(v, self.params, c, **extra)

    def apply_to_probabilities(self, probs, class_index=None, boxes=None) -> np.ndarray:
        """`apply` on uncalibrated probabilities (converted to the method's space first)."""
        return self.apply(self.calibration_method.to_space(probs), class_index, boxes)


def _as_class_index(class_index, shape, num_classes: int) -> np.ndarray:
    c = np.asarray(class_index)
    if c.shape != tuple(shape) or (c.size and not np.issubdtype(c.dtype, np.integer)):
        raise ValueError(f"class_index: expected int array of shape {tuple(shape)}, got "
                         f"{c.dtype} {c.shape}")
    if c.size and (c.min() < 0 or c.max() >= num_classes):
        bad = c[(c < 0) | (c >= num_classes)][0]
        raise ValueError(f"class_index: must be in [0, {num_classes}), got {bad}")
    return c.astype(np.intp)


def fit_per_class(method: str, logits_or_probs, labels, class_index, num_classes: int, *,
                  min_samples: int = 30, class_labels: Sequence[str] | None = None,
                  **options) -> PerClassCalibration:
    """Fits one calibration map per class column, shrinking small classes toward the pooled fit.

    Shrinkage rule. Let `n_k` be the number of detections of class `k` and
    `w_k = min(1, n_k / min_samples)`. A class with `n_k == 0` or with only one label value gets
    `w_k = 0` (the pooled fit). Otherwise its own fit is blended with the pooled fit (all classes
    together), as the method defines the blend:

    - temperature: `log T_k = w_k log T_own + (1 - w_k) log T_pooled`; a class whose own
      temperature stopped at a bound (separable or uninformative data) carries no usable
      estimate: it gets `w_k = 0`, and a `TfcalWarning` lists it;
    - platt: `(a_k, b_k) = w_k (a_own, b_own) + (1 - w_k) (a_pooled, b_pooled)` (so the logit
      map is the same blend of the two logit maps);
    - isotonic: knots on the union of both knot sets with
      `y = w_k f_own(x) + (1 - w_k) f_pooled(x)`, which is exactly the pointwise blend of the
      two clamped piecewise-linear maps and stays monotone.

    Every class with `w_k < 1` is listed in `fallback_classes`. Temperature and Platt fits run on
    all classes at once (vectorized over classes with `np.bincount`).

    Args:
      method: a registered method name, e.g. {'temperature', 'platt', 'isotonic'}.
      logits_or_probs: float `[N]` values in the method's space: logits for `temperature`/`platt`
        (`probs_to_logits` of the sigmoid scores), uncalibrated probabilities for `isotonic`
        (`get(method).to_space(probs)` converts).
      labels: `[N]` 0/1 (1 = true positive).
      class_index: int `[N]` class column of each detection, in `[0, num_classes)`.
      num_classes: K >= 1.
      min_samples: detections a class needs for full weight on its own fit, default 30.
      class_labels: optional K names for the classes in warnings (default: column indices).
      **options: the method's fit options, e.g. temperature `bounds` (default (0.05, 20.0)),
        and `boxes`: float `[N, 4]` normalized boxes of the detections, for a method that
        `uses_boxes` (required there, refused by the others).

    Returns:
      A `PerClassCalibration`.

    Raises:
      ValueError: empty, non-finite or mismatched inputs; unknown method or option.
    """
    m = get(method)
    x = nx.as_float_array(logits_or_probs, "logits_or_probs", ndim=1)
    n = x.size
    y = nx.as_binary_labels(labels, "labels", n)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
    if not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples: must be an int >= 1, got {min_samples!r}")
    c = _as_class_index(class_index, (n,), int(num_classes))
    k = int(num_classes)
    if class_labels is not None and len(class_labels) != k:
        raise ValueError(f"class_labels: expected {k} names, got {len(class_labels)}")
    counts = np.bincount(c, minlength=k)
    pos = np.bincount(c, weights=y, minlength=k)
    single = (pos == 0) | (pos == counts)
    w = np.minimum(1.0, counts / float(min_samples))
    w[(counts == 0) | single] = 0.0
    boxes = options.pop("boxes", None)
    takes = set(inspect.signature(m.fit).parameters) - _FIT_ARGUMENTS
    unknown = sorted(set(options) - takes)
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of calibration method {m.name!r} "
                         f"(its options: {sorted(takes) or 'none'})")
    if m.uses_boxes:
        if boxes is None:
            raise ValueError(f"boxes: calibration method {m.name!r} needs the detections' boxes")
        options = {**options, "boxes": boxes, "min_samples": int(min_samples)}
    elif boxes is not None:
        raise ValueError(f"boxes: calibration method {m.name!r} does not use boxes")
    params, pooled, w = m.fit(x, y, c, k, w, class_labels=class_labels, **options)
    return PerClassCalibration(
        method=m.name, num_classes=k, params=params,
        fallback_classes=[int(i) for i in np.flatnonzero(w < 1)],
        num_samples=tuple(int(v) for v in counts), weights=tuple(float(v) for v in w),
        pooled=pooled)
