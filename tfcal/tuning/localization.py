"""report.json's `summary.localization`: the localisation-aware calibration of held-out
detections before and after calibration (LaECE_0, LaACE_0, D-ECE by box size and position,
reliability per COCO size bucket).

The detections are the default post-processing's on the evaluated images, with each side's own
scores (before: raw; after: calibrated without that image), kept when that score is >=
`ECE_MIN_SCORE` like the report's ECE. LaECE_0 / LaACE_0 match them again at IoU 0 with those
scores (calibration may reorder them); D-ECE and the size reliability use the job's TP labels
at `match_iou`. See `tfcal.localization_metrics` for the definitions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcal.coco.localization import match_with_iou
from tfcal.coco.matching import MatchResult
from tfcal.localization_metrics import (box_detection_ece, curve_dict, localization_errors,
                                        reliability_by_size)
from tfcal.tuning.detections import FlatDetections, to_coco_detections

__all__ = ["MatchedBefore", "localization_block", "localization_side"]


@dataclasses.dataclass(frozen=True, eq=False)
class MatchedBefore:
    """The default post-processing's detections on the evaluated images, matched at
    `match_iou`.

    Attributes:
      dets: `FlatDetections` (normalized boxes).
      mapped: bool `[len(dets)]`, `to_coco_detections`'s kept mask.
      match: the match of the mapped detections at `match_iou` (`tfcal.tuning.detections.match`).
    """

    dets: FlatDetections
    mapped: np.ndarray
    match: MatchResult

    @property
    def rows(self) -> np.ndarray:
        """int `[R]`: the rows of `dets` of the matched, non-ignored detections."""
        return np.flatnonzero(self.mapped)[self.match.det_index][~self.match.ignored]

    @property
    def tp(self) -> np.ndarray:
        """`[R]` TP at `match_iou` of those rows."""
        return self.match.tp[~self.match.ignored]


def localization_side(prep, dets, scores: np.ndarray, eval_idx, *, min_score: float,
                      max_dets: int, tp: np.ndarray, rows: np.ndarray) -> dict:
    """The block of one side.

    Args:
      prep: the job's `Prepared`.
      dets: `FlatDetections` of the default post-processing (normalized boxes).
      scores: float `[len(dets)]` this side's score of each detection.
      eval_idx: the evaluated image rows.
      min_score: detections below it are left out.
      max_dets: detections per image and category (the job's `max_total_detections`).
      tp: 0/1 `[R]` TP at `match_iou` of the matched, non-ignored rows `rows` (int `[R]`, rows
        of `dets`).

    Returns:
      `{"la_ece_0", "la_ace_0", "classes": [{category_id, name, la_ece_0, la_ace_0}],
      "d_ece": {"score", "score_x_size", "score_x_position"}, "reliability_by_size":
      {"small"|"medium"|"large": curve or None}, "detections": int}`.
    """
    seen = scores >= min_score
    shown = FlatDetections(dets.image_index[seen], dets.column[seen],
                           scores[seen].astype(np.float32), dets.boxes[seen])
    coco, _ = to_coco_detections(shown, prep)
    m = match_with_iou(prep.dataset, coco, tau=0.0, max_dets=max_dets,
                       image_ids=prep.dataset.image_ids[eval_idx])
    errors = localization_errors(m.matches, m.num_gt_by_category)
    names = dict(zip(prep.dataset.category_ids.tolist(), prep.dataset.category_names))
    classes = [{"category_id": c["category_id"], "name": names.get(c["category_id"]),
                "la_ece_0": c["la_ece"], "la_ace_0": c["la_ace"]}
               for c in errors.to_dict()["classes"]]

    s = scores[rows].astype(np.float64)
    keep = s >= min_score
    s, y, r = s[keep], np.asarray(tp)[keep].astype(np.int64), rows[keep]
    boxes = dets.boxes[r].astype(np.float64)
    img = dets.image_index[r]
    h = prep.dataset.image_heights[img].astype(np.float64)
    w = prep.dataset.image_widths[img].astype(np.float64)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * h * \
        np.clip(boxes[:, 3] - boxes[:, 1], 0, None) * w
    by_size = reliability_by_size(s, y, area) if s.size else {}
    return {"la_ece_0": errors.la_ece, "la_ace_0": errors.la_ace, "classes": classes,
            "d_ece": box_detection_ece(s, y, boxes),
            "reliability_by_size": {k: curve_dict(v) for k, v in by_size.items()},
            "detections": int(seen.sum())}


def localization_block(prep, before: MatchedBefore, calibrated: np.ndarray, eval_idx, *,
                       min_score: float, max_dets: int) -> dict:
    """`{"before": side, "after": side, "min_score": ...}` (see `localization_side`).

    Args:
      before: the default post-processing's detections on `eval_idx` and their match.
      calibrated: float `[len(before.dets)]` calibrated scores of `before.dets`.
    """
    dets = before.dets
    common = {"min_score": min_score, "max_dets": max_dets, "tp": before.tp,
              "rows": before.rows}
    return {"min_score": min_score,
            "before": localization_side(prep, dets, dets.score.astype(np.float64),
                                        eval_idx, **common),
            "after": localization_side(prep, dets, np.asarray(calibrated, np.float64),
                                       eval_idx, **common)}



def localization_drift(prep, dets, eval_idx, report: dict, *, tolerance: float,
                       min_score: float, max_dets: int) -> dict:
    """`tfcal drift`'s check of LaECE_0 and LaACE_0: the served calibration's detections on
    the new images (`dets`, calibrated scores, default IoU, no threshold) against the report's
    `summary.localization.after`; a rise by more than `tolerance` (`drift.ece_tolerance`) fails.

    Returns:
      `{"la_ece_0_report", "la_ece_0_new", "la_ace_0_report", "la_ace_0_new", "failures"}`
      (reports written before these metrics have no reference: no failure).
    """
    seen = dets.score >= min_score
    shown = FlatDetections(dets.image_index[seen], dets.column[seen], dets.score[seen],
                           dets.boxes[seen])
    coco, _ = to_coco_detections(shown, prep)
    m = match_with_iou(prep.dataset, coco, tau=0.0, max_dets=max_dets,
                       image_ids=prep.dataset.image_ids[eval_idx])
    e = localization_errors(m.matches, m.num_gt_by_category)
    ref = ((report.get("summary") or {}).get("localization") or {}).get("after") or {}
    out = {"la_ece_0_report": ref.get("la_ece_0"), "la_ece_0_new": e.la_ece,
           "la_ace_0_report": ref.get("la_ace_0"), "la_ace_0_new": e.la_ace, "failures": []}
    for name, key in (("LaECE_0", "la_ece_0"), ("LaACE_0", "la_ace_0")):
        old, new = out[f"{key}_report"], out[f"{key}_new"]
        if old is not None and new is not None and new > old + tolerance:
            out["failures"].append(f"{name} rose from {old:.3f} to {new:.3f} (> +{tolerance})")
    return out
