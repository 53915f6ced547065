"""Tests of tfcal.calibration.none: the uncalibrated probability passes through."""

import numpy as np

from tfcal import calibration as cal


def test_calibrate_scores_none_is_identity_and_drops_background():
    rng = np.random.default_rng(0)
    raw = rng.random((2, 5, 4)).astype(np.float32)
    q = cal.calibrate_scores(raw, score_converter="sigmoid", background_column=True)
    np.testing.assert_allclose(q, raw[..., 1:], atol=1e-6)
    z = rng.normal(size=(3, 4))
    q = cal.calibrate_scores(z, score_converter="identity", background_column=False)
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-z)), atol=1e-6)
