"""Detections of the tuning job: the serving post-processing run over cached raw outputs, and
their matching against the COCO ground truth.

`postprocess_images` runs the exact `PostProcessor` that is exported on the raw outputs of
chosen images; `matched_candidates` streams the serving ops at the candidate threshold once per
NMS IoU for the search. Both give `FlatDetections`, which `match` scores as TP/FP per class
column with `tfcal.coco.matching`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfcal import calibration
from tfcal.calibration import PerClassCalibration
from tfcal.coco.matching import Detections, match_detections
from tfcal.config import Config
from tfcal.layers import PostProcessor
from tfcal.ops import NmsOptions
from tfcal.postprocess import PostProcessConfig
from tfcal.tuning.candidates import collect_candidates
from tfcal.tuning.prepare import Prepared
from tfcal.tuning.search import MatchedDetections, SearchResult

#: The detector's own post-processing we compare against (the OD API default).
ODAPI_DEFAULT_SCORE_THRESH = 1e-8
#: Images per post-processing call over cached raw outputs.
POSTPROCESS_BATCH = 32


@dataclasses.dataclass(frozen=True, eq=False)
class FlatDetections:
    """Post-processed detections of many images, flattened.

    Attributes:
      image_index: int64 `[D]` row in the raw outputs. column: int64 `[D]` class column.
      score: float32 `[D]`. boxes: float32 `[D, 4]` normalized `[ymin, xmin, ymax, xmax]`.
    """

    image_index: np.ndarray
    column: np.ndarray
    score: np.ndarray
    boxes: np.ndarray

    def subset(self, mask: np.ndarray) -> "FlatDetections":
        return FlatDetections(self.image_index[mask], self.column[mask], self.score[mask],
                              self.boxes[mask])

    @classmethod
    def concat(cls, parts) -> "FlatDetections":
        """The detections of `parts`, one after the other."""
        return cls(*(np.concatenate([getattr(d, f) for d in parts])
                     for f in ("image_index", "column", "score", "boxes")))


def postprocess_config(cfg: Config, prep: Prepared, *, min_score_thresh: tuple[float, ...],
                       nms_iou: tuple[float, ...], class_enabled: tuple[bool, ...] = (),
                       calibration: PerClassCalibration | None = None) -> PostProcessConfig:
    """The job's `PostProcessConfig`: the config's classes, score space, detection limits and
    class ids, with these tuned numbers.

    Args:
      min_score_thresh: 1 or K thresholds in `[0, 1]`.
      nms_iou: 1 or K NMS IoUs in `[0, 1]`.
      class_enabled: () (all enabled) or K booleans.
      calibration: the fitted calibration (its method and parameters), or None: no calibration.
    """
    return PostProcessConfig(
        num_classes=prep.num_classes,
        score_converter=cfg.model.score_converter,
        background_column=cfg.model.background_column,
        calibration="none" if calibration is None else calibration.method,
        calibration_params=None if calibration is None else calibration.params,
        min_score_thresh=min_score_thresh,
        class_enabled=class_enabled,
        nms_iou=nms_iou,
        soft_nms_sigma=(cfg.tuning.soft_nms_sigma,),
        clip_window=cfg.tuning.clip_window or (),
        change_coordinate_frame=cfg.tuning.change_coordinate_frame,
        max_detections_per_class=cfg.tuning.max_detections_per_class,
        max_total_detections=cfg.tuning.max_total_detections,
        label_offset=cfg.model.label_offset,
        class_ids=tuple(int(c) for c in prep.mapping.column_category_ids),
    )


def tuned_postprocess_config(cfg: Config, prep: Prepared, calibration: PerClassCalibration | None,
                             found: SearchResult) -> PostProcessConfig:
    """The `PostProcessConfig` of a search: its per-class thresholds, IoUs and enabled classes
    (a column no annotated category maps to cannot be checked, so it is never emitted), with
    `calibration` (None: no calibration)."""
    used = prep.mapping.column_category_ids >= 0
    return postprocess_config(
        cfg, prep, calibration=calibration, min_score_thresh=found.min_score_thresh,
        nms_iou=found.nms_iou,
        class_enabled=tuple(bool(e and u) for e, u in zip(found.class_enabled, used)))


def default_postprocess_config(cfg: Config, prep: Prepared, nms_iou: float) -> PostProcessConfig:
    """The detector's own post-processing: no calibration, score > 1e-8, one NMS IoU."""
    return postprocess_config(cfg, prep, nms_iou=(nms_iou,),
                              min_score_thresh=(ODAPI_DEFAULT_SCORE_THRESH,))


