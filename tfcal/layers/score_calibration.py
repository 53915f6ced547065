"""`ScoreCalibration`: raw detector scores to calibrated per-class probabilities (a Keras layer)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcal import calibration, ops, validation
from tfcal.layers._common import check_num_classes, constant_weight, float32_by_default


def _parameter_names() -> set[str]:
    return {p for n in calibration.names() for p in calibration.get(n).params}


@keras.saving.register_keras_serializable(package="tfcal")
class ScoreCalibration(keras.layers.Layer):
    """Turns raw scores into the method's space, applies its per-class map, drops background.

    The method and its score spaces are those of `tfcal.calibration` (`get(method)`); its
    parameters are given by name (`temperature=[...]`, `platt_a=[...]`, `knots_x=[[...], ...]`,
    as in `PostProcessConfig`) and checked by the method here, once. Tuned numbers live in
    non-trainable weights named like the parameters (knots padded to `[K, M]` by
    `tfcal.ops.pad_knots`), so they can be read or assigned without retracing
    (`parameter_weights`).

    Args:
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'. `identity`
        means the raw scores are logits.
      background_column: raw column 0 is background and is dropped from the output.
      method: a registered method, {'none', 'temperature', 'platt', 'isotonic'}, default='none'
        (`piecewise_linear`, the older name of `isotonic`, is read as `isotonic`).
      num_classes: optional K; when given, parameter lengths and the input's column count are
        checked against it.
      **kwargs: the method's parameters (required ones must be given; another method's
        parameter is an error, since it would be ignored), then `keras.layers.Layer` arguments
        (`name`, `dtype`, ...). temperature: `temperature`, 1 or K floats > 0; platt: `platt_a`,
        `platt_b`, K floats each; isotonic: `knots_x` (rows strictly increasing in [0, 1]) and
        `knots_y` (rows non-decreasing in [0, 1]), K rows of equal lengths per row.

    Call args:
      raw_scores: float `[batch, num_boxes, C]`, `C = K + 1` with a background column.

    Returns:
      float32 `[batch, num_boxes, K]` calibrated probabilities.

    Raises:
      ValueError: in `__init__`, on any bad or ignored argument (the message includes the
        value).
    """

    def __init__(self, score_converter="sigmoid", background_column=True, method="none",
                 num_classes=None, **kwargs):
        names = _parameter_names()
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        super().__init__(**float32_by_default(kwargs))
        self.score_converter = validation.choice("score_converter", score_converter,
                                                 ops.SCORE_CONVERTERS)
        self.background_column = validation.boolean("background_column", background_column)
        k = check_num_classes(num_classes)
        self.num_classes = k
        try:
            m = calibration.get(method)
        except ValueError:
            raise ValueError(f"method: expected one of {list(calibration.names())}, "
                             f"got {method!r}") from None
        self.method = m.name
        self._method = m
        self.params = m.check_params(calibration.split_params(m, given), k)
        self._parameter_weights = {name: constant_weight(self, name, value)
                         for name, value in m.weights(self.params).items()}
        self._expected_classes = k or m.classes_of(self.params)

    @property
    def calibration_method(self) -> calibration.CalibrationMethod:
        """The registered method this layer applies."""
        return self._method

    @property
    def parameter_weights(self) -> dict[str, keras.Variable]:
        """The non-trainable weights holding the method's parameters, by parameter name."""
        return dict(self._parameter_weights)

    def _weight_tensors(self) -> dict[str, tf.Tensor]:
        return {name: tf.convert_to_tensor(w) for name, w in self._parameter_weights.items()}

    def raw_lower_bounds(self, min_score_thresh, class_enabled=None, *,
                         num_classes: int) -> tf.Tensor:
        """Per-class raw-score bounds of thresholds on this layer's output, from the current
        weights (see `tfcal.calibration.CalibrationMethod.raw_lower_bounds`).

        Args:
          min_score_thresh: float `[1]` or `[K]` thresholds on calibrated probabilities.
          class_enabled: optional 0/1 float `[K]`.
          num_classes: K.

        Returns:
          float32 `[K]`.
        """
        return self._method.raw_lower_bounds(
            min_score_thresh, self._weight_tensors(), num_classes=num_classes,
            score_converter=self.score_converter, class_enabled=class_enabled)

    def box_candidate_floor(self, boxes, min_score_thresh, class_enabled=None, *,
                            num_classes: int) -> tf.Tensor:
        """Per-box raw-score floors of a box-dependent method (`box_candidate_floor_tf`, e.g.
        `tfcal.calibration.box_platt`), from the current weights: float32
        `[batch, num_boxes]` for boxes `[batch, num_boxes, 4]`."""
        return self._method.box_candidate_floor_tf(
            boxes, min_score_thresh, self._weight_tensors(), num_classes=num_classes,
            score_converter=self.score_converter, class_enabled=class_enabled)

    def _check_columns(self, columns) -> None:
        k = self._expected_classes
        if columns is None or k is None:
            return
        if columns - int(self.background_column) != k:
            raise ValueError(f"raw_scores: expected {k + int(self.background_column)} columns "
                             f"({k} classes, background_column={self.background_column}), "
                             f"got {columns}")

    def build(self, raw_scores_shape, boxes_shape=None):
        self._check_columns(raw_scores_shape[-1])

    def call(self, raw_scores, boxes=None):
        """`raw_scores` float `[..., C]` -> float32 `[..., K]`; `boxes` (float `[..., 4]` or
        `[..., K, 4]`, normalized) are required by a method that reads boxes (`box_platt`) and
        ignored by the others."""
        raw_scores = tf.cast(raw_scores, tf.float32)
        self._check_columns(raw_scores.shape[-1])
        if self._method.uses_boxes and boxes is None:
            raise ValueError(f"boxes: calibration method {self.method!r} needs the boxes")
        return self._method.calibrate_tf(raw_scores, self._weight_tensors(),
                                         score_converter=self.score_converter,
                                         background_column=self.background_column,
                                         boxes=boxes)

    def compute_output_shape(self, raw_scores_shape, boxes_shape=None):
        columns = raw_scores_shape[-1]
        k = None if columns is None else columns - int(self.background_column)
        return tuple(raw_scores_shape[:-1]) + (k,)

    def get_config(self):
        config = super().get_config()
        config.update({
            "score_converter": self.score_converter,
            "background_column": self.background_column,
            "method": self.method,
            "num_classes": self.num_classes,
        })
        config.update({name: _lists(value) for name, value in self.params.items()})
        return config


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value
