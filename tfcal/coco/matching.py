"""Vectorized COCO greedy matching of detections to ground truth (pycocotools' rules, exactly).

`match_detections` gives, for every detection kept by ``maxDets``, the same match and ignore flag
as pycocotools' ``COCOeval.evaluateImg`` (``dtMatches`` / ``dtIgnore``, area range ``all``) at
one IoU threshold:

- per image and category, detections go in descending score (stable mergesort: ties keep input
  order); only the top `max_dets` per image and category are kept;
- ground truth is ignored when it is a crowd region or its ``area`` is outside ``[0, 1e10]``
  (pycocotools overwrites any ``ignore`` field with ``iscrowd``, so that field has no effect);
- IoU is the pycocotools box IoU; against a crowd region it is ``intersection / detection area``;
- each detection takes the best still-free ground truth with IoU >= threshold, non-ignored ground
  truth first; among equal IoUs the later ground truth (in file order) wins; crowd regions can
  take any number of detections; a detection matched to ignored ground truth is ignored (neither
  TP nor FP), and so is an unmatched detection whose area is outside ``[0, 1e10]``.

The greedy loop runs once per score rank (at most `max_dets` steps), vectorized over all
image-category groups at once, with groups bucketed by their ground-truth count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

AREA_ALL = (0.0, 1e10)  # pycocotools' areaRng "all": [0 ** 2, 1e5 ** 2]


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections in COCO pixel coordinates.

    Attributes:
      image_id: int64 `[D]`. category_id: int64 `[D]`.
      bbox: float64 `[D, 4]` COCO ``[x, y, width, height]`` in pixels.
      score: float64 `[D]`.
    """

    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray

    def __post_init__(self):
        # Exact agreement with pycocotools needs float64 boxes and scores (its IoU is double).
        for name, dtype in (("image_id", np.int64), ("category_id", np.int64),
                            ("bbox", np.float64), ("score", np.float64)):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        n = self.image_id.shape[0]
        if not (self.category_id.shape == (n,) and self.score.shape == (n,)
                and self.bbox.shape == (n, 4)):
            raise ValueError(f"Detections: inconsistent shapes image_id {self.image_id.shape}, "
                             f"category_id {self.category_id.shape}, bbox {self.bbox.shape}, "
                             f"score {self.score.shape}")

    def __len__(self) -> int:
        return int(self.image_id.shape[0])

    @classmethod
    def from_arrays(cls, image_id, category_id, bbox, score) -> "Detections":
        """Casts array-likes to the documented dtypes."""
        return cls(np.asarray(image_id, dtype=np.int64).reshape(-1),
                   np.asarray(category_id, dtype=np.int64).reshape(-1),
                   np.asarray(bbox, dtype=np.float64).reshape(-1, 4),
                   np.asarray(score, dtype=np.float64).reshape(-1))

    @classmethod
    def from_coco_results(cls, results: Sequence[Mapping[str, Any]]) -> "Detections":
        """From a COCO results list (``image_id``, ``category_id``, ``bbox``, ``score``)."""
        return cls.from_arrays([r["image_id"] for r in results],
                               [r["category_id"] for r in results],
                               [r["bbox"] for r in results], [r["score"] for r in results])

    def to_coco_results(self) -> list[dict]:
        """A COCO results list (Python floats and ints)."""
        return [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b],
                 "score": float(s)}
                for i, c, b, s in zip(self.image_id, self.category_id, self.bbox, self.score)]


def as_detections(dets: Any) -> Detections:
    """A `Detections` from itself, a COCO results list, a mapping of arrays, or an array.

    An array is pycocotools' ``loadNumpyAnnotations`` layout: float `[D, 7]` rows
    ``[image_id, x, y, width, height, score, category_id]``.
    """
    if isinstance(dets, Detections):
        return dets
    if isinstance(dets, Mapping):
        return Detections.from_arrays(dets["image_id"], dets["category_id"], dets["bbox"],
                                      dets["score"])
    if isinstance(dets, np.ndarray):
        if dets.ndim != 2 or dets.shape[1] != 7:
            raise ValueError(f"detections array must be [D, 7], got shape {dets.shape}")
        return Detections.from_arrays(dets[:, 0], dets[:, 6], dets[:, 1:5], dets[:, 5])
    if isinstance(dets, Sequence):
        return Detections.from_coco_results(dets)
    raise TypeError(f"unsupported detections type {type(dets).__name__}")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Ground-truth boxes in annotation file order (what pycocotools iterates).

    Attributes:
      image_ids: int64 `[I]` the evaluated images. category_ids: int64 `[C]` sorted.
      ann_id, image_id, category_id: int64 `[A]`. bbox: float64 `[A, 4]` xywh pixels.
      area: float64 `[A]`. iscrowd: bool `[A]`.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    ann_id: np.ndarray
    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray


