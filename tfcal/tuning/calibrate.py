"""The calibration fit of a tuning job: the configured method fitted on the tune split's
detections (default post-processing), per class or pooled."""

from __future__ import annotations

import numpy as np

from tfcal import TfcalError, calibration
from tfcal.config import Config
from tfcal.tuning.detections import (default_postprocess_config, match, postprocess_images,
                                     to_coco_detections)
from tfcal.tuning.prepare import Prepared
from tfcal.tuning.search import default_iou


def fit_calibration(cfg: Config, prep: Prepared, tune_idx: np.ndarray):
    """Fits the calibration on the tune split's detections (default IoU, no threshold).

    Returns:
      the `PerClassCalibration` (one fit per class column; a pooled fit is repeated for every
      column), or None for method `none`.
    """
    method = calibration.get(cfg.calibration.method)
    if method.name == "none":
        return None
    try:
        method.check_fit_converter(cfg.model.score_converter)
    except ValueError as e:
        raise TfcalError(f"{cfg.source}: calibration.method: {e}") from None
    iou = cfg.tuning.default_nms_iou or default_iou(cfg.tuning.nms_iou_grid)
    dets = postprocess_images(default_postprocess_config(cfg, prep, iou), prep.raw, tune_idx)
    result, columns, _ = match(prep, dets, tune_idx, cfg)
    keep = ~result.ignored
    coco_rows = np.flatnonzero(to_coco_detections(dets, prep)[1])
    boxes = dets.boxes[coco_rows[result.det_index[keep]]].astype(np.float64)
    extra = {"boxes": boxes} if method.uses_boxes else {}
    probs = result.score[keep].astype(np.float64)
    labels = result.tp[keep].astype(np.int64)
    cols = columns[keep]
    if labels.size == 0:
        raise TfcalError(f"{cfg.data.annotations}: no detections on the tune images to "
                         "calibrate with (check model.score_converter and the data)")
    x = method.to_space(probs)
    if cfg.calibration.per_class:
        names = [prep.column_label(k) for k in range(prep.num_classes)]
        return calibration.fit_per_class(method.name, x, labels, cols, prep.num_classes,
                                         min_samples=cfg.calibration.min_samples,
                                         class_labels=names, **extra)
    pooled = calibration.fit_per_class(method.name, x, labels, np.zeros_like(cols), 1,
                                       min_samples=cfg.calibration.min_samples, **extra)
    return pooled.broadcast(prep.num_classes)

