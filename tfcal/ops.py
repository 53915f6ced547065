"""Pure TF post-processing ops: score spaces, knot maps, class thresholds, candidates, NMS.

No Keras, no config objects and no calibration methods here: the methods in `tfcal.calibration`
build their TF maps from these ops (`scores_to_logits`, `piecewise_linear`), and the layers in
`tfcal.layers` are thin wrappers. Everything computes in float32.

Score spaces (shared with `tfcal.calibration`):

- `sigmoid` converter: a raw score `p` is a probability; its logit is
  `z = logit(clip(p, EPS, 1 - EPS))` with `EPS = 1e-7`, clipped in float32.
- `identity` converter: a raw score is the logit `z` itself; the probability is `sigmoid(z)`.
- `softmax` converter: raw scores are softmax probabilities over all columns (background
  included when there is a background column); `z = log(clip(p, EPS, 1))`.

Threshold and NMS conventions (stated once, relied on by the layers and the tuner):

- A class score is kept by `apply_class_thresholds` iff `score >= min_score_thresh` and the
  class is enabled; every other score becomes exactly 0.0.
- `combined_nms` never emits a score <= 0: a 0.0 score means "no detection" (it is also the
  padding value). So with a threshold of 0.0 a score of exactly 0.0 is dropped and any positive
  score is kept. `tf.image.combined_non_max_suppression` keeps `score > score_threshold`
  (strictly), so `combined_nms` passes it the largest float32 below the requested threshold to
  keep `score >= score_threshold`.
- A box suppresses another of the same class iff their IoU is strictly greater than the IoU
  threshold (IoU == threshold keeps both), as in TF and torchvision. Among equal scores the lower
  box index wins.
- Soft-NMS (`soft_nms_sigma > 0`, the OD API's `soft_nms_sigma`, Bodla et al. 2017, as
  `tf.image.non_max_suppression_with_scores` runs it): greedily, the box with the highest
  current score is selected, and every other box of its class has its score multiplied by
  `exp(-0.5 * iou**2 / sigma)`. The IoU threshold has no effect then: TF's
  `NonMaxSuppressionV5`, which the OD API calls, only applies it to hard NMS (measured with TF
  2.21: IoU thresholds 0, 0.5 and 1 give the same output), so no box is removed by overlap
  alone. Detections carry their decayed scores and need `decayed score >= min_score_thresh`. The selected scores never increase along the greedy
  sequence, so thresholding the output at any `t` equals running soft-NMS at `t` (boxes below
  `t` only ever decay boxes that are already below `t`): the tuner's candidates stay exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfcal import validation
from tfcal.vocabulary import SCORE_CONVERTERS

EPS = 1e-7
"""Probability clip before taking logits (float32-safe; `tfcal.calibration` uses this value)."""

SKIP_EMPTY_CLASSES_MAX_BOXES = 512
"""`combined_nms` sends only the class columns with a candidate to the op when at most this many
boxes remain after dropping those without one (see `combined_nms`)."""

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)

__all__ = [
    "EPS",
    "SCORE_CONVERTERS",
    "NmsOptions",
    "apply_class_thresholds",
    "box_iou",
    "change_box_frame",
    "class_ids_of_columns",
    "clip_to_window",
    "combined_nms",
    "gather_detections",
    "iou_groups",
    "nms_groups",
    "pad_knots",
    "piecewise_linear",
    "scores_to_logits",
    "select_candidate_boxes",
    "select_passing_boxes",
    "strict_score_threshold",
]


# ----------------------------------------------------------------------------- score spaces


def _logit(p: tf.Tensor) -> tf.Tensor:
    p = tf.clip_by_value(p, EPS, 1.0 - EPS)
    return tf.math.log(p) - tf.math.log1p(-p)


def scores_to_logits(scores, score_converter: str = "sigmoid") -> tf.Tensor:
    """Turns raw detector scores into logits with a numerically safe inverse.

    Args:
      scores: float `[..., C]` raw scores in the detector's score space.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'. `sigmoid`:
        `logit(clip(p, EPS, 1 - EPS))`; `softmax`: `log(clip(p, EPS, 1))` (log-probabilities);
        `identity`: the scores already are logits and are returned unchanged.

    Returns:
      float32 `[..., C]` logits, finite for any score in [0, 1].
    """
    validation.choice("score_converter", score_converter, SCORE_CONVERTERS)
    s = tf.cast(scores, tf.float32)
    if score_converter == "sigmoid":
        return _logit(s)
    if score_converter == "softmax":
        return tf.math.log(tf.clip_by_value(s, EPS, 1.0))
    return s


# ----------------------------------------------------------------------------- knot maps


def pad_knots(knots_x, knots_y) -> tuple[np.ndarray, np.ndarray]:
    """Validates K rows of knots and pads them to one float32 `[K, M]` array pair.

    Rows may have different lengths. A row is padded past its last knot with `x = x_last + 1,
    x_last + 2, ...` (outside [0, 1], so never reached by a probability) and `y = y_last`, which
    keeps every row strictly increasing in `x` and leaves the map unchanged. `M >= 2`.

    Args:
      knots_x: K sequences, each non-empty and strictly increasing in [0, 1].
      knots_y: K sequences, each as long as its `knots_x` row, non-decreasing in [0, 1].

    Returns:
      `(xs, ys)`: float32 `[K, M]` each.

    Raises:
      ValueError: on a malformed row (`tfcal.validation.knot_rows`); the message names the row
        and includes its values.
    """
    kx, ky = validation.knot_rows(knots_x, knots_y)
    rows = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(kx, ky)]
    m = max(2, max(x.size for x, _ in rows))
    xs = np.empty((len(rows), m), np.float32)
    ys = np.empty((len(rows), m), np.float32)
    for k, (x, y) in enumerate(rows):
        pad = m - x.size
        xs[k] = np.concatenate([x, x[-1] + np.arange(1, pad + 1)])
        ys[k] = np.concatenate([y, np.full(pad, y[-1])])
    return xs, ys


def piecewise_linear(u, xs, ys) -> tf.Tensor:
    """Per-column piecewise-linear map, clamped to the end knots' `y` outside the knot range.

    Args:
      u: float32 `[..., K]` uncalibrated probabilities.
      xs: float32 `[K, M]` padded knots (see `pad_knots`), strictly increasing per row.
      ys: float32 `[K, M]` knot values, non-decreasing per row.

    Returns:
      float32 `[..., K]`, `np.interp(u[..., k], xs[k], ys[k])` for every column k.
    """
    u = tf.cast(u, tf.float32)
    xs = tf.cast(xs, tf.float32)
    ys = tf.cast(ys, tf.float32)
    shape = tf.shape(u)
    k = tf.shape(xs)[0]
    m = tf.shape(xs)[1]
    flat = tf.transpose(tf.reshape(u, [-1, k]))  # [K, X]
    idx = tf.searchsorted(xs, flat, side="right")  # number of knots <= u, in [0, M]
    lo = tf.clip_by_value(idx - 1, 0, m - 2)
    x0 = tf.gather(xs, lo, batch_dims=1)
    x1 = tf.gather(xs, lo + 1, batch_dims=1)
    y0 = tf.gather(ys, lo, batch_dims=1)
    y1 = tf.gather(ys, lo + 1, batch_dims=1)
    t = tf.clip_by_value((flat - x0) / (x1 - x0), 0.0, 1.0)
    out = y0 + t * (y1 - y0)
    return tf.reshape(tf.transpose(out), shape)


# ----------------------------------------------------------------------------- thresholds


def apply_class_thresholds(scores, min_score_thresh, class_enabled=None) -> tf.Tensor:
    """Zeroes every score below its class threshold or of a disabled class.

    Args:
      scores: float `[..., K]` class probabilities.
      min_score_thresh: float scalar, `[1]` or `[K]`, each in [0, 1]. A score is kept iff
        `score >= min_score_thresh` (equality keeps it).
      class_enabled: optional bool or 0/1 float `[K]`; scores of disabled classes become 0.

    Returns:
      float32 `[..., K]`: the kept scores, and exactly 0.0 elsewhere.
    """
    s = tf.cast(scores, tf.float32)
    keep = s >= tf.cast(min_score_thresh, tf.float32)
    if class_enabled is not None:
        enabled = tf.cast(class_enabled, tf.float32) > 0.5
        keep = tf.logical_and(keep, enabled)
    return tf.where(keep, s, tf.zeros_like(s))


# ----------------------------------------------------------------------------- NMS


def box_iou(boxes_a, boxes_b) -> tf.Tensor:
    """Pairwise IoU of `[ymin, xmin, ymax, xmax]` boxes (corners may come in either order).

    Args:
      boxes_a: float `[..., A, 4]`.
      boxes_b: float `[..., B, 4]`.

    Returns:
      float32 `[..., A, B]`; 0 where the union is empty (zero-area boxes).
    """
    a = tf.cast(boxes_a, tf.float32)
    b = tf.cast(boxes_b, tf.float32)

    def corners(x):
        y0, x0, y1, x1 = tf.unstack(x, axis=-1)
        return tf.minimum(y0, y1), tf.minimum(x0, x1), tf.maximum(y0, y1), tf.maximum(x0, x1)

    ay0, ax0, ay1, ax1 = corners(a)
    by0, bx0, by1, bx1 = corners(b)
    ih = tf.maximum(tf.minimum(ay1[..., :, None], by1[..., None, :])
                    - tf.maximum(ay0[..., :, None], by0[..., None, :]), 0.0)
    iw = tf.maximum(tf.minimum(ax1[..., :, None], bx1[..., None, :])
                    - tf.maximum(ax0[..., :, None], bx0[..., None, :]), 0.0)
    inter = ih * iw
    area_a = (ay1 - ay0) * (ax1 - ax0)
    area_b = (by1 - by0) * (bx1 - bx0)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def strict_score_threshold(score_threshold) -> tf.Tensor:
    """The value `t'` with `score > t'` iff `score >= score_threshold and score > 0` (float32).

    `t' = nextafter(score_threshold, 0)` for thresholds whose predecessor is a normal float32,
    else 0.0 (TF flushes subnormal floats to zero on CPU, so a subnormal `t'` would act as 0).

    Args:
      score_threshold: float scalar (Python or tensor), >= 0.

    Returns:
      float32 scalar tensor.
    """
    t = tf.cast(score_threshold, tf.float32)
    below = tf.math.nextafter(t, tf.zeros_like(t))
    return tf.where(below >= _FLOAT32_TINY, below, tf.zeros_like(t))


def iou_groups(iou_threshold, num_classes: int) -> list[tuple[float, list[int]]]:
    """Groups class columns that share an IoU threshold.

    Args:
      iou_threshold: float or a sequence of 1 or `num_classes` floats, each in [0, 1].
      num_classes: K.

    Returns:
      `[(iou, columns), ...]` sorted by IoU; `columns` ascending. One group when all are equal.

    Raises:
      ValueError: wrong length or a value outside [0, 1] (`tfcal.validation.iou_thresholds`).
    """
    values = validation.iou_thresholds("iou_threshold", _as_list(iou_threshold),
                                       lengths=(1, num_classes), scalar_ok=True)
    if len(values) == 1:
        return [(values[0], list(range(num_classes)))]
    groups: dict[float, list[int]] = {}
    for k, v in enumerate(np.asarray(values, np.float32).tolist()):
        groups.setdefault(v, []).append(k)
    return sorted(groups.items())


def nms_groups(iou_threshold, soft_nms_sigma, num_classes: int
               ) -> list[tuple[float, float, list[int]]]:
    """Groups class columns that share an IoU threshold and a soft-NMS sigma.

    Args:
      iou_threshold: float or 1 or `num_classes` floats, each in [0, 1].
      soft_nms_sigma: float or 1 or `num_classes` floats, each >= 0 (0: hard NMS).
      num_classes: K.

    Returns:
      `[(iou, sigma, columns), ...]` sorted by (sigma, iou); `columns` ascending.

    Raises:
      ValueError: wrong length or a value out of range (`tfcal.validation`).
    """
    sigmas = validation.soft_nms_sigmas("soft_nms_sigma", _as_list(soft_nms_sigma),
                                        lengths=(1, num_classes), scalar_ok=True)
    sigmas = np.broadcast_to(np.asarray(sigmas, np.float32), [num_classes])
    groups: dict[tuple[float, float], list[int]] = {}
    for iou, columns in iou_groups(iou_threshold, num_classes):
        for k in columns:
            groups.setdefault((float(sigmas[k]), iou), []).append(k)
    return [(iou, sigma, sorted(cols)) for (sigma, iou), cols in sorted(groups.items())]


def _as_list(value):
    """A NumPy array or scalar as plain Python values (the validators take sequences)."""
    return np.asarray(value).tolist() if isinstance(value, (np.ndarray, np.generic)) else value


@dataclasses.dataclass(frozen=True)
class NmsOptions:
    """What `combined_nms` does: IoU, soft-NMS, caps, box clipping and class ids (one record).

    Validated once, on construction, by `tfcal.validation` (the checks `PostProcessConfig` and
    the tuning config run too); tuples are stored, so a record is hashable and can key a cache of
    traced functions.

    Attributes:
      iou_threshold: 1 or K floats in [0, 1] (a float is read as one), default 0.5: a box is
        suppressed by a higher-scored box of its class iff their IoU > the class's threshold.
      soft_nms_sigma: 1 or K floats >= 0, default 0.0 (hard NMS): the classes with a sigma > 0
        run Gaussian soft-NMS (see the module docstring; their IoU threshold has no effect) and
        emit decayed scores. Classes sharing (IoU, sigma) form one group.
      max_detections_per_class: int >= 1, detections kept per class and image; default None:
        no cap below `max_total_detections`. With `class_agnostic`: None or >=
        `max_total_detections` (one NMS over all classes has no per-class cap; see
        `tfcal.validation.detection_caps`).
      max_total_detections: int >= 1, default 100: rows of the output (M).
      class_agnostic: one NMS over all classes: each box keeps only its best class score (and,
        for per-class boxes, that class's box); needs a single IoU and sigma.
      clip_boxes: clip the output boxes to [0, 1]; NMS itself uses the boxes as given (as
        `tf.image.combined_non_max_suppression` does).
      clip_window: None or 4 floats `[ymin, xmin, ymax, xmax]` (ymin < ymax, xmin < xmax), or a
        float32 `[4]` tensor, as the OD API's `clip_window`: after per-class NMS (which sees the
        boxes as given), every detection's box is clipped to the window and detections whose
        clipped box has zero area are dropped before the `max_total_detections` cut (as the OD
        API's `multiclass_non_max_suppression` does).
      change_coordinate_frame: with `clip_window`, re-express the clipped boxes in the window's
        frame: `(box - [ymin, xmin, ymin, xmin]) / [h, w, h, w]` (OD API semantics).
      label_offset: int >= 0, default 1: output class id = column + `label_offset` (OD API
        ids), when no `class_ids` are given to `combined_nms`.
    """

    iou_threshold: float | tuple[float, ...] = 0.5
    soft_nms_sigma: float | tuple[float, ...] = 0.0
    max_detections_per_class: int | None = None
    max_total_detections: int = 100
    class_agnostic: bool = False
    clip_boxes: bool = False
    clip_window: tuple[float, ...] | tf.Tensor | None = None
    change_coordinate_frame: bool = False
    label_offset: int = 1

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        agnostic = validation.boolean("class_agnostic", self.class_agnostic)
        put("class_agnostic", agnostic)
        put("iou_threshold", validation.iou_thresholds("iou_threshold", self.iou_threshold,
                                                       scalar_ok=True))
        put("soft_nms_sigma", validation.soft_nms_sigmas("soft_nms_sigma", self.soft_nms_sigma,
                                                         scalar_ok=True))
        for name in ("iou_threshold", "soft_nms_sigma"):
            validation.one_value_when_agnostic(name, getattr(self, name), agnostic)
        ious, sigmas = len(self.iou_threshold), len(self.soft_nms_sigma)
        if ious > 1 and sigmas > 1 and ious != sigmas:
            raise ValueError(f"soft_nms_sigma: {sigmas} values but iou_threshold has {ious}")
        per_class, total = validation.detection_caps(
            self.max_detections_per_class, self.max_total_detections, class_agnostic=agnostic)
        put("max_detections_per_class", per_class)
        put("max_total_detections", total)
        put("clip_boxes", validation.boolean("clip_boxes", self.clip_boxes))
        window = self.clip_window
        if window is not None and not isinstance(window, (tf.Tensor, tf.Variable)):
            window = None if len(window) == 0 else validation.clip_window("clip_window", window)
        put("clip_window", window)
        put("change_coordinate_frame", validation.window_frame(self.change_coordinate_frame,
                                                               window))
        put("label_offset", validation.label_offset("label_offset", self.label_offset))

    @property
    def per_class_cap(self) -> int:
        """The per-class cap in effect: `max_detections_per_class`, or the total without one."""
        return self.max_detections_per_class or self.max_total_detections

    def groups(self, num_classes: int) -> list[tuple[float, float, list[int]]]:
        """`nms_groups` of this record for K class columns (checks the lengths against K)."""
        return nms_groups(self.iou_threshold, self.soft_nms_sigma, num_classes)


class _Found(NamedTuple):
    """Detections of one NMS stage: float32 boxes `[B, R, 4]`, scores `[B, R]`, class columns
    `[B, R]` (float32 or int32) and int32 counts `[B]`; rows at or beyond the count are
    padding."""

    boxes: tf.Tensor
    scores: tf.Tensor
    columns: tf.Tensor
    num: tf.Tensor


def _pad_rows(boxes, scores, classes, num, max_total):
    """Zeroes the rows at or beyond `num` (boxes, scores and classes)."""
    valid = tf.range(max_total)[None, :] < num[:, None]
    boxes = tf.where(valid[..., None], boxes, 0.0)
    scores = tf.where(valid, scores, 0.0)
    classes = tf.where(valid, classes, 0.0)
    return boxes, scores, classes


def _agnostic_nms(boxes, scores, options: NmsOptions, *, rows, threshold, clip_boxes,
                  min_score_thresh=None) -> _Found:
    """Class-agnostic NMS: each box competes once with its best class score; `rows` rows
    (a Python int or a scalar tensor)."""
    iou, sigma = options.iou_threshold[0], options.soft_nms_sigma[0]
    best = tf.argmax(scores, axis=-1, output_type=tf.int32)
    if boxes.shape.rank == 4:
        boxes = tf.gather(boxes, best, axis=2, batch_dims=2)
    best_scores = tf.reduce_max(scores, axis=-1)

    def one_image(args):
        b, s, c = args
        idx, sel_scores, n = tf.raw_ops.NonMaxSuppressionV5(
            boxes=b, scores=s, max_output_size=rows, iou_threshold=iou,
            score_threshold=threshold, soft_nms_sigma=sigma, pad_to_max_output_size=True)
        # A zero box (class 0) after the last keeps the padding index 0 valid with no boxes.
        b = tf.concat([b, tf.zeros([1, 4], b.dtype)], 0)
        c = tf.concat([c, tf.zeros([1], c.dtype)], 0)
        return tf.gather(b, idx), sel_scores, tf.cast(tf.gather(c, idx), tf.float32), n

    static_rows = tf.get_static_value(rows)
    found = _Found(*tf.map_fn(
        one_image, (boxes, best_scores, best),
        fn_output_signature=(tf.TensorSpec([static_rows, 4], tf.float32),
                             tf.TensorSpec([static_rows], tf.float32),
                             tf.TensorSpec([static_rows], tf.float32),
                             tf.TensorSpec([], tf.int32))))
    if sigma > 0 and min_score_thresh is not None:
        # Decayed scores must still reach their class's threshold.
        valid = tf.range(rows)[None, :] < found.num[:, None]
        thresh = _broadcast_thresholds(min_score_thresh, scores.shape[-1])
        valid &= found.scores >= tf.gather(thresh, tf.cast(found.columns, tf.int32))
        found = _Found(*_compact(found.boxes, found.scores, found.columns, valid, rows))
    if clip_boxes:
        found = found._replace(boxes=tf.clip_by_value(found.boxes, 0.0, 1.0))
    return found


def _per_class_nms(boxes, scores, groups, options: NmsOptions, *, rows, threshold, clip_boxes,
                   min_score_thresh=None) -> _Found:
    """Per-class NMS: one combined NMS per hard-NMS IoU group, one loop of
    `NonMaxSuppressionV5` for the soft-NMS columns, merged by score (see `combined_nms`)."""
    num_classes = scores.shape[-1]
    if boxes.shape.rank == 3:
        boxes = boxes[:, :, None, :]
    active = tf.reduce_any(scores > threshold, axis=[0, 1])  # [K]
    few_boxes = tf.shape(scores)[1] <= SKIP_EMPTY_CLASSES_MAX_BOXES
    per_group = []
    # Soft-NMS columns run in one loop of NonMaxSuppressionV5, each with its own IoU and
    # sigma; the others by IoU group in combined NMS.
    column_iou = np.zeros(num_classes, np.float32)
    column_sigma = np.zeros(num_classes, np.float32)
    looped = []
    for iou, sigma, columns in groups:
        column_iou[columns], column_sigma[columns] = iou, sigma
        if sigma > 0:
            looped += columns
    if looped:
        looped_boxes, looped_scores, picked = _group_columns(boxes, scores, sorted(looped),
                                                             active, few_boxes)
        per_group.append(_soft_nms_group(
            looped_boxes, looped_scores, picked, column_iou=column_iou,
            column_sigma=column_sigma, per_class=options.per_class_cap, max_total=rows,
            threshold=threshold, clip_boxes=clip_boxes, min_score_thresh=min_score_thresh,
            num_classes=num_classes))
    for iou, sigma, columns in groups:
        if sigma > 0:
            continue
        group_boxes, group_scores, picked = _group_columns(boxes, scores, columns, active,
                                                           few_boxes)
        # No class can keep more boxes than it has above the threshold, so capping the op's
        # per-class output at the largest such count changes no detection.
        most = tf.reduce_max(tf.reduce_sum(tf.cast(group_scores > threshold, tf.int32), axis=1))
        per_class = tf.clip_by_value(most, 1, options.per_class_cap)
        r = tf.image.combined_non_max_suppression(
            group_boxes, group_scores, max_output_size_per_class=per_class,
            max_total_size=rows, iou_threshold=iou, score_threshold=threshold,
            pad_per_class=False, clip_boxes=clip_boxes)
        group_classes = tf.gather(picked, tf.cast(r.nmsed_classes, tf.int32))
        per_group.append((r.nmsed_boxes, r.nmsed_scores, group_classes, r.valid_detections))
    found = _Found(*(per_group[0] if len(per_group) == 1 else _merge_groups(per_group, rows)))
    return found._replace(columns=tf.cast(found.columns, tf.float32))


def _rows_before_window(boxes, scores, threshold, window, class_agnostic: bool, max_total):
    """Rows to ask NMS for: `max_total`, plus (with a window) as many as there are candidate
    (box, class) pairs whose box clips to zero area, since those are dropped before the cut."""
    if window is None:
        return max_total
    outside = tf.logical_not(_nonzero_area(clip_to_window(boxes, window)))
    if outside.shape.rank == 3 and class_agnostic:
        outside = tf.reduce_any(outside, axis=-1)
    if outside.shape.rank == 2 and not class_agnostic:
        outside = outside[..., None]
    passing = scores > threshold if not class_agnostic else \
        tf.reduce_max(scores, axis=-1) > threshold
    extra = tf.reduce_max(tf.reduce_sum(tf.cast(passing & outside, tf.int32),
                                        axis=list(range(1, passing.shape.rank))))
    return max_total + extra


def _check_nms_inputs(boxes, scores) -> tuple[tf.Tensor, tf.Tensor]:
    """float32 boxes `[B, N, 4]` or `[B, N, K, 4]` (a class axis of 1 is dropped) and scores
    `[B, N, K]` with a static K; ValueError on shapes known to be wrong at trace time."""
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    if scores.shape.rank != 3:
        raise ValueError(f"scores: expected [batch, num_boxes, num_classes], got {scores.shape}")
    if boxes.shape.rank not in (3, 4) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected [batch, num_boxes, 4] or [batch, num_boxes, "
                         f"num_classes, 4], got {boxes.shape}")
    num_classes = scores.shape[-1]
    if num_classes is None:
        raise ValueError("scores: the class axis must have a static size")
    if boxes.shape.rank == 4 and boxes.shape[2] not in (None, 1, num_classes):
        raise ValueError(f"boxes: class axis {boxes.shape[2]} != scores class axis {num_classes}")
    if boxes.shape.rank == 4 and boxes.shape[2] == 1:
        boxes = boxes[:, :, 0, :]  # [batch, num_boxes, 1, 4]: shared by all classes
    return boxes, scores


def combined_nms(boxes, scores, options: NmsOptions | None = None, *, score_threshold=0.0,
                 min_score_thresh=None, class_ids=None,
                 return_indices: bool = False) -> dict[str, tf.Tensor]:
    """Batched per-class NMS over `tf.image.combined_non_max_suppression`, with per-class IoU.

    Classes sharing an IoU threshold form a group; each group gets one combined NMS call on its
    score columns, and the groups' detections are merged by score (top `max_total_detections`).
    This equals running every class alone at its own IoU and keeping the best
    `max_total_detections` detections overall.

    The cost follows the candidates, not the input size: boxes with no class score above the
    threshold are dropped first (`select_passing_boxes`); when at most
    `SKIP_EMPTY_CLASSES_MAX_BOXES` (512) boxes remain, only the class columns with a candidate
    are sent to the op (it costs a few microseconds per class, candidate or not; with more boxes
    the gather costs more than that); and the op's per-class output cap shrinks to the largest
    per-class candidate count (its cost grows with batch x classes x that cap). None of this
    changes a detection, except which of several detections with exactly equal scores fills
    the last row at the `max_total_detections` cut: the op breaks such ties by an order that
    depends on the class columns it is given.

    Stages: inputs checked (`_check_nms_inputs`) -> class thresholds and candidate boxes ->
    class-agnostic or per-class NMS (`_agnostic_nms`, `_per_class_nms`) -> input indices, clip
    window and frame, class ids and padding (`_finish`).

    Args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, 1, 4]` (shared by all
        classes), or `[batch, num_boxes, num_classes, 4]`, as `[ymin, xmin, ymax, xmax]`.
      scores: float `[batch, num_boxes, num_classes]` class probabilities (no background).
      options: the `NmsOptions` (IoU, soft-NMS sigma, caps, clipping, label offset); default
        `NmsOptions()`.
      score_threshold: float scalar in [0, 1] (Python or tensor): detections need
        `score >= score_threshold` and `score > 0`.
      min_score_thresh: optional float `[1]` or `[K]` (a tensor or variable): detections of
        column k need `score >= min_score_thresh[k]`, on the decayed score for soft-NMS. For
        hard NMS this equals zeroing the input scores below it first (as `ClassThresholds`
        does), which is what is done.
      class_ids: optional float or int `[K]` (a constant, a variable or a tensor): the class id
        of each column; the output class is `class_ids[column]`, gathered in the graph (ids up
        to 2**24 are exact in float32). Default: column + `options.label_offset`.
      return_indices: also return `detection_indices`, int32 `[batch, M]`: the input box index
        of each detection (-1 for padding rows), to gather per-box outputs of the detector for
        the kept boxes (`gather_detections`). The NMS ops do not return indices, so each
        detection is found among the input boxes of its class by its exact box (before
        clipping) and score (for soft-NMS, the first box whose score is >= the decayed one):
        exact, except that boxes identical in all four coordinates and score within one class
        are indistinguishable (the lowest index is given).

    Returns:
      dict (OD API names and conventions), rows sorted by descending score, rows at or beyond
      `num_detections` all zero, `M = options.max_total_detections`:
        `detection_boxes`: float32 `[batch, M, 4]`;
        `detection_scores`: float32 `[batch, M]`;
        `detection_classes`: float32 `[batch, M]`, `class_ids[column]` or column +
          `label_offset`;
        `num_detections`: float32 `[batch]`.
      With no class column (K = 0) every output is padding, as TF's op gives.

    Raises:
      ValueError: bad arguments or shapes known at trace time.

    Example:
      >>> out = combined_nms(boxes, scores, NmsOptions(iou_threshold=(0.5, 0.6, 0.5),
      ...                                              max_total_detections=100),
      ...                    score_threshold=0.3)
    """
    options = NmsOptions() if options is None else options
    if not isinstance(options, NmsOptions):
        raise TypeError(f"options: expected an NmsOptions, got {type(options).__name__}")
    boxes, scores = _check_nms_inputs(boxes, scores)
    max_total = options.max_total_detections
    if isinstance(score_threshold, (int, float)):
        validation.score_thresholds("score_threshold", score_threshold, lengths=(1,),
                                    scalar_ok=True)
    if scores.shape[-1] == 0:
        # No class column, so nothing to emit (an empty batch, as TF's op returns it).
        return _no_detections(tf.shape(scores)[0], max_total, return_indices)
    groups = options.groups(scores.shape[-1])
    threshold = strict_score_threshold(score_threshold)
    window = None if options.clip_window is None else _window_tensor(options.clip_window)
    if min_score_thresh is not None:
        scores = apply_class_thresholds(scores, min_score_thresh)
    given = (boxes, scores)
    # Only boxes with some class score above the threshold can be emitted.
    boxes, scores = select_passing_boxes(boxes, scores,
                                         tf.reduce_max(scores, axis=-1) > threshold)
    nms = _agnostic_nms if options.class_agnostic else functools.partial(_per_class_nms,
                                                                         groups=groups)
    found = nms(boxes, scores, options=options, threshold=threshold,
                rows=_rows_before_window(boxes, scores, threshold, window,
                                         options.class_agnostic, max_total),
                # Box clipping to [0, 1] happens after the detections' input boxes are found.
                clip_boxes=options.clip_boxes and not return_indices,
                min_score_thresh=min_score_thresh)
    indices = None
    if return_indices:
        indices = _detection_indices(*given, found.boxes, found.scores, found.columns,
                                     found.num, exact_scores=not any(g[1] > 0 for g in groups))
        if options.clip_boxes:
            found = found._replace(boxes=tf.clip_by_value(found.boxes, 0.0, 1.0))
    return _finish(found, indices, options, window=window, class_ids=class_ids)


def _finish(found: _Found, indices, options: NmsOptions, *, window, class_ids
            ) -> dict[str, tf.Tensor]:
    """The output dict: boxes clipped to the window (zero-area ones dropped before the cut) and
    in its frame, class ids of the columns, padding rows zeroed (see `combined_nms`)."""
    max_total = options.max_total_detections
    out_boxes, out_scores, out_classes, num = found
    if window is not None:
        out_boxes = clip_to_window(out_boxes, window)
        valid = (tf.range(tf.shape(out_scores)[1])[None, :] < num[:, None]) & \
            _nonzero_area(out_boxes)
        if indices is not None:
            # Carried through the compaction as a float column (indices < 2**24 are exact).
            payload = tf.stack([out_classes, tf.cast(indices, tf.float32)], axis=-1)
            out_boxes, out_scores, payload, num = _compact(out_boxes, out_scores, payload,
                                                           valid, max_total)
            out_classes, indices = payload[..., 0], tf.cast(payload[..., 1], tf.int32)
        else:
            out_boxes, out_scores, out_classes, num = _compact(out_boxes, out_scores,
                                                               out_classes, valid, max_total)
        if options.change_coordinate_frame:
            out_boxes = change_box_frame(out_boxes, window)
    out_classes = class_ids_of_columns(out_classes, class_ids, options.label_offset)
    out_boxes, out_scores, out_classes = _pad_rows(out_boxes, out_scores, out_classes, num,
                                                   max_total)
    out = {
        "detection_boxes": out_boxes,
        "detection_scores": out_scores,
        "detection_classes": out_classes,
        "num_detections": tf.cast(num, tf.float32),
    }
    if indices is not None:
        valid = tf.range(max_total)[None, :] < num[:, None]
        out["detection_indices"] = tf.where(valid, indices, -1)
    return out


def _no_detections(batch, max_total: int, return_indices: bool) -> dict[str, tf.Tensor]:
    """All-padding outputs for `batch` images (`[batch, max_total, ...]` zeros)."""
    out = {
        "detection_boxes": tf.zeros([batch, max_total, 4], tf.float32),
        "detection_scores": tf.zeros([batch, max_total], tf.float32),
        "detection_classes": tf.zeros([batch, max_total], tf.float32),
        "num_detections": tf.zeros([batch], tf.float32),
    }
    if return_indices:
        out["detection_indices"] = tf.fill([batch, max_total], -1)
    return out


def _detection_indices(in_boxes, in_scores, out_boxes, out_scores, out_columns, num, *,
                       exact_scores: bool) -> tf.Tensor:
    """The input box index of each output row (see `combined_nms`'s `return_indices`).

    Args:
      in_boxes: float32 `[B, N, 4]` or `[B, N, K, 4]`; in_scores: float32 `[B, N, K]`;
      out_boxes: float32 `[B, R, 4]` (unclipped); out_scores, out_columns: `[B, R]`; num `[B]`.

    Returns:
      int32 `[B, R]`, -1 for rows at or beyond `num` (or, never expected, with no match).
    """
    # One zero box with score 0 after the last keeps the ops defined for an empty input.
    in_scores = tf.pad(in_scores, [[0, 0], [0, 1], [0, 0]])
    in_boxes = tf.pad(in_boxes, [[0, 0], [0, 1]] + [[0, 0]] * (in_boxes.shape.rank - 2))
    cols = tf.cast(out_columns, tf.int32)
    score_at = tf.gather(in_scores, cols, axis=2, batch_dims=1)  # [B, N, R]
    if in_boxes.shape.rank == 3:
        same = tf.reduce_all(in_boxes[:, :, None, :] == out_boxes[:, None, :, :], axis=-1)
    else:
        class_boxes = tf.gather(in_boxes, cols, axis=2, batch_dims=1)  # [B, N, R, 4]
        same = tf.reduce_all(class_boxes == out_boxes[:, None, :, :], axis=-1)
    target = out_scores[:, None, :]
    ok = score_at == target if exact_scores else score_at >= target
    match = same & ok & (score_at > 0)
    idx = tf.argmax(tf.cast(match, tf.int32), axis=1, output_type=tf.int32)  # first match
    rows = tf.shape(out_scores)[1]
    valid = (tf.range(rows)[None, :] < num[:, None]) & tf.reduce_any(match, axis=1)
    return tf.where(valid, idx, -1)


def gather_detections(values, indices) -> tf.Tensor:
    """Per-box values of the detections: `values[b, indices[b, m]]`, zeros where the index is -1.

    Args:
      values: `[batch, num_boxes, ...]` per-box outputs of a detector (before NMS), any dtype.
      indices: int32 `[batch, M]` (`combined_nms(..., return_indices=True)`).

    Returns:
      `[batch, M, ...]` of `values`' dtype.
    """
    values = tf.convert_to_tensor(values)
    idx = tf.cast(indices, tf.int32)
    # A zero row after the last keeps index 0 valid when there are no boxes at all.
    padded = tf.pad(values, [[0, 0], [0, 1]] + [[0, 0]] * (values.shape.rank - 2))
    picked = tf.gather(padded, tf.maximum(idx, 0), axis=1, batch_dims=1)
    mask = tf.reshape(idx >= 0, tf.concat([tf.shape(idx), tf.ones([tf.rank(values) - 2],
                                                                     tf.int32)], 0))
    return tf.where(mask, picked, tf.zeros_like(picked))


def _window_tensor(clip_window) -> tf.Tensor:
    """float32 `[4]` of a window `NmsOptions` holds (validated there, or a tensor)."""
    return tf.reshape(tf.cast(clip_window, tf.float32), [4])


def clip_to_window(boxes, window) -> tf.Tensor:
    """Clips `[ymin, xmin, ymax, xmax]` boxes to a window (the OD API's `clip_to_window`).

    Args:
      boxes: float `[..., 4]`.
      window: float `[4]` `[ymin, xmin, ymax, xmax]`.

    Returns:
      float32 `[..., 4]`: each coordinate clamped to the window's range on its axis.
    """
    b = tf.cast(boxes, tf.float32)
    w = tf.cast(window, tf.float32)
    lo = tf.stack([w[0], w[1], w[0], w[1]])
    hi = tf.stack([w[2], w[3], w[2], w[3]])
    return tf.minimum(tf.maximum(b, lo), hi)


def change_box_frame(boxes, window) -> tf.Tensor:
    """Re-expresses boxes in a window's frame (the OD API's `change_coordinate_frame`):
    `(box - [ymin, xmin, ymin, xmin]) / [h, w, h, w]`.

    Args:
      boxes: float `[..., 4]`; window: float `[4]` `[ymin, xmin, ymax, xmax]`, positive size.

    Returns:
      float32 `[..., 4]`.
    """
    b = tf.cast(boxes, tf.float32)
    w = tf.cast(window, tf.float32)
    h, wd = w[2] - w[0], w[3] - w[1]
    return (b - tf.stack([w[0], w[1], w[0], w[1]])) / tf.stack([h, wd, h, wd])


def _nonzero_area(boxes) -> tf.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) != 0.0


def class_ids_of_columns(columns, class_ids=None, label_offset: int = 1) -> tf.Tensor:
    """Class ids of class columns: `class_ids[column]`, or `column + label_offset` without ids.

    Args:
      columns: float or int `[...]` class column indices in `[0, K)`.
      class_ids: optional float or int `[K]`, the id of each column.
      label_offset: int, used only when `class_ids` is None.

    Returns:
      float32 `[...]` class ids.
    """
    if class_ids is None:
        return tf.cast(columns, tf.float32) + float(label_offset)
    return tf.gather(tf.cast(class_ids, tf.float32), tf.cast(columns, tf.int32))


def _group_columns(boxes, scores, columns, active, few_boxes):
    """The boxes, scores and column ids one IoU group sends to combined NMS.

    With few boxes, only the group's columns with some score above the threshold: the op costs a
    few microseconds per class even when a class has no candidate, and gathering few boxes is
    cheap. With many, every column of the group (gathering them would cost more than it saves).
    At least one column either way (it yields no detection when nothing passes).
    """
    num_classes = scores.shape[-1]
    in_group = np.zeros(num_classes, bool)
    in_group[columns] = True
    everything = len(columns) == num_classes

    def active_columns():
        picked = tf.cast(tf.reshape(tf.where(active & in_group), [-1]), tf.int32)
        return tf.concat([picked, [columns[0]]], 0)[:tf.maximum(tf.size(picked), 1)]

    def all_columns():
        return tf.constant(columns, tf.int32)

    picked = tf.cond(few_boxes, active_columns, all_columns)
    if everything:
        # All columns in one group: the full tensors as they are when nothing is skipped.
        group_scores = tf.cond(few_boxes, lambda: tf.gather(scores, picked, axis=2),
                               lambda: scores)
    else:
        group_scores = tf.gather(scores, picked, axis=2)
    group_boxes = boxes if boxes.shape[2] == 1 else tf.gather(boxes, picked, axis=2)
    return group_boxes, group_scores, picked


def _broadcast_thresholds(min_score_thresh, num_classes: int) -> tf.Tensor:
    t = tf.reshape(tf.cast(min_score_thresh, tf.float32), [-1])
    return tf.broadcast_to(t, [num_classes]) if t.shape[0] == 1 else t


def _compact(boxes, scores, classes, valid, max_total):
    """The valid rows first, by descending score, padded to `max_total` rows, and their count."""
    rows = tf.shape(scores)[1]
    pad = tf.maximum(max_total - rows, 0)
    boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
    scores = tf.pad(scores, [[0, 0], [0, pad]])
    classes = tf.pad(classes, [[0, 0], [0, pad]] + [[0, 0]] * (classes.shape.rank - 2))
    valid = tf.pad(valid, [[0, 0], [0, pad]])
    top, idx = tf.math.top_k(tf.where(valid, scores, -np.inf), k=max_total, sorted=True)
    num = tf.minimum(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1), max_total)
    return (tf.gather(boxes, idx, batch_dims=1), tf.maximum(top, 0.0),
            tf.gather(classes, idx, batch_dims=1), num)


def _soft_nms_group(boxes, scores, picked, *, column_iou, column_sigma, per_class, max_total,
                    threshold, clip_boxes, min_score_thresh, num_classes):
    """One `NonMaxSuppressionV5` per image and column of `picked` (soft-NMS, or hard NMS with
    sigma 0), each column with its own IoU threshold and sigma.

    Args:
      boxes: float32 `[B, N, 1 or G, 4]`; scores: float32 `[B, N, G]`; picked: int32 `[G]` the
        class column of each score column; column_iou, column_sigma: float32 `[K]`.

    Returns:
      `(boxes [B, M, 4], scores [B, M], columns [B, M], num [B])`, valid rows first by score.
    """
    batch = tf.shape(scores)[0]
    n = tf.shape(scores)[1]
    g = tf.shape(scores)[2]
    flat_scores = tf.reshape(tf.transpose(scores, [0, 2, 1]), [-1, n])  # [B*G, N]
    if boxes.shape[2] == 1:
        flat_boxes = tf.repeat(boxes[:, :, 0, :], g, axis=0)  # image b's boxes G times
    else:
        flat_boxes = tf.reshape(tf.transpose(boxes, [0, 2, 1, 3]), [-1, n, 4])
    cap = per_class
    flat_columns = tf.tile(picked, [batch])  # row b * G + g is column picked[g] of image b
    flat_iou = tf.gather(tf.constant(column_iou), flat_columns)
    flat_sigma = tf.gather(tf.constant(column_sigma), flat_columns)

    def one(args):
        b, sc, iou, sigma = args
        idx, sel, count = tf.raw_ops.NonMaxSuppressionV5(
            boxes=b, scores=sc, max_output_size=cap, iou_threshold=iou,
            score_threshold=threshold, soft_nms_sigma=sigma, pad_to_max_output_size=True)
        # A zero box after the last one keeps the padding index 0 valid with no boxes at all.
        padded = tf.concat([b, tf.zeros([1, 4], b.dtype)], 0)
        return tf.gather(padded, idx), sel, count

    sel_boxes, sel_scores, counts = tf.map_fn(
        one, (flat_boxes, flat_scores, flat_iou, flat_sigma),
        fn_output_signature=(tf.TensorSpec([cap, 4], tf.float32),
                             tf.TensorSpec([cap], tf.float32), tf.TensorSpec([], tf.int32)))
    rows = tf.shape(sel_scores)[1]
    valid = tf.range(rows)[None, :] < counts[:, None]  # [B*G, cap]
    columns = tf.broadcast_to(flat_columns[:, None], tf.shape(valid))
    if min_score_thresh is not None:
        thresh = _broadcast_thresholds(min_score_thresh, num_classes)
        valid &= sel_scores >= tf.gather(thresh, columns)
    # [B*G, cap] -> [B, G*cap]
    sel_boxes = tf.reshape(sel_boxes, [batch, -1, 4])
    sel_scores = tf.reshape(sel_scores, [batch, -1])
    columns = tf.reshape(tf.cast(columns, tf.float32), [batch, -1])
    valid = tf.reshape(valid, [batch, -1])
    out_boxes, out_scores, out_columns, num = _compact(sel_boxes, sel_scores, columns, valid,
                                                       max_total)
    if clip_boxes:
        out_boxes = tf.clip_by_value(out_boxes, 0.0, 1.0)
    return out_boxes, out_scores, tf.cast(out_columns, tf.int32), num


def _merge_groups(per_group, max_total):
    """Merges per-group NMS results: the best `max_total` valid rows of all groups, by score."""
    boxes = tf.concat([g[0] for g in per_group], axis=1)
    scores = tf.concat([g[1] for g in per_group], axis=1)
    classes = tf.concat([g[2] for g in per_group], axis=1)
    valid = tf.concat([tf.range(max_total)[None, :] < g[3][:, None] for g in per_group], axis=1)
    ranked = tf.where(valid, scores, -np.inf)
    top_scores, idx = tf.math.top_k(ranked, k=max_total, sorted=True)
    num = tf.minimum(tf.add_n([g[3] for g in per_group]), max_total)
    return (tf.gather(boxes, idx, batch_dims=1), tf.maximum(top_scores, 0.0),
            tf.gather(classes, idx, batch_dims=1), num)


# ----------------------------------------------------------------------------- candidate pre-filter


def select_candidate_boxes(boxes, raw_scores, lower_bounds, *, background_column: bool = True,
                           return_indices: bool = False):
    """Keeps only the boxes whose best class score reaches the lowest class bound.

    Every box that can pass some class threshold has a class column at or above that class's
    bound, hence a best class score at or above the lowest bound: the kept boxes are a superset
    of those that can pass (one max over the class axis per box is cheaper than a per-class
    comparison of the whole score tensor). The result has `num_candidates = max over images of
    the kept-box count` boxes per image (at least 1): each image's kept boxes first, in their
    original order (so NMS tie-breaking by box index is unchanged), then filler boxes that pass
    nothing. With bounds from `tfcal.calibration.CalibrationMethod.raw_lower_bounds`, running
    calibration, thresholds and NMS on the result gives the same detections as on the full input.

    Args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, K, 4]`.
      raw_scores: float `[batch, num_boxes, C]`.
      lower_bounds: float32 `[K]` bounds for the class columns.
      background_column: raw column 0 is background (never a reason to keep a box).

    Returns:
      `(boxes, raw_scores)` with `num_boxes` replaced by `num_candidates` (and, with
      `return_indices`, the int32 `[batch, num_candidates]` input index of each kept box).
    """
    raw = tf.cast(raw_scores, tf.float32)
    floor = tf.reduce_min(tf.cast(lower_bounds, tf.float32))
    class_scores = raw[:, :, 1:] if background_column else raw
    passing = tf.reduce_max(class_scores, axis=-1) >= floor  # [B, N]
    return select_passing_boxes(tf.convert_to_tensor(boxes), raw, passing,
                                return_indices=return_indices)


def select_passing_boxes(boxes, scores, passing, *, return_indices: bool = False):
    """Keeps the boxes flagged in `passing`, in their original order, padded to one count.

    Args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, K, 4]`.
      scores: float `[batch, num_boxes, C]`.
      passing: bool `[batch, num_boxes]`.

    Returns:
      `(boxes, scores)` with `num_boxes` replaced by `max over images of the passing count`
      (at least 1): each image's passing boxes first, in ascending index order (so NMS
      tie-breaking by box index is unchanged), then non-passing filler boxes. The inputs
      themselves when every box of some image passes. With `return_indices`, also int32
      `[batch, num_candidates]`: the input index of each kept box.
    """
    count = tf.reduce_max(tf.reduce_sum(tf.cast(passing, tf.int32), axis=1))
    num_boxes = tf.shape(scores)[1]
    num_candidates = tf.minimum(tf.maximum(count, 1), num_boxes)

    def select():
        # top_k breaks ties by lower index: passing boxes come first, in ascending index order.
        _, idx = tf.math.top_k(tf.cast(passing, tf.float32), k=num_candidates, sorted=True)
        out = (tf.gather(boxes, idx, batch_dims=1), tf.gather(scores, idx, batch_dims=1))
        return out + (idx,) if return_indices else out

    def keep_all():
        if not return_indices:
            return boxes, scores
        return boxes, scores, tf.broadcast_to(tf.range(num_boxes)[None, :], tf.shape(scores)[:2])

    # Nothing to drop (e.g. thresholds near 0): skip the sort and the copies.
    return tf.cond(num_candidates < num_boxes, select, keep_all)