def ground_truth(gt: Any) -> GroundTruth:
    """A `GroundTruth` from a `CocoDataset`, a pycocotools `COCO`, or itself."""
    if isinstance(gt, GroundTruth):
        return gt
    if hasattr(gt, "ann_bboxes"):  # CocoDataset
        return GroundTruth(np.sort(gt.image_ids), np.sort(gt.category_ids), gt.ann_ids,
                           gt.ann_image_ids, gt.ann_category_ids, gt.ann_bboxes, gt.ann_areas,
                           gt.ann_iscrowd)
    if hasattr(gt, "dataset") and hasattr(gt, "getImgIds"):  # pycocotools COCO
        anns = gt.dataset.get("annotations", [])
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        return GroundTruth(
            np.array(sorted(gt.getImgIds()), dtype=np.int64),
            np.array(sorted(gt.getCatIds()), dtype=np.int64),
            np.array([a["id"] for a in anns], dtype=np.int64),
            np.array([a["image_id"] for a in anns], dtype=np.int64),
            np.array([a["category_id"] for a in anns], dtype=np.int64), bbox,
            np.array([a.get("area", b[2] * b[3]) for a, b in zip(anns, bbox)], dtype=np.float64),
            np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool))
    raise TypeError(f"unsupported ground truth type {type(gt).__name__}")


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """Per-detection match flags, ordered like pycocotools' ``evalImgs``.

    Rows are sorted by category id, then image id, then descending score (stable), and hold
    only the detections kept by `max_dets`.

    Attributes:
      image_id, category_id: int64 `[M]`. score: float64 `[M]`.
      tp: bool `[M]` matched to non-ignored ground truth.
      ignored: bool `[M]` matched to ignored (crowd) ground truth, or out of the area range.
        A detection that is neither `tp` nor `ignored` is a false positive (`fp`).
      matched_gt_id: int64 `[M]` annotation id of the match, -1 if unmatched.
      det_index: int64 `[M]` row of each detection in the input.
      category_ids: int64 `[C]` every ground-truth category, ascending.
      num_gt: int64 `[C]` non-ignored ground truth per category (over the evaluated images).
      iou_threshold, max_dets: the settings used.
    """

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    ignored: np.ndarray
    matched_gt_id: np.ndarray
    det_index: np.ndarray
    category_ids: np.ndarray
    num_gt: np.ndarray
    iou_threshold: float
    max_dets: int

    @property
    def fp(self) -> np.ndarray:
        """bool `[M]` false positives: neither matched nor ignored."""
        return ~self.tp & ~self.ignored

    def per_category(self) -> dict[str, np.ndarray]:
        """Counts per category: int64 `[C]` arrays ``category_id``, ``tp``, ``fp``, ``fn``,
        ``num_gt``, ``num_dets`` (non-ignored detections)."""
        idx = np.searchsorted(self.category_ids, self.category_id)
        c = len(self.category_ids)
        tp = np.bincount(idx, weights=self.tp, minlength=c).astype(np.int64)
        fp = np.bincount(idx, weights=self.fp, minlength=c).astype(np.int64)
        return {"category_id": self.category_ids, "tp": tp, "fp": fp,
                "fn": self.num_gt - tp, "num_gt": self.num_gt, "num_dets": tp + fp}


