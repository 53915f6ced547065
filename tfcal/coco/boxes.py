"""Box formats of raw detector outputs and the box sanity check run before tuning.

tfcal works in one box format: ``[ymin, xmin, ymax, xmax]`` normalized to [0, 1] (the TF OD
API's). `model.box_format` names the layout of the raw outputs given to it:

- ``yxyx``: ``[ymin, xmin, ymax, xmax]`` (default, the OD API);
- ``xyxy``: ``[xmin, ymin, xmax, ymax]``;
- ``cxcywh``: ``[x_center, y_center, width, height]``;

all normalized; `to_yxyx` converts them (then clips to [0, 1]).

`check_boxes` looks at the highest-scored candidates of a sample of images, before any work,
and refuses raw outputs whose boxes cannot be right (one `TfcalError` line naming the keys to
set):

- *inverted boxes*: more than `MAX_INVERTED_SHARE` of the candidates have ``ymin > ymax`` or
  ``xmin > xmax`` in the configured format (centre-size boxes read as corners are, about 80%
  of the time);
- *near-zero AP, or another layout far better*: the COCO AP (101-point, area ``all``, at
  ``tuning.match_iou``) of those candidates, without NMS, is below `MIN_AP`, or reading the
  same numbers in another box format gives at least `ALT_RATIO` times that AP (and at least
  `MIN_ALT_AP`), when the sample has at least `MIN_GT` ground-truth boxes: the boxes or the
  class columns do not line up with the ground truth (transposed ``xyxy`` boxes, a wrong
  ``label_offset``). The message names the better formats with their AP. This is an error,
  not a warning: such a detector reaches no precision target, so the search would disable
  every class and export a model that emits nothing, with exit 0; and a layout that is five
  times better on the same numbers is almost surely the one the detector writes. (On the
  demo detector the right layout gives AP50 0.38, the transposed one 0.011.)

Pixel coordinates are refused before, by `tfcal.raw.checks.check_value_ranges`.
The candidates are the top `TOP_K` (box, class) entries of each of up to `SAMPLE_IMAGES` images
spread evenly over the set, read `_READ_ROWS` images at a time (memory: a few images of raw
scores). Per-class boxes ``[I, N, K, 4]`` give each entry the box of its class.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from tfcal import TfcalError
from tfcal.coco.matching import Detections, match_detections
from tfcal.vocabulary import BOX_FORMATS, BoxFormat

logger = logging.getLogger(__name__)


SAMPLE_IMAGES = 200
TOP_K = 100
MAX_INVERTED_SHARE = 0.5
MIN_AP = 0.01
MIN_GT = 20
ALT_RATIO = 5.0
MIN_ALT_AP = 0.05
_READ_ROWS = 8


def to_yxyx(boxes: np.ndarray, box_format: BoxFormat) -> np.ndarray:
    """Boxes of `box_format` as ``[ymin, xmin, ymax, xmax]``, clipped to [0, 1] (except yxyx,
    returned as given).

    Args:
      boxes: float `[..., 4]` normalized boxes in `box_format`.
      box_format: one of `BOX_FORMATS`.

    Returns:
      float32 `[..., 4]`.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {' | '.join(BOX_FORMATS)}, got "
                         f"{box_format!r}")
    b = np.asarray(boxes, dtype=np.float32)
    if box_format == "yxyx":
        return b
    if box_format == "xyxy":
        out = b[..., [1, 0, 3, 2]]
    else:
        cx, cy, w, h = np.moveaxis(b, -1, 0)
        out = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def converted(raw, box_format: BoxFormat):
    """`raw` (`RawOutputs`) with its boxes converted to yxyx in memory (itself for yxyx).

    Boxes are `4 / C` of the raw outputs' size (C score columns), converted
    `_READ_ROWS * 16` images at a time."""
    if box_format == "yxyx":
        return raw
    out = np.empty(raw.boxes.shape, np.float32)
    step = _READ_ROWS * 16
    for start in range(0, raw.num_images, step):
        out[start:start + step] = to_yxyx(raw.boxes[start:start + step], box_format)
    logger.info("boxes converted from %s to [ymin, xmin, ymax, xmax]", box_format)
    return dataclasses.replace(raw, boxes=out)


