"""The calibration-method interface, the registry, and the raw-score plumbing every method shares.

A method (one module in this package) subclasses `CalibrationMethod`, states its name, the space
its map works in (`logit`: logits `z`; `probability`: the uncalibrated probability `u`) and its
parameter names, implements the map in NumPy and TF, its per-class fit, its inverse for the
candidate pre-filter and its report entry, and registers itself with `@register`. Everything
else (score converters, background column, thresholds in raw space) is done here once.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import tensorflow as tf

from tfcal import ops, validation
from tfcal.calibration import _numeric as nx

__all__ = ["CalibrationMethod", "get", "names", "register", "split_params"]

_REGISTRY: dict[str, "CalibrationMethod"] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type["CalibrationMethod"]) -> type["CalibrationMethod"]:
    """Class decorator: adds one instance of a method to the registry under its name."""
    for key in (cls.name,) + cls.aliases:
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"calibration method {key!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def names() -> tuple[str, ...]:
    """The registered method names (aliases not included), `none` first."""
    return tuple(sorted(_REGISTRY, key=lambda n: (n != "none", n)))


def get(method: "str | CalibrationMethod") -> "CalibrationMethod":
    """The registered method called `method` (or one of its aliases).

    Raises:
      ValueError: no method has that name.
    """
    if isinstance(method, CalibrationMethod):
        return method
    name = _ALIASES.get(method, method) if isinstance(method, str) else method
    if name not in _REGISTRY:
        raise ValueError(f"calibration method: expected one of {list(names())}, got {method!r}")
    return _REGISTRY[name]


def _all_params() -> dict[str, str]:
    return {p: m.name for m in _REGISTRY.values() for p in m.params}


def split_params(method: "str | CalibrationMethod", given: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """The entries of `given` that are parameters of `method`.

    An empty entry (`[]` or `()`) for another method's parameter is dropped: files and configs
    written before methods owned their parameters carry every method's fields, empty. A
    non-empty one would be ignored, so it is an error.

    Raises:
      ValueError: a non-empty parameter of another method, or a name no method uses.
    """
    m = get(method)
    owners = _all_params()
    out = {}
    for key, value in given.items():
        if key in m.params:
            out[key] = value
        elif key in owners:
            if hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0:
                continue
            used = ", ".join(m.params) if m.params else "no parameters"
            raise ValueError(f"{key}: a parameter of calibration method {owners[key]!r}, which "
                             f"method {m.name!r} does not use ({m.name!r} takes {used}); "
                             f"remove it or set the method to {owners[key]!r}")
        else:
            raise ValueError(f"{key}: not a parameter of any calibration method "
                             f"(known: {sorted(owners)})")
    return out


class CalibrationMethod:
    """One calibration method: its map (NumPy and TF), parameters, per-class fit and report.

    Subclasses set the class attributes and implement the methods that raise
    `NotImplementedError`; the raw-score methods (`calibrate`, `calibrate_tf`,
    `raw_lower_bounds`) are shared and turn raw scores into the method's space first.

    Attributes:
      name: the one name of the method everywhere (configs, `PostProcessConfig`, layers).
      aliases: older names still accepted when reading.
      space: {'logit', 'probability'}: what the map takes. `logit`: `z` (the raw score for the
        `identity` converter, else `logit(clip(p))`); `probability`: `u` (`p`, or `sigmoid(z)` for
        `identity`).
      params: parameter names, as `PostProcessConfig` fields and layer arguments.
      uses_boxes: the map also reads each box (`apply`, `apply_tf` and `fit` take `boxes`,
        normalized `[ymin, xmin, ymax, xmax]`, `[..., 4]` or `[..., K, 4]`); the other methods
        ignore boxes.
    """

    name: ClassVar[str]
    uses_boxes: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ()
    space: ClassVar[Literal["logit", "probability"]]
    params: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------------- schema

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        """Validates the parameters once; returns them as tuples (rows of tuples for knots).

        Args:
          params: the parameters of this method (other methods' names are rejected; see
            `split_params` for reading older records).
          num_classes: K, when known: per-class lengths are checked against it.

        Raises:
          ValueError: missing, malformed or out-of-range parameters, naming the parameter.
        """
        raise NotImplementedError

    def own_params(self, params: Mapping[str, Any]) -> None:
        """Raises ValueError on a missing parameter or one this method does not take."""
        extra = sorted(set(params) - set(self.params))
        if extra:
            takes = ", ".join(self.params) or "no parameters"
            raise ValueError(f"{extra[0]}: not a parameter of calibration method {self.name!r} "
                             f"(it takes {takes})")
        for p in self.params:
            if p not in params:
                raise ValueError(f"{p}: required for calibration method {self.name!r}")

    def classes_of(self, params: Mapping[str, tuple]) -> int | None:
        """K implied by checked parameters (None when they fit any K, e.g. a scalar)."""
        return None

    def filters_raw_scores(self, score_converter: str) -> bool:
        """Whether `raw_lower_bounds` can bound a class by its own raw column (False when the
        map mixes columns, e.g. softmax temperature)."""
        return True

    def check_fit_converter(self, score_converter: str) -> None:
        """Raises ValueError when detections of this converter cannot be fitted one by one."""

    # ------------------------------------------------------------------------- fitting

    def to_space(self, probs) -> np.ndarray:
        """Uncalibrated probabilities `[...]` in this method's space (float64), what `fit` takes."""
        return nx.probs_to_logits(probs) if self.space == "logit" else nx.as_float_array(
            probs, "probs")

    def fit(self, x: np.ndarray, y: np.ndarray, c: np.ndarray, num_classes: int,
            w: np.ndarray, *, class_labels=None, **options) -> tuple[dict, dict, np.ndarray]:
        """One map per class column, blended with the pooled fit by the weights `w`.

        Args:
          x: float64 `[N]` values in this method's space; y: float64 0/1 `[N]`;
          c: int `[N]` class columns; w: float64 `[K]` own-fit weights in [0, 1].
          class_labels: K names for warnings (None: column indices).
          **options: method options (e.g. temperature `bounds`); others are rejected.

        Returns:
          `(params, pooled, w)`: K-class parameters, the pooled one-class parameters (as
          floats or float tuples), and `w` after any method-specific fallbacks.
        """
        raise NotImplementedError

    def broadcast(self, params: Mapping[str, tuple], num_classes: int) -> dict[str, tuple]:
        """One-class parameters repeated for `num_classes` columns."""
        return {k: tuple(v) * num_classes for k, v in params.items()}

    # ------------------------------------------------------------------------- NumPy map

    def apply(self, x, params: Mapping[str, tuple], class_index=None) -> np.ndarray:
        """The map on values of this method's space, NumPy.

        Args:
          x: float `[..., K]` (one column per class), or `[N]` with `class_index`.
          params: checked parameters.
          class_index: None, or int `[N]` class column of each value.

        Returns:
          float32, the shape of `x`: calibrated probabilities.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------- TF map

    def weights(self, params: Mapping[str, tuple]) -> dict[str, np.ndarray]:
        """The float32 arrays a layer keeps as non-trainable weights, by parameter name."""
        return {k: np.asarray(v, np.float32) for k, v in params.items()}

    def apply_tf(self, x: tf.Tensor, weights: Mapping[str, Any]) -> tf.Tensor:
        """The map on float32 `[..., K]` values of this method's space, TF (`weights` as from
        `weights()`, or variables holding them)."""
        raise NotImplementedError

    def lower_bound_tf(self, t: tf.Tensor, weights: Mapping[str, Any], num_classes: int
                       ) -> tf.Tensor:
        """float32 `[K]`: the least value of this method's space whose image reaches `t[k]`
        (`-inf`: no bound, `+inf`: never reached). The caller adds the safety margins."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- report

    def report_entry(self, params: Mapping[str, tuple], k: int) -> dict:
        """JSON-able parameters of class column `k` for the tuning report."""
        raise NotImplementedError

    def describe(self, entry: Mapping[str, Any]) -> str:
        """A short text for the report's table from a `report_entry`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- raw scores

    def calibrate(self, raw_scores, params: Mapping[str, Any], *,
                  score_converter: str = "sigmoid", background_column: bool = True,
                  boxes=None) -> np.ndarray:
        """NumPy twin of `calibrate_tf`: float `[..., C]` raw scores -> float32 `[..., K]`."""
        validation.choice("score_converter", score_converter, ops.SCORE_CONVERTERS)
        s = nx.as_float_array(raw_scores, "raw_scores")
        if s.ndim < 1:
            raise ValueError(f"raw_scores: need a class axis, got shape {s.shape}")
        start = 1 if background_column else 0
        params = self.check_params(params, s.shape[-1] - start)
        cls = s[..., start:]
        if score_converter == "identity":
            x = cls if self.space == "logit" else nx.sigmoid(cls)
        else:
            nx.check_probs(cls, "raw_scores")
            x = nx.probs_to_logits(cls) if self.space == "logit" else cls
        if self.uses_boxes:
            return self.apply(x, params, boxes=boxes)
        return self.apply(x, params)

    def calibrate_tf(self, raw_scores, weights: Mapping[str, Any], *,
                     score_converter: str = "sigmoid", background_column: bool = True,
                     boxes=None) -> tf.Tensor:
        """Raw detector scores to calibrated class probabilities, TF.

        Args:
          raw_scores: float `[..., C]`; `C = K + 1` when `background_column`.
          weights: this method's parameters as from `weights()` (or variables holding them).
          score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'.
          background_column: raw column 0 is background and is dropped from the output.
          boxes: float `[..., 4]` or `[..., K, 4]` normalized boxes of the rows of
            `raw_scores`; read only by methods that `uses_boxes` (required there).

        Returns:
          float32 `[..., K]` calibrated probabilities in [0, 1].
        """
        validation.choice("score_converter", score_converter, ops.SCORE_CONVERTERS)
        raw = tf.cast(raw_scores, tf.float32)
        cls = raw[..., 1:] if background_column else raw
        if score_converter == "identity":
            x = cls if self.space == "logit" else tf.sigmoid(cls)
        else:
            x = ops.scores_to_logits(cls, "sigmoid") if self.space == "logit" else cls
        if self.uses_boxes:
            return self.apply_tf(x, weights, boxes=boxes)
        return self.apply_tf(x, weights)

    def raw_lower_bounds(self, min_score_thresh, weights: Mapping[str, Any], *,
                         num_classes: int, score_converter: str = "sigmoid",
                         class_enabled=None) -> tf.Tensor:
        """Per-class raw-score bounds `r_k`: `calibrated_k >= min_score_thresh_k => raw_k >= r_k`.

        The bounds are conservative (a little low), so filtering raw scores with them never drops
        a detection the exact thresholds keep; the exact check still runs afterwards. `-inf`
        means "cannot filter this class" (softmax temperature, Platt with `a <= 0`, or
        thresholds too low to matter); `+inf` means the class can never pass (disabled, or above
        the map's range).

        Args:
          min_score_thresh: float `[1]` or `[K]` thresholds on calibrated probabilities.
          weights: as for `calibrate_tf`.
          num_classes: K.
          score_converter: as for `calibrate_tf`.
          class_enabled: optional 0/1 float `[K]`.

        Returns:
          float32 `[K]` bounds in the raw score space of the class columns.
        """
        validation.choice("score_converter", score_converter, ops.SCORE_CONVERTERS)
        k = num_classes
        t = tf.broadcast_to(tf.reshape(tf.cast(min_score_thresh, tf.float32), [-1]), [k])
        # Lower the threshold a little in calibrated space (covers flat maps and rounding) ...
        t = tf.maximum(t - 1e-4, 0.0)
        inf = tf.constant(np.inf, tf.float32)
        bound = self.lower_bound_tf(t, weights, k)
        if self.space == "logit":
            bound = tf.where(tf.math.is_nan(bound), -inf, bound)
            if score_converter != "identity":
                bound = tf.sigmoid(bound)
                # Raw probabilities below EPS are clipped up to EPS, so a bound at or below EPS
                # cannot separate them: do not filter.
                bound = tf.where(bound <= 2 * ops.EPS, -inf, bound)
        elif score_converter == "identity":
            # u = sigmoid(z): move the probability bound to logit space.
            u = bound
            bound = tf.where(u <= 0.0, -inf, tf.where(u >= 1.0, inf,
                                                       tf.math.log(u) - tf.math.log1p(-u)))
            bound = tf.where(tf.math.is_nan(bound), -inf, bound)
        if score_converter == "identity":
            margin = 1e-4 * (1.0 + tf.abs(tf.where(tf.math.is_finite(bound), bound, 0.0)))
        else:
            margin = tf.fill([k], 1e-5)
        # ... and the bound a little in raw space (covers steep maps and rounding).
        bound = bound - margin
        if class_enabled is not None:
            bound = tf.where(tf.cast(class_enabled, tf.float32) > 0.5, bound, inf)
        return bound

    def __repr__(self) -> str:
        return f"<calibration method {self.name!r}>"