def box_iou_coco(det: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """pycocotools' box IoU (``maskApi.c`` ``bbIou``), same float64 operation order.

    Args:
      det: float64 `[..., 4]` xywh. gt: float64 `[..., 4]` xywh, broadcastable against `det`.
      gt_crowd: bool, broadcastable: IoU against a crowd box is ``intersection / det area``.

    Returns:
      float64 IoU of the broadcast shape (0 where the boxes do not overlap).
    """
    dx, dy, dw, dh = np.moveaxis(det, -1, 0)
    gx, gy, gw, gh = np.moveaxis(gt, -1, 0)
    da = dw * dh
    ga = gw * gh
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    union = np.where(gt_crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def match_detections(
    gt: Any,
    dets: Any,
    *,
    iou_threshold: float = 0.5,
    max_dets: int = 100,
    image_ids: Sequence[int] | np.ndarray | None = None,
) -> MatchResult:
    """Greedy COCO matching at one IoU threshold, equal to pycocotools' ``evalImgs``.

    Args:
      gt: a `CocoDataset`, a pycocotools `COCO`, or a `GroundTruth`.
      dets: `Detections`, a COCO results list, a mapping of arrays, or a `[D, 7]` array (see
        `as_detections`).
      iou_threshold: match when IoU >= this (capped at ``1 - 1e-10`` like pycocotools).
      max_dets: keep the top `max_dets` detections per image and category (``maxDets``).
      image_ids: evaluate only these images (pycocotools' ``params.imgIds``); detections on
        other images are dropped. Default: every image of `gt`.

    Returns:
      A `MatchResult`.

    Raises:
      ValueError: a detection on an image or category that `gt` does not have, non-finite
        scores or boxes, or bad settings.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    g = ground_truth(gt)
    d = as_detections(dets)
    thr = min(float(iou_threshold), 1.0 - 1e-10)

    img_all = np.unique(g.image_ids)
    cat_all = np.unique(g.category_ids)
    bad = ~_isin_sorted(d.image_id, img_all)
    if bad.any():
        raise ValueError(f"detections on unknown image ids: {np.unique(d.image_id[bad])[:5]}")
    bad = ~_isin_sorted(d.category_id, cat_all)
    if bad.any():
        raise ValueError(f"detections with unknown category ids: "
                         f"{np.unique(d.category_id[bad])[:5]}")
    if not (np.isfinite(d.score).all() and np.isfinite(d.bbox).all()):
        raise ValueError("detections: scores and boxes must be finite")
    if image_ids is None:
        eval_images = img_all
    else:
        eval_images = np.unique(np.asarray(image_ids, dtype=np.int64))
        bad = ~_isin_sorted(eval_images, img_all)
        if bad.any():
            raise ValueError(f"image_ids not in the ground truth: {eval_images[bad][:5]}")

    # Detections: keep evaluated images, sort by (category, image, -score) stably, cut maxDets.
    # Two stable argsorts (score, then group) are several times faster than np.lexsort.
    n_img = len(eval_images)
    if image_ids is None:
        det_index = np.arange(len(d), dtype=np.int64)
    else:
        det_index = np.flatnonzero(_isin_sorted(d.image_id, eval_images))
    det_key = (np.searchsorted(cat_all, d.category_id[det_index]) * n_img
               + np.searchsorted(eval_images, d.image_id[det_index]))
    order = np.argsort(-d.score[det_index], kind="stable")
    order = order[np.argsort(det_key[order], kind="stable")]
    det_index, det_key = det_index[order], det_key[order]
    det_start, det_group = _group_starts(det_key)
    kept = np.arange(len(det_key)) - det_start[det_group] < max_dets
    det_index, det_key = det_index[kept], det_key[kept]
    det_bbox = d.bbox[det_index]
    det_area = det_bbox[:, 2] * det_bbox[:, 3]

    # Ground truth: evaluated images, sorted by (category, image, ignore), file order within.
    gsel = np.flatnonzero(_isin_sorted(g.image_id, eval_images))
    gt_ignore_all = g.iscrowd | (g.area < AREA_ALL[0]) | (g.area > AREA_ALL[1])
    gorder = np.lexsort((gt_ignore_all[gsel], g.image_id[gsel], g.category_id[gsel]))
    gsel = gsel[gorder]
    gt_key = (np.searchsorted(cat_all, g.category_id[gsel]) * n_img
              + np.searchsorted(eval_images, g.image_id[gsel]))
    gt_bbox, gt_crowd, gt_ig, gt_id = (g.bbox[gsel], g.iscrowd[gsel], gt_ignore_all[gsel],
                                       g.ann_id[gsel])
    num_gt = np.bincount(np.searchsorted(cat_all, g.category_id[gsel][~gt_ig]),
                         minlength=len(cat_all)).astype(np.int64)

    m = len(det_index)
    matched = np.full(m, -1, dtype=np.int64)  # row into the sorted gt arrays
    # Groups with both detections and ground truth; the others have no matches.
    grp_det_start, _ = _group_starts(det_key)  # det_key is sorted
    grp_keys = det_key[grp_det_start]
    grp_det_count = np.diff(np.append(grp_det_start, m))
    gt_lo = np.searchsorted(gt_key, grp_keys, side="left")
    gt_count = np.searchsorted(gt_key, grp_keys, side="right") - gt_lo
    has_gt = gt_count > 0
    _match_groups(grp_det_start[has_gt], grp_det_count[has_gt], gt_lo[has_gt], gt_count[has_gt],
                  det_bbox, gt_bbox, gt_crowd, gt_ig, thr, matched)

    is_matched = matched >= 0
    safe = np.where(is_matched, matched, 0)
    ignored_gt = is_matched & gt_ig[safe] if len(gt_ig) else np.zeros(m, bool)
    out_of_range = (det_area < AREA_ALL[0]) | (det_area > AREA_ALL[1])
    ignored = ignored_gt | (~is_matched & out_of_range)
    matched_gt_id = np.where(is_matched, gt_id[safe] if len(gt_id) else -1, -1)
    return MatchResult(
        image_id=d.image_id[det_index], category_id=d.category_id[det_index],
        score=d.score[det_index], tp=is_matched & ~ignored_gt, ignored=ignored,
        matched_gt_id=matched_gt_id.astype(np.int64), det_index=det_index.astype(np.int64),
        category_ids=cat_all, num_gt=num_gt, iou_threshold=float(iou_threshold),
        max_dets=int(max_dets))


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """bool mask of `values` found in the ascending, unique `sorted_set`."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start row of each run of equal keys, and the run index of every row."""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.ones(len(sorted_keys), dtype=bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = np.flatnonzero(new)
    return starts, np.cumsum(new) - 1


def _match_groups(det_start, det_count, gt_start, gt_count, det_bbox, gt_bbox, gt_crowd, gt_ig,
                  thr, matched) -> None:
    """Runs the greedy loop for every group (writes gt rows into `matched`), bucketed by gt count.

    Within a bucket, groups are padded to the bucket's largest gt count and sorted by detection
    count (descending), so at score rank ``r`` the groups still active are a prefix.
    """
    if len(det_start) == 0:
        return
    bucket = np.ceil(np.log2(gt_count)).astype(np.int64)
    for b in np.unique(bucket):
        sel = np.flatnonzero(bucket == b)
        sel = sel[np.argsort(-det_count[sel], kind="stable")]
        ds, dc, gs, gc = det_start[sel], det_count[sel], gt_start[sel], gt_count[sel]
        gmax = int(gc.max())
        cols = np.arange(gmax)
        valid = cols[None, :] < gc[:, None]
        rows = np.where(valid, gs[:, None] + cols[None, :], 0)
        gbox = gt_bbox[rows]  # [B, G, 4]
        crowd = gt_crowd[rows] & valid
        ig = gt_ig[rows] & valid
        taken = np.zeros(valid.shape, dtype=bool)  # non-crowd gt already matched
        # active[r] = number of groups with more than r detections (dc is descending).
        active = np.searchsorted(-dc, -np.arange(int(dc[0])), side="left")
        for r, n in enumerate(active):
            di = ds[:n] + r
            iou = box_iou_coco(det_bbox[di][:, None, :], gbox[:n], crowd[:n])
            cand = valid[:n] & ~taken[:n] & (iou >= thr)
            regular = cand & ~ig[:n]
            has_regular = regular.any(axis=1)
            choose = np.where(has_regular[:, None], regular, cand)
            hit = choose.any(axis=1)
            if not hit.any():
                continue
            # The last column holding the maximum IoU (pycocotools updates on >=).
            score = np.where(choose, iou, -1.0)
            col = gmax - 1 - np.argmax(score[:, ::-1], axis=1)
            hit_rows = np.flatnonzero(hit)
            hit_cols = col[hit_rows]
            matched[di[hit_rows]] = rows[hit_rows, hit_cols]
            taken[hit_rows, hit_cols] |= ~crowd[hit_rows, hit_cols]