def postprocess_images(ppc, raw, indices: np.ndarray, *, batch_size: int | None = None
                       ) -> FlatDetections:
    """Runs the serving `PostProcessor` of `ppc` over the raw outputs of `indices`."""
    layer = PostProcessor.from_postprocess_config(ppc)
    fn = _compiled(layer)
    batch_size = batch_size or POSTPROCESS_BATCH
    parts = []
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start:start + batch_size])
        out = fn(raw.boxes[idx], raw.scores[idx])
        n = out["num_detections"].numpy().astype(np.int64)
        valid = np.arange(out["detection_scores"].shape[1])[None, :] < n[:, None]
        parts.append((np.repeat(idx, n),
                      ppc.columns_of_class_ids(out["detection_classes"].numpy()[valid]),
                      out["detection_scores"].numpy()[valid],
                      _image_frame(ppc, out["detection_boxes"].numpy()[valid])))
    if not parts:
        return FlatDetections(np.zeros(0, np.int64), np.zeros(0, np.int64),
                              np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    return FlatDetections(*(np.concatenate(p) for p in zip(*parts)))


def _image_frame(ppc, boxes: np.ndarray) -> np.ndarray:
    """Boxes emitted in the clip window's frame (`change_coordinate_frame`) back in the image's."""
    if not ppc.change_coordinate_frame:
        return boxes
    y0, x0, y1, x1 = ppc.clip_window
    scale = np.float32([y1 - y0, x1 - x0, y1 - y0, x1 - x0])
    return boxes * scale + np.float32([y0, x0, y0, x0])


def _compiled(layer):
    @tf.function(reduce_retracing=True)
    def fn(boxes, scores):
        return layer(boxes, scores)

    return fn


def to_coco_detections(dets: FlatDetections, prep: Prepared):
    """Normalized boxes of used columns -> `(Detections in COCO pixel xywh, kept mask)`."""
    cat = prep.mapping.columns_to_category_ids(dets.column)
    keep = cat >= 0
    d = dets.subset(keep)
    h = prep.dataset.image_heights[d.image_index].astype(np.float64)
    w = prep.dataset.image_widths[d.image_index].astype(np.float64)
    b = d.boxes.astype(np.float64)
    x0, y0 = b[:, 1] * w, b[:, 0] * h
    xywh = np.stack([x0, y0, b[:, 3] * w - x0, b[:, 2] * h - y0], axis=1)
    return Detections.from_arrays(prep.dataset.image_ids[d.image_index], cat[keep], xywh,
                                  d.score), keep


def match(prep: Prepared, dets: FlatDetections, image_indices: np.ndarray, cfg: Config):
    """Matches `dets` on the images `image_indices`.

    Returns:
      `(MatchResult, column of each result row int64 [R], ground truths per column int64 [K])`.
    """
    coco_dets, _ = to_coco_detections(dets, prep)
    result = match_detections(prep.dataset, coco_dets, iou_threshold=cfg.tuning.match_iou,
                              max_dets=cfg.tuning.max_total_detections,
                              image_ids=prep.dataset.image_ids[image_indices])
    columns = np.array([prep.mapping.column_of(c) for c in result.category_ids], dtype=np.int64)
    num_gt = np.zeros(prep.num_classes, dtype=np.int64)
    num_gt[columns] = result.num_gt
    return result, columns[np.searchsorted(result.category_ids, result.category_id)], num_gt


def _calibrate_fn(cfg: Config, calib):
    """The calibration op (as the serving graph runs it) for `collect_candidates`."""
    method = calibration.get("none" if calib is None else calib.method)
    weights = method.weights({} if calib is None else calib.params)

    def calibrate(raw_scores, boxes=None):
        return method.calibrate_tf(raw_scores, weights, score_converter=cfg.model.score_converter,
                                   background_column=cfg.model.background_column, boxes=boxes)

    calibrate.uses_boxes = method.uses_boxes
    return calibrate


def _raw_batches(raw, indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield raw.image_ids[idx], raw.boxes[idx], raw.scores[idx]


def matched_candidates(cfg: Config, prep: Prepared, calib, tune_idx: np.ndarray,
                       nms_iou_grid=None) -> dict:
    """`{nms_iou: MatchedDetections}` of the images `tune_idx`: post-processed once per NMS IoU
    (streamed) with the serving ops (calibration `calib`, or none, then combined NMS at
    `tuning.min_candidate_thresh`, soft-NMS with `tuning.soft_nms_sigma`), matched once. Any
    higher threshold applied to them equals post-processing at that threshold (for soft-NMS
    too: see `tfcal.ops`)."""
    t = cfg.tuning
    grid = tuple(nms_iou_grid or t.nms_iou_grid)
    # Soft-NMS ignores the IoU (as TF does): one run serves every IoU of the grid.
    run_grid = grid[:1] if t.soft_nms_sigma > 0 else grid
    candidates = collect_candidates(
        _raw_batches(prep.raw, tune_idx, POSTPROCESS_BATCH), _calibrate_fn(cfg, calib),
        run_grid, t.min_candidate_thresh, NmsOptions(
            max_detections_per_class=t.max_detections_per_class,
            max_total_detections=t.max_total_detections, soft_nms_sigma=t.soft_nms_sigma,
            clip_window=t.clip_window))
    candidates = {iou: candidates.get(iou, candidates[run_grid[0]]) for iou in grid}
    matched = {}
    for iou, cand in candidates.items():
        dets = FlatDetections(prep.dataset.image_index(cand.image_id), cand.column.astype(np.int64),
                              cand.score, cand.box)
        result, columns, num_gt = match(prep, dets, tune_idx, cfg)
        matched[iou] = MatchedDetections(score=result.score, column=columns, tp=result.tp,
                                         ignored=result.ignored, num_gt=num_gt)
    return matched