def normalized_to_coco_xywh(boxes: np.ndarray, heights: np.ndarray,
                            widths: np.ndarray) -> np.ndarray:
    """float `[I, M, 4]` ``[ymin, xmin, ymax, xmax]`` in [0, 1] -> float64 `[I, M, 4]` pixel
    ``[x, y, width, height]`` (COCO's box) using each image's int `[I]` `heights` and
    `widths`."""
    b = np.asarray(boxes, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)[:, None]
    w = np.asarray(widths, dtype=np.float64)[:, None]
    x0, y0 = b[..., 1] * w, b[..., 0] * h
    return np.stack([x0, y0, b[..., 3] * w - x0, b[..., 2] * h - y0], axis=-1)


@dataclasses.dataclass(frozen=True)
class BoxSample:
    """The highest-scored candidates of a sample of images, boxes as stored.

    Attributes:
      image_index: int64 `[D]` row in the raw outputs. column: int64 `[D]` class column.
      score: float64 `[D]` raw score. boxes: float32 `[D, 4]` as stored (any format).
      rows: int64 `[S]` the rows (images) sampled.
    """

    image_index: np.ndarray
    column: np.ndarray
    score: np.ndarray
    boxes: np.ndarray
    rows: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.rows.shape[0])


def sample_candidates(raw, *, background_column: bool, num_images: int = SAMPLE_IMAGES,
                      top_k: int = TOP_K) -> BoxSample:
    """The top `top_k` (box, class column) entries by raw score of up to `num_images` images
    spread evenly over `raw` (a `RawOutputs`), reading a few images at a time."""
    n_img = raw.num_images
    rows = np.unique(np.linspace(0, n_img - 1, min(num_images, n_img)).round().astype(np.int64)) \
        if n_img else np.zeros(0, np.int64)
    first = 1 if background_column else 0
    parts = []
    for start in range(0, len(rows), _READ_ROWS):
        idx = rows[start:start + _READ_ROWS]
        scores = np.asarray(raw.scores[idx], np.float32)[:, :, first:]
        boxes = np.asarray(raw.boxes[idx], np.float32)
        if boxes.ndim == 4 and boxes.shape[2] == 1:  # one box shared by every class
            boxes = boxes[:, :, 0]
        b, n, k = scores.shape
        kk = min(top_k, n * k)
        if kk == 0:
            continue
        # The top kk entries lie in the kk boxes with the highest best score (up to ties):
        # select those boxes first (cheap), then the entries among them.
        nb = min(kk, n)
        best = np.argpartition(-scores.max(axis=2), nb - 1, axis=1)[:, :nb]
        img_b = np.arange(b)[:, None]
        flat = scores[img_b, best].reshape(b, nb * k)
        kk = min(kk, nb * k)
        top = np.argpartition(-flat, kk - 1, axis=1)[:, :kk]
        box_n, col = best[img_b, top // k], top % k
        img = np.repeat(np.arange(b), kk).reshape(b, kk)
        chosen = boxes[img, box_n, col] if boxes.ndim == 4 else boxes[img, box_n]
        parts.append((idx[img].ravel(), col.ravel(), flat[img, top].ravel(),
                      chosen.reshape(-1, 4)))
    if not parts:
        return BoxSample(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0),
                         np.zeros((0, 4), np.float32), rows)
    i, c, s, bx = (np.concatenate(p) for p in zip(*parts))
    return BoxSample(i.astype(np.int64), c.astype(np.int64), s.astype(np.float64),
                     bx.astype(np.float32), rows)


def inverted_share(boxes_yxyx: np.ndarray) -> float:
    """Share of float `[D, 4]` yxyx boxes with ``ymin > ymax`` or ``xmin > xmax`` (0 if D=0)."""
    b = np.asarray(boxes_yxyx)
    if b.shape[0] == 0:
        return 0.0
    return float(np.mean((b[:, 0] > b[:, 2]) | (b[:, 1] > b[:, 3])))


