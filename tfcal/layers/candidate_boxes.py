"""`CandidateBoxes`: drops the boxes that cannot pass any class threshold (a Keras layer)."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from tfcal import ops, validation
from tfcal.layers._common import constant_weight, float32_by_default


@keras.saving.register_keras_serializable(package="tfcal")
class CandidateBoxes(keras.layers.Layer):
    """Keeps only the boxes whose raw scores reach some class's raw-score bound.

    A thin layer over `tfcal.ops.select_candidate_boxes`, put before `ScoreCalibration` so that
    calibration, thresholds and NMS work on the few boxes that can pass instead of all of them.
    With bounds from `ScoreCalibration.raw_lower_bounds` of the thresholds that follow, the
    detections are identical to running every box (`PostProcessor` does the same, with bounds
    recomputed from its weights). The bounds are a non-trainable weight `raw_lower_bounds`:
    when the thresholds or the calibration change, compute and assign them again.

    Args:
      raw_lower_bounds: K floats (or a `[K]` tensor) in the raw score space of the class
        columns; `-inf` keeps every box with that class, `+inf` never keeps a box for it.
      background_column: raw column 0 is background (never a reason to keep a box).
      **kwargs: `keras.layers.Layer` arguments.

    Call args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, K, 4]`.
      raw_scores: float `[batch, num_boxes, C]`, `C = K + 1` with a background column.

    Returns:
      `(boxes, raw_scores)` float32 with `num_boxes` replaced by the largest per-image count of
      kept boxes (at least 1); each image's kept boxes come first, in their original order.
    """

    def __init__(self, raw_lower_bounds, background_column=True, **kwargs):
        super().__init__(**float32_by_default(kwargs))
        values = np.asarray(raw_lower_bounds, dtype=np.float64).reshape(-1).tolist() \
            if not isinstance(raw_lower_bounds, (str, bytes)) else raw_lower_bounds
        if isinstance(values, (str, bytes)) or not values or any(math.isnan(v) for v in values):
            raise ValueError(f"raw_lower_bounds: expected K numbers (+-inf allowed), got "
                             f"{raw_lower_bounds!r}")
        self.raw_lower_bounds = [float(v) for v in values]
        self.background_column = validation.boolean("background_column", background_column)
        self._bounds = constant_weight(self, "raw_lower_bounds", self.raw_lower_bounds)

    @property
    def raw_lower_bounds_weight(self) -> keras.Variable:
        """The non-trainable `[K]` weight holding the bounds."""
        return self._bounds

    def _check_columns(self, columns) -> None:
        k = len(self.raw_lower_bounds)
        if columns is not None and columns - int(self.background_column) != k:
            raise ValueError(f"raw_scores: expected {k + int(self.background_column)} columns "
                             f"({k} bounds, background_column={self.background_column}), "
                             f"got {columns}")

    def build(self, boxes_shape, raw_scores_shape=None):
        if raw_scores_shape is not None:
            self._check_columns(raw_scores_shape[-1])

    def call(self, boxes, raw_scores):
        raw_scores = tf.cast(raw_scores, tf.float32)
        self._check_columns(raw_scores.shape[-1])
        return ops.select_candidate_boxes(tf.cast(boxes, tf.float32), raw_scores,
                                          tf.convert_to_tensor(self._bounds),
                                          background_column=self.background_column)

    def compute_output_spec(self, boxes, raw_scores):
        return (keras.KerasTensor((boxes.shape[0], None) + tuple(boxes.shape[2:]),
                                  dtype="float32"),
                keras.KerasTensor((raw_scores.shape[0], None, raw_scores.shape[-1]),
                                  dtype="float32"))

    def get_config(self):
        config = super().get_config()
        config.update({"raw_lower_bounds": list(self.raw_lower_bounds),
                       "background_column": self.background_column})
        return config
