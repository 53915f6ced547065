"""Score calibration methods, one module each, and the registry that the rest of tfcal asks.

A method (`none.py`, `temperature.py`, `platt.py`, `isotonic.py`) owns its map in NumPy and TF,
its parameters' schema (validated once, in `check_params`), its per-class fit, its inverse for
the candidate pre-filter and its report text; `get(name)` returns it. Adding a method is one new
module here that defines a `CalibrationMethod` subclass decorated with `@register` (and its
test): every module of this package is imported below, and configs, `PostProcessConfig`, the
layers and the tuner accept its name and parameters from then on.

- `none`: `q = p` (`identity` converter: `q = sigmoid(z)`).
- `temperature`: `q = sigmoid(z / T)` (softmax converter: `q = softmax(z / T)` over all columns).
- `platt`: `q = sigmoid(a * z + b)`.
- `box_platt`: `q = sigmoid(a * z + b + c * s)`, `s` the box's relative log size in [0, 1]
  (`box_platt.py`); the one method that reads the boxes (`uses_boxes`).
- `isotonic` (older records: `piecewise_linear`): `q = interp(u, knots_x, knots_y)` on the
  uncalibrated probability `u`, clamped to the end knots' `y` outside the knot range.

Score spaces (shared with `tfcal.ops`): for the `sigmoid` converter the raw score `p` is a
probability and `z = logit(clip(p, EPS, 1 - EPS))` with `EPS = 1e-7`, clipped in float32; for
`identity` the raw score is the logit; for `softmax`, `z = log(clip(p, EPS, 1))` over all
columns. Fitting is done in float64; the NumPy maps return float32 like the TF ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import tensorflow as tf

from tfcal.calibration._base import CalibrationMethod, get, names, register, split_params
from tfcal.calibration._numeric import EPS, probs_to_logits, scores_to_logits

# Every public module of the package is a method (or the per-class fitter): import them all, so
# that each registers itself.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from tfcal.calibration.isotonic import apply_piecewise_linear, fit_isotonic  # noqa: E402
from tfcal.calibration.per_class import PerClassCalibration, fit_per_class  # noqa: E402
from tfcal.calibration.platt import apply_platt, fit_platt  # noqa: E402
from tfcal.calibration.temperature import (  # noqa: E402
    TEMPERATURE_BOUNDS, apply_temperature, fit_temperature)

__all__ = [
    "EPS",
    "TEMPERATURE_BOUNDS",
    "CalibrationMethod",
    "PerClassCalibration",
    "apply_piecewise_linear",
    "apply_platt",
    "apply_temperature",
    "calibrate_scores",
    "calibrate_scores_tf",
    "fit_isotonic",
    "fit_per_class",
    "fit_platt",
    "fit_temperature",
    "get",
    "names",
    "probs_to_logits",
    "raw_score_lower_bounds",
    "register",
    "scores_to_logits",
    "split_params",
]


def calibrate_scores(raw_scores, *, score_converter: str = "sigmoid",
                     background_column: bool = True, method: str = "none", boxes=None,
                     **params: Any):
    """Raw detector scores to calibrated class probabilities, NumPy (twin of
    `calibrate_scores_tf`).

    Args:
      raw_scores: float `[..., C]` raw detector scores; `C = K + 1` when `background_column`.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'.
      background_column: raw column 0 is background and is dropped from the output.
      method: a registered method name, default='none'.
      boxes: float `[..., 4]` normalized boxes of the rows, for a method that reads them
        (`box_platt`); ignored by the others.
      **params: the method's parameters (e.g. `temperature=[1.3]`), checked by the method.

    Returns:
      float32 `[..., K]` calibrated class probabilities.
    """
    return get(method).calibrate(raw_scores, params, score_converter=score_converter,
                                 background_column=background_column, boxes=boxes)


def calibrate_scores_tf(raw_scores, *, score_converter: str = "sigmoid",
                        background_column: bool = True, method: str = "none",
                        num_classes: int | None = None, boxes=None,
                        **params: Any) -> tf.Tensor:
    """Raw detector scores to calibrated class probabilities, TF, from Python parameters.

    The parameters are checked once here (against `num_classes` when given); the layers keep
    them in weights instead (`tfcal.layers.ScoreCalibration`), through the same method.

    Args:
      raw_scores: float `[..., C]` raw scores; `C = K + 1` when `background_column`, else `K`.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'.
      background_column: raw column 0 is background and is dropped from the output.
      method: a registered method name, default='none'.
      num_classes: K, to check parameter lengths (default: from the static shape, if known).
      boxes: as for `calibrate_scores`.
      **params: the method's parameters.

    Returns:
      float32 `[..., K]` calibrated probabilities in [0, 1].
    """
    m = get(method)
    if num_classes is None:
        columns = tf.convert_to_tensor(raw_scores).shape[-1]
        num_classes = None if columns is None else columns - int(background_column)
    weights = m.weights(m.check_params(params, num_classes))
    return m.calibrate_tf(raw_scores, weights, score_converter=score_converter,
                          background_column=background_column, boxes=boxes)


def raw_score_lower_bounds(min_score_thresh, class_enabled=None, *, num_classes: int,
                           score_converter: str = "sigmoid", method: str = "none",
                           **params: Any) -> tf.Tensor:
    """Per-class raw-score bounds implied by thresholds on calibrated probabilities, from
    Python parameters (see `CalibrationMethod.raw_lower_bounds`).

    Returns:
      float32 `[K]`: `calibrated_k >= min_score_thresh_k` implies `raw_k >= bound_k`.
    """
    m = get(method)
    weights = m.weights(m.check_params(params, num_classes))
    return m.raw_lower_bounds(min_score_thresh, weights, num_classes=num_classes,
                              score_converter=score_converter, class_enabled=class_enabled)

