"""No calibration: the uncalibrated probability is the score (`q = p`; `identity`: `sigmoid(z)`).

No parameters and nothing to fit; a threshold on `q` is a threshold on the raw probability.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tfcal.calibration import _numeric as nx
from tfcal.calibration._base import CalibrationMethod, register

__all__ = ["NoCalibration"]


@register
class NoCalibration(CalibrationMethod):
    """`q = u`: raw probabilities pass through unchanged."""

    name = "none"
    space = "probability"
    params = ()

    def check_params(self, params: Mapping[str, Any], num_classes: int | None = None
                     ) -> dict[str, tuple]:
        self.own_params(params)
        return {}

    def fit(self, x, y, c, num_classes, w, *, class_labels=None):
        return {}, {}, w

    def apply(self, x, params, class_index=None):
        return nx.as_float_array(x, "x").astype(np.float32)

    def apply_tf(self, x, weights):
        return x

    def lower_bound_tf(self, t, weights, num_classes):
        return t

    def report_entry(self, params, k):
        return {}

    def describe(self, entry):
        return "none"
