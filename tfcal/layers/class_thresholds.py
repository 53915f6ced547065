"""`ClassThresholds`: zeroes scores below their class threshold or of disabled classes (a layer)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfcal import ops, validation
from tfcal.layers._common import check_num_classes, constant_weight, float32_by_default


@keras.saving.register_keras_serializable(package="tfcal")
class ClassThresholds(keras.layers.Layer):
    """Keeps a score iff `score >= min_score_thresh[k]` and class k is enabled; else 0.0.

    A zeroed score is never emitted by `CombinedNMS` (0.0 means "no detection"), so a disabled
    class neither appears in the output nor suppresses any box. Thresholds and the enabled mask
    live in non-trainable weights `min_score_thresh` (`[1]` or `[K]`) and `class_enabled`
    (`[K]`, 1.0 enabled / 0.0 disabled; only created when `class_enabled` is given).

    Args:
      min_score_thresh: float or 1 or K floats, each in [0, 1]; default 0.0 (keep all).
      class_enabled: optional K booleans; None means every class is enabled.
      num_classes: optional K; when given, lengths and the input's class axis are checked.
      **kwargs: `keras.layers.Layer` arguments.

    Call args:
      scores: float `[batch, num_boxes, K]` calibrated probabilities.

    Returns:
      float32 `[batch, num_boxes, K]`.
    """

    def __init__(self, min_score_thresh=0.0, class_enabled=None, num_classes=None, **kwargs):
        super().__init__(**float32_by_default(kwargs))
        k = check_num_classes(num_classes)
        self.num_classes = k
        self.min_score_thresh = list(validation.score_thresholds(
            "min_score_thresh", min_score_thresh, scalar_ok=True,
            lengths=(1, k) if k is not None else None))
        if class_enabled is not None:
            class_enabled = list(validation.booleans(
                "class_enabled", class_enabled,
                lengths=(k,) if k is not None else None))
            if len(self.min_score_thresh) > 1 and len(class_enabled) != len(self.min_score_thresh):
                raise ValueError(f"class_enabled: {len(class_enabled)} values but "
                                 f"min_score_thresh has {len(self.min_score_thresh)}")
        self.class_enabled = class_enabled
        self._thresh = constant_weight(self, "min_score_thresh", self.min_score_thresh)
        self._enabled = (None if class_enabled is None else
                         constant_weight(self, "class_enabled", np.asarray(class_enabled, float)))

    @property
    def min_score_thresh_weight(self) -> keras.Variable:
        """The non-trainable weight holding the thresholds (`[1]` or `[K]`)."""
        return self._thresh

    @property
    def class_enabled_weight(self) -> keras.Variable | None:
        """The non-trainable 0/1 weight of enabled classes (`[K]`), or None (all enabled)."""
        return self._enabled

    def _expected_classes(self) -> int | None:
        if self.num_classes is not None:
            return self.num_classes
        if self.class_enabled is not None:
            return len(self.class_enabled)
        return len(self.min_score_thresh) if len(self.min_score_thresh) > 1 else None

    def _check_classes(self, k) -> None:
        want = self._expected_classes()
        if k is not None and want is not None and k != want:
            raise ValueError(f"scores: expected {want} class columns, got {k}")

    def build(self, input_shape):
        self._check_classes(input_shape[-1])

    def call(self, scores):
        scores = tf.cast(scores, tf.float32)
        self._check_classes(scores.shape[-1])
        enabled = None if self._enabled is None else tf.convert_to_tensor(self._enabled)
        return ops.apply_class_thresholds(scores, tf.convert_to_tensor(self._thresh), enabled)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "min_score_thresh": list(self.min_score_thresh),
            "class_enabled": None if self.class_enabled is None else list(self.class_enabled),
            "num_classes": self.num_classes,
        })
        return config
