"""Seeded detections for the calibration tests."""

import math

import numpy as np

LN3 = math.log(3.0)


def miscalibrated(seed: int, n: int, num_classes: int, temps):
    """Detections whose true probability is sigmoid(z / T_k): logits z are over-confident."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, num_classes, n)
    z = rng.normal(0.5, 3.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z / np.asarray(temps)[c]))).astype(np.int64)
    return z, y, c


def two_point_data(L=2.0):
    # z = +L: labels 1, 1, 1, 0 (frequency 3/4); z = -L: labels 1, 0, 0, 0 (frequency 1/4).
    z = np.array([L] * 4 + [-L] * 4)
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    return z, y