def average_precision(result) -> tuple[float, int]:
    """COCO AP (101-point interpolation) of a `MatchResult`, averaged over the categories with
    ground truth, as pycocotools' ``accumulate`` computes it for one IoU and area ``all``.

    Returns:
      ``(AP, ground-truth boxes)``; AP is 0.0 when there is no ground truth.
    """
    aps = []
    cat_idx = np.searchsorted(result.category_ids, result.category_id)
    recall_points = np.linspace(0.0, 1.0, 101)
    for c, num_gt in enumerate(result.num_gt):
        if num_gt == 0:
            continue
        sel = (cat_idx == c) & ~result.ignored
        order = np.argsort(-result.score[sel], kind="mergesort")
        tp = np.cumsum(result.tp[sel][order])
        fp = np.cumsum(~result.tp[sel][order])
        if tp.size == 0:
            aps.append(0.0)
            continue
        recall = tp / num_gt
        precision = tp / np.maximum(tp + fp, np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
        where = np.searchsorted(recall, recall_points, side="left")
        ok = where < len(precision)
        aps.append(float(np.sum(precision[where[ok]]) / len(recall_points)))
    total_gt = int(result.num_gt.sum())
    return (float(np.mean(aps)) if aps else 0.0), total_gt


def sample_ap(sample: BoxSample, boxes_yxyx: np.ndarray, dataset, mapping, *,
              match_iou: float, max_dets: int = TOP_K) -> tuple[float, int]:
    """``(AP, ground-truth boxes)`` of the sampled candidates with these yxyx boxes, on the
    sampled images (see `average_precision`)."""
    cat = mapping.columns_to_category_ids(sample.column)
    keep = cat >= 0
    idx = sample.image_index[keep]
    xywh = normalized_to_coco_xywh(boxes_yxyx[keep][:, None, :], dataset.image_heights[idx],
                                   dataset.image_widths[idx])[:, 0, :]
    dets = Detections.from_arrays(dataset.image_ids[idx], cat[keep], xywh, sample.score[keep])
    result = match_detections(dataset, dets, iou_threshold=match_iou, max_dets=max_dets,
                              image_ids=dataset.image_ids[sample.rows])
    return average_precision(result)


def check_boxes(raw, dataset, mapping, *, box_format: BoxFormat, background_column: bool,
                match_iou: float, source: str, boxes_key: str = "boxes") -> dict:
    """Refuses raw outputs whose boxes cannot be right (see the module docstring).

    Args:
      raw: the `RawOutputs`, boxes as stored (in `box_format`), rows in `dataset` order.
      dataset: the `CocoDataset`. mapping: the `CategoryMapping` of the class columns.
      box_format: the config's ``model.box_format``.
      background_column: the config's ``model.background_column``.
      match_iou: the config's ``tuning.match_iou``.
      source: the model folder or raw-outputs file, named in the message.
      boxes_key: the boxes output, named in the message.

    Returns:
      ``{"images", "candidates", "inverted_share", "ap", "num_gt"}`` of the sample (logged).

    Raises:
      TfcalError: one line naming `source`, `boxes_key` and the config keys to check.
    """
    sample = sample_candidates(raw, background_column=background_column)
    boxes = to_yxyx(sample.boxes, box_format)
    share = inverted_share(boxes)
    found = {"images": sample.num_images, "candidates": int(len(sample.score)),
             "inverted_share": share, "ap": None, "num_gt": None}
    others = [f for f in BOX_FORMATS if f != box_format]
    if share > MAX_INVERTED_SHARE:
        ok = [f for f in others if inverted_share(to_yxyx(sample.boxes, f)) <= MAX_INVERTED_SHARE]
        raise TfcalError(
            f"{source}: {boxes_key}: {share:.0%} of the {len(boxes)} highest-scored boxes have "
            f"ymin > ymax or xmin > xmax as model.box_format: {box_format} reads them; set "
            f"model.box_format to the layout the detector writes "
            f"({' | '.join(ok) if ok else ' | '.join(BOX_FORMATS)})")
    ap, num_gt = sample_ap(sample, boxes, dataset, mapping, match_iou=match_iou)
    found.update(ap=ap, num_gt=num_gt)
    logger.info("box sanity: %d images, %d candidates, %.1f%% inverted, AP%d %.3f (no NMS)",
                sample.num_images, len(boxes), 100 * share, round(100 * match_iou), ap)
    if num_gt < MIN_GT:
        return found
    better = []
    for f in others:
        alt, _ = sample_ap(sample, to_yxyx(sample.boxes, f), dataset, mapping,
                           match_iou=match_iou)
        if alt >= max(ALT_RATIO * ap, MIN_ALT_AP):
            better.append(f"{f} gives {alt:.3f}")
    if ap < MIN_AP or better:
        hint = f" ({', '.join(better)})" if better else ""
        raise TfcalError(
            f"{source}: {boxes_key}: AP {ap:.3f} at tuning.match_iou {match_iou:g} on "
            f"{sample.num_images} images ({num_gt} ground-truth boxes) with model.box_format: "
            f"{box_format}: the boxes or classes do not line up with the ground truth; check "
            f"model.box_format{hint} and model.label_offset / model.category_columns")
    return found
