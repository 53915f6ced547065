"""Reference box geometry for the tests, written the plain way (NumPy, no TensorFlow)."""

from __future__ import annotations

import numpy as np


def iou(a, b):
    """IoU of two corner boxes ``[lo_0, lo_1, hi_0, hi_1]`` (``[ymin, xmin, ymax, xmax]`` or
    ``[xmin, ymin, xmax, ymax]``, both alike), in the boxes' own dtype (float32 boxes give a
    float32 IoU, as the ops compute it); 0 when both are empty."""
    a, b = np.asarray(a), np.asarray(b)
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return inter / union if union > 0 else inter * 0


def xywh_to_corners(box):
    """COCO ``[x, y, width, height]`` -> ``[xmin, ymin, xmax, ymax]``."""
    x, y, w, h = box
    return [x, y, x + w, y + h]
