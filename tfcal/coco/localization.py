"""Matching at a localisation threshold `tau` (default 0) with the IoU of every true positive:
the input of the localisation-aware calibration errors (`tfcal.localization_metrics`).

`match_with_iou` wraps pycocotools' ``COCOeval.evaluateImg`` (the greedy COCO matching) with
``iouThrs = [tau]``, one area range (all) and ``maxDets = [max_dets]``, exactly the matching of
the reference LaECE code (Kuzucu et al., ECCV 2024, `fiveai/detection_calibration`,
``coco_calibration.py``, whose modified COCOeval only adds the matched IoU to the per-image
records). With `tau = 0` a detection matches any free ground truth of its class in its image,
even at IoU 0 (pycocotools keeps a candidate unless its IoU is *below* the threshold). The IoU of
a match is read from ``COCOeval.ious`` (rows: detections sorted by score, as ``evaluateImg``
sorts them; columns: ground truths in index order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from tfcal.coco.dataset import CocoDataset, quiet
from tfcal.coco.matching import as_detections, match_detections
from tfcal.localization_metrics import DetectionMatches, box_detection_ece, localization_errors

__all__ = ["LocalizationMatch", "match_with_iou", "summary"]


@dataclasses.dataclass(frozen=True, eq=False)
class LocalizationMatch:
    """Every evaluated detection of a match at `tau`, with its IoU.

    Attributes:
      category_id: int64 `[D]`. score: float64 `[D]`.
      tp: bool `[D]` matched to a ground truth that is not ignored.
      fp: bool `[D]` unmatched and not ignored.
      ignored: bool `[D]` matched to an ignored (crowd) ground truth.
      iou: float64 `[D]` IoU with the matched ground truth for true positives, else 0.
      det_index: int64 `[D]` row of each detection in the input.
      category_ids: int64 `[C]` the dataset's categories (file order).
      num_gt: int64 `[C]` non-ignored ground truths per category on the evaluated images.
    """

    category_id: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    ignored: np.ndarray
    iou: np.ndarray
    det_index: np.ndarray
    category_ids: np.ndarray
    num_gt: np.ndarray

    @property
    def matches(self) -> DetectionMatches:
        """The rows `tfcal.localization_metrics.localization_errors` reads."""
        return DetectionMatches(self.category_id, self.score, self.tp, self.fp, self.iou,
                                self.ignored)

    @property
    def num_gt_by_category(self) -> dict[int, int]:
        """`{category_id: non-ignored ground truths}` on the evaluated images."""
        return dict(zip(self.category_ids.tolist(), self.num_gt.tolist()))


def match_with_iou(dataset: CocoDataset, detections: Any, *, tau: float = 0.0,
                   max_dets: int = 100,
                   image_ids: Sequence[int] | np.ndarray | None = None) -> LocalizationMatch:
    """Greedy COCO matching at IoU threshold `tau`, recording each true positive's IoU.

    Args:
      dataset: the ground truth.
      detections: anything `tfcal.coco.matching.as_detections` takes (pixel xywh boxes).
      tau: IoU threshold in [0, 1), default 0 (the `_0` of LaECE_0).
      max_dets: detections kept per image and category (highest scores), default 100.
      image_ids: the evaluated images (default: all of the dataset).

    Returns:
      A `LocalizationMatch`; detections on images outside `image_ids` are not in it.
    """
    from pycocotools.cocoeval import COCOeval

    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau: must be in [0, 1), got {tau}")
    dets = as_detections(detections)
    coco_gt = dataset.coco
    cats = np.asarray(dataset.category_ids, dtype=np.int64)
    empty = np.zeros(0)
    if len(dets) == 0:
        num_gt = _num_gt(dataset, image_ids)
        return LocalizationMatch(empty.astype(np.int64), empty, empty.astype(bool),
                                 empty.astype(bool), empty.astype(bool), empty,
                                 empty.astype(np.int64), cats, num_gt)
    results = dets.to_coco_results()
    for i, r in enumerate(results):
        r["tfcal_row"] = i  # survives loadRes, so each record maps back to its input row
    with quiet():
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        p = ev.params
        if image_ids is not None:
            p.imgIds = sorted(int(i) for i in image_ids)
        p.iouThrs = np.array([float(tau)])
        p.areaRng = [p.areaRng[0]]
        p.areaRngLbl = ["all"]
        p.maxDets = [int(max_dets)]
        ev.evaluate()
    row_of = {a["id"]: a["tfcal_row"] for a in coco_dt.dataset["annotations"]}
    cols = {"category_id": [], "score": [], "tp": [], "fp": [], "ignored": [], "iou": [],
            "det_index": []}
    num_gt = np.zeros(cats.size, dtype=np.int64)
    cat_pos = {int(c): i for i, c in enumerate(cats)}
    for e in ev.evalImgs:
        if e is None:
            continue
        img, cat = e["image_id"], e["category_id"]
        num_gt[cat_pos[int(cat)]] += int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        if not e["dtIds"]:
            continue
        dtm = np.asarray(e["dtMatches"])[0]
        dtig = np.asarray(e["dtIgnore"])[0].astype(bool)
        gt_order = {g["id"]: j for j, g in enumerate(ev._gts[img, cat])}
        ious = ev.ious[img, cat]
        iou = np.zeros(dtm.size)
        for d, gid in enumerate(dtm):
            if gid > 0:
                iou[d] = ious[d, gt_order[int(gid)]]
        tp = (dtm > 0) & ~dtig
        cols["category_id"].append(np.full(dtm.size, cat, dtype=np.int64))
        cols["score"].append(np.asarray(e["dtScores"], dtype=np.float64))
        cols["tp"].append(tp)
        cols["fp"].append((dtm == 0) & ~dtig)
        cols["ignored"].append(dtig)
        cols["iou"].append(np.where(tp, iou, 0.0))
        cols["det_index"].append(np.array([row_of[i] for i in e["dtIds"]], dtype=np.int64))
    if not cols["score"]:
        return LocalizationMatch(empty.astype(np.int64), empty, empty.astype(bool),
                                 empty.astype(bool), empty.astype(bool), empty,
                                 empty.astype(np.int64), cats, num_gt)
    return LocalizationMatch(**{k: np.concatenate(v) for k, v in cols.items()},
                             category_ids=cats, num_gt=num_gt)


def _num_gt(dataset: CocoDataset, image_ids) -> np.ndarray:
    keep = ~np.asarray(dataset.ann_iscrowd, dtype=bool)
    if image_ids is not None:
        keep &= np.isin(dataset.ann_image_ids, np.asarray(image_ids, dtype=np.int64))
    cats = np.asarray(dataset.category_ids, dtype=np.int64)
    return np.array([int(np.sum(keep & (dataset.ann_category_ids == c))) for c in cats],
                    dtype=np.int64)


def summary(dataset: CocoDataset, detections: Any, *, match_iou: float = 0.5,
            max_dets: int = 100) -> dict:
    """The localisation-aware calibration of a detections file (``tfcal evaluate``).

    Returns:
      ``{"la_ece_0", "la_ace_0", "classes": [{category_id, la_ece, la_ace}], "d_ece_score",
      "d_ece_score_x_size", "d_ece_score_x_position", "match_iou"}``: LaECE_0 / LaACE_0 as
      `tfcal.localization_metrics.localization_errors` computes them (every detection), D-ECE
      with the TP labels at `match_iou` (scores outside [0, 1]: None).
    """
    dets = as_detections(detections)
    m = match_with_iou(dataset, dets, tau=0.0, max_dets=max_dets)
    out: dict[str, Any] = {"la_ece_0": None, "la_ace_0": None, "classes": [],
                           "d_ece_score": None, "d_ece_score_x_size": None,
                           "d_ece_score_x_position": None, "match_iou": float(match_iou)}
    if len(dets) == 0 or dets.score.min() < 0 or dets.score.max() > 1:
        return out
    e = localization_errors(m.matches, m.num_gt_by_category).to_dict()
    out.update(la_ece_0=e["la_ece"], la_ace_0=e["la_ace"], classes=e["classes"])
    r = match_detections(dataset, dets, iou_threshold=match_iou, max_dets=max_dets)
    keep = ~r.ignored
    rows = r.det_index[keep]
    pos = {int(i): j for j, i in enumerate(dataset.image_ids)}
    img = np.array([pos[int(i)] for i in dets.image_id[rows]], dtype=np.int64)
    w = np.asarray(dataset.image_widths, np.float64)[img]
    h = np.asarray(dataset.image_heights, np.float64)[img]
    x, y, bw, bh = dets.bbox[rows].T
    boxes = np.clip(np.stack([y / h, x / w, (y + bh) / h, (x + bw) / w], axis=1), 0.0, 1.0)
    d = box_detection_ece(r.score[keep], r.tp[keep].astype(np.int64), boxes)
    out.update(d_ece_score=d["score"], d_ece_score_x_size=d["score_x_size"],
               d_ece_score_x_position=d["score_x_position"])
    return out
