"""The report's baseline, the comparison users make: one global `min_score_thresh` on raw
scores, chosen on the same tune images for the same target, and measured on the same held-out
images as the tuned result.

The baseline is what a team does without tfcal: no calibration, the default NMS IoU, one score
threshold for every class, picked on the pooled tune detections for the configured target (and
certified the same way when `tuning.confidence` is set). The report puts its held-out precision,
recall and per-class misses beside tfcal's, and, as a second view, the recall one global
raw-score threshold reaches on the held-out images at tfcal's own held-out precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcal.tuning.detections import matched_candidates, postprocess_config
from tfcal.tuning.objectives import objectives
from tfcal.tuning.search import default_iou, pooled_search


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The global raw-score threshold chosen on one tune split.

    Attributes:
      choice: the pooled `ClassChoice` (column -1): threshold, IoU, tune counts, guarantee.
      ppc: the `PostProcessConfig` that applies it (no calibration, one threshold and IoU).
    """

    choice: object
    ppc: object


def choose(cfg, prep, tune_idx: np.ndarray) -> Baseline:
    """Chooses the global raw-score threshold on the images `tune_idx` (default NMS IoU)."""
    t = cfg.tuning
    iou = t.default_nms_iou or default_iou(t.nms_iou_grid)
    matched = matched_candidates(cfg, prep, None, tune_idx, nms_iou_grid=(iou,))
    objective, _ = objectives(cfg, prep)
    found = pooled_search(matched, objective, default_nms_iou=iou)
    choice = found.pooled
    used = prep.mapping.column_category_ids >= 0
    enabled = tuple(bool(e) for e in (used & bool(choice.enabled)))
    ppc = postprocess_config(cfg, prep, nms_iou=(iou,),
                             min_score_thresh=(float(choice.min_score_thresh),),
                             class_enabled=enabled)
    return Baseline(choice, ppc)


def recall_at_precision(scores, tp, num_gt: int, precision: float | None) -> dict:
    """The best recall of one global threshold whose pooled precision is >= `precision`.

    Args:
      scores: float `[D]` raw scores of non-ignored held-out detections (default
        post-processing). tp: bool `[D]`. num_gt: the ground truths they are measured against.
      precision: the precision to match (tfcal's held-out precision), or None.

    Returns:
      `{"precision_to_match", "threshold", "precision", "recall"}` (values None when no
      threshold reaches it).
    """
    out = {"precision_to_match": precision, "threshold": None, "precision": None,
           "recall": None}
    if precision is None or scores.size == 0 or num_gt == 0:
        return out
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], tp[order].astype(np.int64)
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    ctp = np.cumsum(y)[last]
    n = last + 1
    ok = ctp / n >= precision
    if not ok.any():
        return out
    j = int(np.flatnonzero(ok)[np.argmax(ctp[ok])])
    return {"precision_to_match": precision, "threshold": float(s[last[j]]),
            "precision": float(ctp[j] / n[j]), "recall": float(ctp[j] / num_gt)}
