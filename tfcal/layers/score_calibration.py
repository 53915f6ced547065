"""`ScoreCalibration`: raw detector scores to calibrated per-class probabilities (a Keras layer)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfcal import ops
from tfcal.layers._common import check_num_classes, constant_weight, float32_by_default, float_list


@keras.saving.register_keras_serializable(package="tfcal")
class ScoreCalibration(keras.layers.Layer):
    """Turns raw scores into logits, applies a per-class calibration map, drops background.

    The maps and score spaces are those of `tfcal.ops.calibrate_scores`. Tuned numbers live in
    non-trainable weights (`temperature`, `platt_a`, `platt_b`, `knots_x`, `knots_y`; knots are
    padded to `[K, M]` by `tfcal.ops.pad_knots`), so they can be read or assigned without
    retracing; only the weights of the chosen `method` are created.

    Args:
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'. `identity`
        means the raw scores are logits.
      background_column: raw column 0 is background and is dropped from the output.
      method: {'none', 'temperature', 'platt', 'piecewise_linear'}, default='none'.
      temperature: float or 1 or K floats, each > 0 (required for `temperature`).
      platt_a, platt_b: K floats each (required for `platt`).
      knots_x, knots_y: K rows of knots (required for `piecewise_linear`): `knots_x` strictly
        increasing in [0, 1], `knots_y` non-decreasing in [0, 1], equal lengths per row.
      num_classes: optional K; when given, parameter lengths and the input's column count are
        checked against it.
      **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call args:
      raw_scores: float `[batch, num_boxes, C]`, `C = K + 1` with a background column.

    Returns:
      float32 `[batch, num_boxes, K]` calibrated probabilities.

    Raises:
      ValueError: in `__init__`, on any bad argument (the message includes the value).
    """

    def __init__(self, score_converter="sigmoid", background_column=True, method="none",
                 temperature=(), platt_a=(), platt_b=(), knots_x=(), knots_y=(),
                 num_classes=None, **kwargs):
        super().__init__(**float32_by_default(kwargs))
        if score_converter not in ops.SCORE_CONVERTERS:
            raise ValueError(f"score_converter: expected one of {list(ops.SCORE_CONVERTERS)}, "
                             f"got {score_converter!r}")
        if method not in ops.CALIBRATION_METHODS:
            raise ValueError(f"method: expected one of {list(ops.CALIBRATION_METHODS)}, "
                             f"got {method!r}")
        if not isinstance(background_column, (bool, np.bool_)):
            raise ValueError(f"background_column: expected a bool, got {background_column!r}")
        k = check_num_classes(num_classes)
        self.score_converter = score_converter
        self.background_column = bool(background_column)
        self.method = method
        self.num_classes = k
        per_class = (0, k) if k is not None else None
        self.temperature = float_list("temperature", temperature, positive=True,
                                      lengths=(0, 1, k) if k is not None else None)
        self.platt_a = float_list("platt_a", platt_a, lengths=per_class)
        self.platt_b = float_list("platt_b", platt_b, lengths=per_class)
        self.knots_x = [float_list(f"knots_x[{i}]", r, allow_scalar=False) for i, r in
                        enumerate(knots_x)]
        self.knots_y = [float_list(f"knots_y[{i}]", r, allow_scalar=False) for i, r in
                        enumerate(knots_y)]
        if method == "temperature":
            if not self.temperature:
                raise ValueError("temperature: required (1 or K values > 0) for method "
                                 "'temperature', got []")
            self._temperature = constant_weight(self, "temperature", self.temperature)
        elif method == "platt":
            if not self.platt_a or len(self.platt_a) != len(self.platt_b):
                raise ValueError(f"platt_a/platt_b: need K values each for method 'platt', got "
                                 f"{self.platt_a} and {self.platt_b}")
            self._platt_a = constant_weight(self, "platt_a", self.platt_a)
            self._platt_b = constant_weight(self, "platt_b", self.platt_b)
        elif method == "piecewise_linear":
            if k is not None and len(self.knots_x) != k:
                raise ValueError(f"knots_x: expected {k} rows, got {len(self.knots_x)}")
            xs, ys = ops.pad_knots(self.knots_x, self.knots_y)
            self._knots_x = constant_weight(self, "knots_x", xs)
            self._knots_y = constant_weight(self, "knots_y", ys)
        self._expected_classes = k or self._classes_from_params()

    def _classes_from_params(self) -> int | None:
        if self.method == "platt":
            return len(self.platt_a)
        if self.method == "piecewise_linear":
            return len(self.knots_x)
        if self.method == "temperature" and len(self.temperature) > 1:
            return len(self.temperature)
        return None

    def _check_columns(self, columns) -> None:
        k = self._expected_classes
        if columns is None or k is None:
            return
        if columns - int(self.background_column) != k:
            raise ValueError(f"raw_scores: expected {k + int(self.background_column)} columns "
                             f"({k} classes, background_column={self.background_column}), "
                             f"got {columns}")

    def build(self, input_shape):
        self._check_columns(input_shape[-1])

    def call(self, raw_scores):
        raw_scores = tf.cast(raw_scores, tf.float32)
        self._check_columns(raw_scores.shape[-1])
        kw = {}
        if self.method == "temperature":
            kw["temperature"] = self._temperature
        elif self.method == "platt":
            kw["platt_a"], kw["platt_b"] = self._platt_a, self._platt_b
        elif self.method == "piecewise_linear":
            kw["knots_x"] = tf.convert_to_tensor(self._knots_x)
            kw["knots_y"] = tf.convert_to_tensor(self._knots_y)
        return ops.calibrate_scores(raw_scores, score_converter=self.score_converter,
                                    background_column=self.background_column,
                                    method=self.method, **kw)

    def compute_output_shape(self, input_shape):
        columns = input_shape[-1]
        k = None if columns is None else columns - int(self.background_column)
        return tuple(input_shape[:-1]) + (k,)

    def get_config(self):
        config = super().get_config()
        config.update({
            "score_converter": self.score_converter,
            "background_column": self.background_column,
            "method": self.method,
            "temperature": list(self.temperature),
            "platt_a": list(self.platt_a),
            "platt_b": list(self.platt_b),
            "knots_x": [list(r) for r in self.knots_x],
            "knots_y": [list(r) for r in self.knots_y],
            "num_classes": self.num_classes,
        })
        return config
