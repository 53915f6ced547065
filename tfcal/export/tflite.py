"""On-device export: the tuned post-processing as a builtin-ops TFLite model, verified on LiteRT.

What runs on device is the `postprocess_only` signature's computation for one image (batch 1):
raw boxes float32 `[1, N, 4]` and raw scores float32 `[1, N, C]` in, the OD API's
`detection_boxes` `[1, M, 4]`, `detection_scores` `[1, M]`, `detection_classes` `[1, M]` (class
ids) and `num_detections` `[1]` out, `M = max_total_detections`. The graph uses TFLite builtin
ops only (`TFLITE_BUILTINS`), so it runs on the LiteRT runtime alone (`ai-edge-litert`, no
TensorFlow), on Android, iOS and in Python.

How it is built (every number is a constant of the graph; no loops, no `tf.map_fn`):

- Calibration is the method's own TF map (`tfcal.calibration`, the code the SavedModel runs),
  except isotonic's `searchsorted`, which is not a builtin: the knot interval is found by
  counting the knots <= u (a comparison and a sum), then the same interpolation arithmetic.
- Keep decisions are TF's, exactly. Transcendental kernels (log, exp, logistic) in LiteRT and
  in TF's CPU kernels differ by a few float32 ulps, so a calibrated score within those ulps of
  its class threshold could be kept by one and dropped by the other. For calibrations that map
  each raw column on its own (all but softmax temperature scaling), the export therefore asks
  the TF reference itself, by bisection over float32 values, for each class's least raw score
  that it keeps (`raw_keep_bounds`), and the device compares raw scores with those constants:
  an exact comparison. Softmax temperature scaling mixes columns; it thresholds the calibrated
  scores (a score within a few ulps of a threshold may then flip).
- Only candidate boxes (a raw score >= the lowest keep bound, by one max pool per box) are
  calibrated, in their original order (NMS ties break by index as in TF).
- One `NonMaxSuppressionV5` per enabled class, unrolled in Python, each with its class's IoU
  and soft-NMS sigma and a cap of `max_detections_per_class`; zero-area boxes bypass the op
  (`_nms`: LiteRT's kernel selects them repeatedly); the per-class selections are
  concatenated, clipped to the window (when set), and merged by `top_k`. `class_agnostic` runs
  one NMS over every box's best class.
- Class ids by `gather` from a constant table.

Variants: `build_yolo_postprocess_fn` takes a YOLO detector's own output tensor and the image
size (the adapter's decode and letterbox inverse on device); `build_fused_fn` puts a
SavedModel/Keras detector and the post-processing in one file where the detector converts.
`export_tflite` writes and verifies the files; `export_tflite_handoff` is what `tfcal export
--format tflite` and `tfcal tune` (with `export.tflite`) call.

Exactness against the TF `postprocess_only` path (the `PostProcessor` layer), what the export's
verification checks with `compare_detections`: the same detections (count, class ids, boxes
bit-exact); scores within `SCORE_ATOL`; rows with scores within `SCORE_ATOL` of each other may
come in either order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfcal import TfcalError, atomic, calibration, ops
from tfcal.detectors import open_described
from tfcal.detectors import yolo as yolo_adapter
from tfcal.layers import PostProcessor
from tfcal.export.saved_model import config_sha256
from tfcal.postprocess import PostProcessConfig

__all__ = [
    "BOX_ATOL_FRAME",
    "DETECTION_KEYS",
    "SCORE_ATOL",
    "LiteRunner",
    "TFLiteExport",
    "TFLiteVerification",
    "TFLiteVerificationError",
    "TFLiteVerifyInputs",
    "build_fused_fn",
    "build_postprocess_fn",
    "build_yolo_postprocess_fn",
    "compare_detections",
    "convert",
    "YoloVariant",
    "export_tflite",
    "export_tflite_handoff",
    "RawKeepBounds",
    "raw_keep_bounds",
    "reference_postprocessor",
    "verify_tflite",
]

DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")

SCORE_ATOL = 1e-6
"""Largest |LiteRT score - TF score| the verification accepts. Measured on 100k uniform values in
(0, 1) with TF 2.21 and ai-edge-litert 2.3: LiteRT's LOG differs from TF's by up to 9.5e-7 in
absolute value (one ulp of values near -13), EXP and LOGISTIC by up to 1.2e-7 (one ulp at 1);
a calibrated probability chains at most one log (or log1p) pair, a scale and one logistic, and
came out within 1.2e-7 of TF's on every seeded input. 1e-6 is about 8 ulps at 1.0: room for a
device's own libm, and still far below any threshold or score step that matters."""

BOX_ATOL_FRAME = 2.5e-7
"""Largest |LiteRT - TF| box coordinate accepted with `change_coordinate_frame`: the converter
folds the division by the window's constant size into a multiplication by its reciprocal, one
more rounding (measured: at most 6e-8, one ulp of coordinates in [0.5, 1)). Boxes are bit-exact
otherwise: they are gathered from the input and clipped, no arithmetic."""

_INPUT_BOXES = "raw_detection_boxes"
_INPUT_SCORES = "raw_detection_scores"
_PROBE_PADDING = 64
_REJECT = -1.0  # score of a (box, class) that is not kept: below every NMS score threshold


class TFLiteVerificationError(RuntimeError):
    """The TFLite model's detections differ from the TF post-processing's."""


# ----------------------------------------------------------------------------- reference


def reference_postprocessor(config: PostProcessConfig):
    """The TF reference: the `PostProcessor` layer the SavedModel's `postprocess_only` runs."""

    return PostProcessor.from_postprocess_config(config)


def _float32_key(x: np.ndarray) -> np.ndarray:
    """Monotone int64 keys of float32 values (-0.0 and 0.0 share a key)."""
    i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _float32_of_key(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.int64)
    i = np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32)
    return i.view(np.float32)


def _tf_keeps(postprocessor, config: PostProcessConfig, x: np.ndarray) -> np.ndarray:
    """Whether the TF reference keeps raw score `x[j, k]` of class column k (bool `[J, K]`),
    every other column held at 0 (the decision of an element-wise calibration depends on its
    own column only)."""
    x = np.asarray(x, np.float32)
    if config.background_column:
        x = np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)
    # TF's CPU kernels compute the last few elements of a tensor on a scalar path whose
    # transcendentals differ from the vectorized path's by an ulp or so; the probes sit in
    # front of padding rows, on the vectorized path, as nearly all of a detector's scores do.
    x = np.concatenate([x, np.zeros((_PROBE_PADDING, x.shape[1]), np.float32)])
    scores = postprocessor.class_thresholds(postprocessor.score_calibration(
        tf.constant(x[None])))
    return scores.numpy()[0, :-_PROBE_PADDING] > 0.0


@dataclasses.dataclass(frozen=True)
class RawKeepBounds:
    """The TF reference's keep decision of each class column as a raw-score comparison.

    Attributes:
      bound: float32 `[K]`; raw score `r` of column k is kept iff `r >= bound[k]` (increasing)
        or `r <= bound[k]` (decreasing, e.g. Platt `a < 0`). `+inf`: never kept (a disabled
        class); `-inf`: always kept.
      increasing: bool `[K]`.
      band: int `[K]`, the number of float32 raw values next to the bound where TF's own
        decision is not monotone (rounding in its float32 transcendentals): the values from the
        least kept to the greatest dropped one. 0 for an exact threshold. Raw scores in the band
        may be decided differently on the device (a band of b values is about b * 6e-8 wide
        for raw probabilities near 0.5).
    """

    bound: np.ndarray
    increasing: np.ndarray
    band: np.ndarray


def raw_keep_bounds(config: PostProcessConfig, postprocessor=None) -> RawKeepBounds | None:
    """The TF reference's keep decisions as exact raw-score comparisons (see `RawKeepBounds`).

    For a calibration that maps each raw column on its own (every method and converter except
    softmax temperature scaling), the bounds are found by bisection over the float32 values of
    the raw score range ([0, 1], or all finite floats for `identity`) with the TF reference
    itself deciding, then the 4096 float32 values either side of each bound are checked to
    measure the non-monotone `band`.

    Args:
      config: the tuned post-processing.
      postprocessor: the TF reference (`reference_postprocessor(config)` when None).

    Returns:
      A `RawKeepBounds`, or None for softmax temperature scaling (columns mix) and for a
      calibration that reads the box (`box_platt`: no raw bound holds for every box).
    """
    if config.score_converter == "softmax" and config.calibration == "temperature":
        return None
    if calibration.get(config.calibration).uses_boxes:
        return None  # the keep decision depends on the box too: the device thresholds p itself
    pp = reference_postprocessor(config) if postprocessor is None else postprocessor
    k = config.num_classes
    if config.score_converter == "identity":
        lo_v, hi_v = -np.finfo(np.float32).max, np.finfo(np.float32).max
    else:
        lo_v, hi_v = 0.0, 1.0
    ends = _tf_keeps(pp, config, np.array([[lo_v] * k, [hi_v] * k], np.float32))
    keep_lo, keep_hi = ends[0], ends[1]
    increasing = ~keep_lo | keep_hi  # constant maps count as increasing
    bound = np.where(keep_lo & keep_hi, -np.inf, np.inf).astype(np.float32)
    search = keep_lo != keep_hi
    key_lo, key_hi = _float32_key(np.float32(lo_v)), _float32_key(np.float32(hi_v))
    lo = np.full(k, key_lo, np.int64)
    hi = np.full(k, key_hi, np.int64)
    # Invariant (increasing): lo is not kept, hi is kept; decreasing: lo kept, hi not.
    while np.any(search & (hi - lo > 1)):
        mid = (lo + hi) // 2
        kept = _tf_keeps(pp, config, _float32_of_key(mid)[None, :])[0]
        on_hi_side = kept == increasing
        hi = np.where(search & on_hi_side, mid, hi)
        lo = np.where(search & ~on_hi_side, mid, lo)
    edge = np.where(increasing, hi, lo)  # a kept value next to a dropped one
    band = np.zeros(k, np.int64)
    if np.any(search):
        offsets = np.arange(-4096, 4097, dtype=np.int64)
        keys = np.clip(edge[None, :] + offsets[:, None], key_lo, key_hi)
        got = _tf_keeps(pp, config, _float32_of_key(keys))
        # Increasing: the bound is the value after the greatest dropped one (so every value above
        # it is kept); decreasing: the value before the least dropped one.
        for j in np.flatnonzero(search):
            dropped = np.flatnonzero(~got[:, j])
            kept = np.flatnonzero(got[:, j])
            if increasing[j]:
                last_drop = dropped.max() if dropped.size else -1
                first_keep = kept.min()
                edge[j] = keys[last_drop + 1, j]
                band[j] = max(0, last_drop - first_keep + 1)
            else:
                first_drop = dropped.min() if dropped.size else len(keys)
                last_keep = kept.max()
                edge[j] = keys[first_drop - 1, j]
                band[j] = max(0, last_keep - first_drop + 1)
    bound = np.where(search, _float32_of_key(edge), bound).astype(np.float32)
    return RawKeepBounds(bound, increasing, band)


# ----------------------------------------------------------------------------- graph


def _calibrate(config: PostProcessConfig, raw: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """Raw scores float32 `[N, C]` (of boxes `[N, 4]`) to calibrated probabilities `[N, K]`
    with builtin ops."""
    method = calibration.get(config.calibration)
    weights = {name: tf.constant(v) for name, v in method.weights(config.calibration_params)
               .items()}
    if method.name != "isotonic":
        extra = {"boxes": boxes} if method.uses_boxes else {}
        return method.calibrate_tf(raw, weights, score_converter=config.score_converter,
                                   background_column=config.background_column, **extra)
    cls = raw[:, 1:] if config.background_column else raw
    u = tf.sigmoid(cls) if config.score_converter == "identity" else cls
    return _piecewise_linear(u, weights["knots_x"], weights["knots_y"])


def _piecewise_linear(u: tf.Tensor, xs: tf.Tensor, ys: tf.Tensor) -> tf.Tensor:
    """`tfcal.ops.piecewise_linear` for `[N, K]` values without `searchsorted` (not a TFLite
    builtin): the number of knots <= u is a comparison summed over the knot axis; the
    interpolation is the same arithmetic, so the values are bit-identical."""
    m = int(xs.shape[1])
    idx = tf.reduce_sum(tf.cast(u[:, :, None] >= xs[None, :, :], tf.int32), axis=-1)  # [N, K]
    lo = tf.clip_by_value(idx - 1, 0, m - 2)
    flat = tf.reshape(xs, [-1])
    flat_y = tf.reshape(ys, [-1])
    base = tf.range(int(xs.shape[0]), dtype=tf.int32)[None, :] * m  # row k starts at k * m
    x0 = tf.gather(flat, base + lo)
    x1 = tf.gather(flat, base + lo + 1)
    y0 = tf.gather(flat_y, base + lo)
    y1 = tf.gather(flat_y, base + lo + 1)
    t = tf.clip_by_value((u - x0) / (x1 - x0), 0.0, 1.0)
    return y0 + t * (y1 - y0)


def _kept_scores(config: PostProcessConfig, boxes: tf.Tensor, raw: tf.Tensor, bounds
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """The candidate boxes `[P, 4]` and their calibrated scores `[P, K]` where kept (as the TF
    reference decides), `_REJECT` elsewhere.

    With raw keep bounds, the boxes that no class keeps are dropped before calibration (in
    their original order, so NMS breaks score ties by the same index order): calibration, the
    costly part for a detector's thousands of boxes, runs on the candidates only. Without
    bounds (softmax temperature scaling), `P = N`.
    """
    enabled = np.asarray(config.enabled(), bool)
    if bounds is None:
        scores = _calibrate(config, raw, boxes)
        keep = (scores >= tf.constant(np.asarray(config.thresholds(), np.float32))) & \
            (scores > 0.0) & tf.constant(enabled)
        return boxes, tf.where(keep, scores, _REJECT)
    # A SPLIT, not a slice, ahead of the max pool (see `build_postprocess_fn`).
    cls = tf.split(raw, [1, config.num_classes], axis=1)[1] if config.background_column else raw
    floor = _candidate_floor(config, bounds)
    if floor is not None:
        # A box some class keeps has a raw score >= the lowest live bound: one max per box
        # (cheap) picks a superset of the candidates, and the exact per-class test runs on those.
        index = tf.reshape(tf.where(_row_max(cls) >= floor), [-1])
        boxes, raw = _with_filler(tf.gather(boxes, index), tf.gather(raw, index))
        cls = raw[:, 1:] if config.background_column else raw
        keep = (cls >= tf.constant(bounds.bound)) & tf.constant(enabled)
        return boxes, tf.where(keep, _calibrate(config, raw, boxes), _REJECT)
    keep = tf.where(tf.constant(bounds.increasing), cls >= tf.constant(bounds.bound),
                    cls <= tf.constant(bounds.bound))
    keep &= tf.constant(enabled)
    index = tf.reshape(tf.where(tf.reduce_any(keep, axis=1)), [-1])
    boxes, raw = _with_filler(tf.gather(boxes, index), tf.gather(raw, index))
    keep = tf.concat([tf.gather(keep, index), tf.zeros([1, config.num_classes], tf.bool)], 0)
    return boxes, tf.where(keep, _calibrate(config, raw, boxes), _REJECT)


def _with_filler(boxes, raw):
    """Appends one filler box (zeros) with NaN raw scores, which no comparison keeps: LiteRT's
    XNNPACK delegate fails to resize its ops for an empty candidate set ("failed to reshape
    runtime"), so the set is never empty; a row after the others changes no NMS tie-break."""
    boxes = tf.concat([boxes, tf.zeros([1, 4])], 0)
    raw = tf.concat([raw, tf.fill([1, int(raw.shape[1])], np.float32(np.nan))], 0)
    return boxes, raw


def _row_max(x: tf.Tensor) -> tf.Tensor:
    """`tf.reduce_max(x, axis=1)` of `[N, K]` as a `[1, K]` max pool: LiteRT runs REDUCE_MAX
    over a detector's [8400, 80] scores in ~10 ms, MAX_POOL_2D (XNNPACK) in ~1 ms (measured with
    ai-edge-litert 2.3 on this benchmark's machine); a max is exact either way."""
    k = int(x.shape[1])
    image = tf.reshape(x, [1, -1, k, 1])
    pooled = tf.nn.max_pool2d(image, ksize=[1, k], strides=[1, k], padding="VALID")
    return tf.reshape(pooled, [-1])


def _candidate_floor(config: PostProcessConfig, bounds) -> float | None:
    """The lowest raw score any class keeps, when every live class keeps raw scores above a
    bound (else None: no single floor)."""
    if bounds is None:
        return None
    live = np.asarray(config.enabled(), bool) & (bounds.bound < np.inf)
    if not np.all(bounds.increasing[live]):
        return None
    return float(np.min(bounds.bound[live])) if np.any(live) else np.inf


def _nms(boxes, scores, zero_area, *, cap: int, iou: float, sigma: float):
    """One class's NMS, as TF's `NonMaxSuppressionV5` selects: `(boxes [cap, 4], scores [cap],
    valid [cap], index [cap])`, valid rows first by descending score.

    TF gives a zero-area box IoU 0 with every box: it is selected whenever its score ranks
    within the cap, and suppresses (or decays) nothing. LiteRT 2.3's kernel re-queues a selected
    box and relies on its IoU with itself (1) to drop it the second time, so it selects a
    zero-area box again and again. Zero-area boxes therefore bypass the op here: the op runs on
    the others, the zero-area candidates are ranked by `top_k`, and the two lists are merged by
    score and cut at `cap` (equal to TF's greedy order, since the two never interact).

    Args:
      boxes: float32 `[P, 4]`; scores: float32 `[P]` (`_REJECT` where not kept);
      zero_area: bool `[P]`, `(ymax - ymin) * (xmax - xmin) == 0` (TF's test, same arithmetic).
    """
    idx, sel, count = tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes, scores=tf.where(zero_area, _REJECT, scores), max_output_size=cap,
        iou_threshold=float(iou), score_threshold=_REJECT / 2, soft_nms_sigma=float(sigma),
        pad_to_max_output_size=True)
    valid = tf.range(cap) < count
    # `cap` rejected rows after the last keep top_k defined and index 0 in range when P < cap.
    padded_boxes = tf.concat([boxes, tf.zeros([cap, 4])], 0)
    flat = tf.concat([tf.where(zero_area, scores, _REJECT), tf.fill([cap], _REJECT)], 0)
    zero_scores, zero_idx = tf.math.top_k(flat, k=cap)
    zero_valid = zero_scores > _REJECT / 2
    all_scores = tf.concat([tf.where(valid, sel, -np.inf), tf.where(zero_valid, zero_scores,
                                                                   -np.inf)], 0)
    all_idx = tf.concat([idx, zero_idx], 0)
    top, pick = tf.math.top_k(all_scores, k=cap)
    index = tf.gather(all_idx, pick)
    valid = top > -np.inf
    return tf.gather(padded_boxes, index), tf.where(valid, top, 0.0), valid, index


def build_postprocess_fn(config: PostProcessConfig, num_boxes: int, *, bounds="auto",
                         postprocessor=None) -> Callable[..., dict[str, tf.Tensor]]:
    """The on-device post-processing as a `tf.function` of builtin TFLite ops, batch 1.

    Args:
      config: the tuned post-processing.
      num_boxes: N, the detector's box count (static: TFLite wants static shapes).
      bounds: "auto" (`raw_keep_bounds` from the TF reference), None (threshold calibrated
        scores), or a `raw_keep_bounds` result.
      postprocessor: the TF reference for the bounds (built from `config` when None).

    Returns:
      A `tf.function` with the input signature `raw_detection_boxes` float32 `[1, N, 4]`,
      `raw_detection_scores` float32 `[1, N, C]`, returning the `DETECTION_KEYS` dict
      (`[1, M, 4]`, `[1, M]`, `[1, M]`, `[1]`, `M = max_total_detections`), rows by descending
      score, padding rows all zero.
    """
    n = int(num_boxes)
    if n < 1:
        raise ValueError(f"num_boxes: expected an int >= 1, got {num_boxes!r}")
    if isinstance(bounds, str):
        if bounds != "auto":
            raise ValueError(f"bounds: expected 'auto', None or raw_keep_bounds(...), got "
                             f"{bounds!r}")
        bounds = raw_keep_bounds(config, postprocessor)
    columns = config.num_classes + int(config.background_column)
    signature = [tf.TensorSpec([1, n, 4], tf.float32, name=_INPUT_BOXES),
                 tf.TensorSpec([1, n, columns], tf.float32, name=_INPUT_SCORES)]

    @tf.function(input_signature=signature)
    def postprocess(raw_detection_boxes, raw_detection_scores):
        # Reshapes, not `[0]` slices: after a STRIDED_SLICE LiteRT ran the candidate max pool
        # outside the XNNPACK delegate (8.5 ms instead of 1.0 ms on [8400, 80] scores).
        return _detections(config, tf.reshape(raw_detection_boxes, [n, 4]),
                           tf.reshape(raw_detection_scores, [n, columns]), bounds)

    return postprocess


def build_yolo_postprocess_fn(config: PostProcessConfig, keys: Mapping[str, Any],
                              input_size: Sequence[int], raw_shape: Sequence[int], *,
                              bounds="auto", postprocessor=None
                              ) -> Callable[..., dict[str, tf.Tensor]]:
    """The on-device post-processing of a YOLO detector's own output tensor, batch 1.

    Runs the YOLO adapter's TF decode (`tfcal.detectors.yolo.decode`: layout, box units, the
    letterbox inverse to the original image, clipping), then the post-processing of
    `build_postprocess_fn`, so a client feeds the detector's output and the image size and
    writes no decode code.

    Args:
      config: the tuned post-processing (`background_column` False: YOLO has none).
      keys: the adapter's layout keys (`tfcal.detectors.yolo.resolve_layout`).
      input_size: the network input `[h1, w1]`.
      raw_shape: the detector's output shape, `[1, 4 + K, N]` (`boxes_first`), `[1, N, 4 + K]`
        or `[1, N, 5 + K]`.
      bounds, postprocessor: as for `build_postprocess_fn`.

    Returns:
      A `tf.function` of `yolo_output` float32 `raw_shape` and `image_size` float32 `[2]`
      (original height, width in pixels), returning the `DETECTION_KEYS` dict.
    """

    shape = [int(v) for v in raw_shape]
    if len(shape) != 3 or shape[0] != 1:
        raise ValueError(f"raw_shape: expected [1, rows, columns], got {list(raw_shape)}")
    k, n = yolo_adapter.num_classes_of(shape, keys["layout"])
    if k != config.num_classes or config.background_column:
        raise ValueError(f"raw_shape: {shape} in layout {keys['layout']} has {k} classes; the "
                         f"config has {config.num_classes} (background_column "
                         f"{config.background_column})")
    if isinstance(bounds, str):
        bounds = raw_keep_bounds(config, postprocessor)
    signature = [tf.TensorSpec(shape, tf.float32, name="yolo_output"),
                 tf.TensorSpec([2], tf.float32, name="image_size")]

    floor = _candidate_floor(config, bounds)
    prefilter = floor is not None and np.isfinite(floor) and keys["layout"] != "objectness"

    @tf.function(input_signature=signature)
    def postprocess(yolo_output, image_size):
        raw = yolo_output
        if prefilter:
            # Only anchors with a class score >= the lowest keep bound can be detections:
            # decode those (in index order; the decode is per anchor, so the same values).
            if keys["layout"] == "boxes_first":
                # A SPLIT, not a slice (see `build_postprocess_fn`).
                scores = tf.reshape(tf.split(raw, [4, k], axis=1)[1], [1, k, n, 1])
                best = tf.reshape(tf.nn.max_pool2d(scores, ksize=[k, 1], strides=[k, 1],
                                                   padding="VALID"), [-1])
            else:
                best = _row_max(tf.reshape(tf.split(raw, [4, k], axis=2)[1], [n, k]))
            index = tf.reshape(tf.where(best >= floor), [-1])
            # One filler anchor (zero box, NaN scores: never kept) after the last keeps the
            # candidate set non-empty (see `_with_filler`).
            index = tf.concat([index, tf.constant([n], tf.int64)], 0)
            if keys["layout"] == "boxes_first":
                filler = tf.concat([tf.zeros([1, 4, 1]), tf.fill([1, k, 1], np.float32(np.nan))],
                                   1)
                raw = tf.gather(tf.concat([raw, filler], 2), index, axis=2)
            else:
                filler = tf.concat([tf.zeros([1, 1, 4]), tf.fill([1, 1, k], np.float32(np.nan))],
                                   2)
                raw = tf.gather(tf.concat([raw, filler], 1), index, axis=1)
        boxes, scores = yolo_adapter.decode(raw, (image_size[0], image_size[1]), keys, input_size)
        return _detections(config, boxes[0], scores[0], bounds, num_boxes=n)

    return postprocess


def build_fused_fn(config: PostProcessConfig, serving_graph, input_size: Sequence[int], *,
                   bounds="auto", postprocessor=None) -> Callable[..., dict[str, tf.Tensor]]:
    """The detector and the on-device post-processing in one function, for one converted file.

    For SavedModel and Keras detectors whose graph converts to builtin ops (`convert` raises
    otherwise, naming the ops): the adapter's `ServingGraph.raw_fn` (its preprocessing, the
    network and its decoding), then the post-processing of `build_postprocess_fn`. The result
    is not bit-exact against TF: the network's own arithmetic (convolutions, resizes) rounds
    differently in LiteRT, so compare with tolerances (`compare_detections`' `score_atol` and
    `box_atol`), and scores near a threshold may flip.

    Args:
      config: the tuned post-processing.
      serving_graph: the detector's `tfcal.detectors.base.ServingGraph` with an image input
        (`image_tensor`: `[1, H, W, 3]` uint8 or float32).
      input_size: `[H, W]`, the fixed image size of the converted model (TFLite wants static
        shapes; the detector's own resize still runs inside).
      bounds, postprocessor: as for `build_postprocess_fn`.

    Returns:
      A `tf.function` of `input_tensor` `[1, H, W, 3]` returning the `DETECTION_KEYS` dict.
    """
    info = serving_graph.info
    if info.input_type != "image_tensor":
        raise ValueError(f"serving_graph: needs an image_tensor input, got {info.input_type!r}")
    shape = info.raw_boxes_shape
    if len(shape) != 3 or shape[1] is None:
        raise ValueError(f"serving_graph: needs shared raw boxes [1, N, 4] with a static N, got "
                         f"{list(shape)}")
    if isinstance(bounds, str):
        bounds = raw_keep_bounds(config, postprocessor)
    h, w = (int(v) for v in input_size)
    dtype = tf.as_dtype(info.input_dtype)

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, 3], dtype, name="input_tensor")])
    def detect(input_tensor):
        boxes, scores = serving_graph.raw_fn(input_tensor)
        return _detections(config, boxes[0], scores[0], bounds, num_boxes=int(shape[1]))

    return detect


def _detections(config: PostProcessConfig, boxes, raw, bounds, num_boxes: int | None = None
                ) -> dict[str, tf.Tensor]:
    """The graph for one image: boxes `[N, 4]`, raw scores `[N, C]` (N may be dynamic when
    `num_boxes`, its upper bound, is given)."""
    k, m = config.num_classes, config.max_total_detections
    n = int(boxes.shape[0]) if num_boxes is None else int(num_boxes)
    boxes, scores = _kept_scores(config, boxes, raw, bounds)
    # A rejected filler row after the last: LiteRT's UNPACK refuses an empty tensor (no box
    # kept), and a row after the others changes no NMS tie-break.
    boxes = tf.concat([boxes, tf.zeros([1, 4])], 0)
    scores = tf.concat([scores, tf.fill([1, k], _REJECT)], 0)
    zero_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) == 0.0
    ious = config.ious()
    sigmas = config.soft_nms_sigma * k if len(config.soft_nms_sigma) == 1 else \
        config.soft_nms_sigma
    thresholds = np.asarray(config.thresholds(), np.float32)
    window = np.asarray(config.clip_window, np.float32) if config.clip_window else None
    sel_boxes, sel_scores, sel_columns, sel_valid = [], [], [], []
    if config.class_agnostic:
        # Each box competes once with its best class (the first on ties, as tf.argmax).
        best = tf.argmax(scores, axis=-1, output_type=tf.int32)
        cap = n if window is not None else min(n, m)
        b, s, valid, idx = _nms(boxes, tf.reduce_max(scores, axis=-1), zero_area, cap=cap,
                                iou=ious[0], sigma=sigmas[0])
        columns = tf.gather(tf.concat([best, tf.zeros([cap], tf.int32)], 0), idx)
        if sigmas[0] > 0:
            valid &= s >= tf.gather(tf.constant(thresholds), columns)
        sel_boxes, sel_scores, sel_columns, sel_valid = [b], [s], [columns], [valid]
    else:
        per_class = config.max_detections_per_class  # None: no cap below the total
        cap = (min(n, per_class) if per_class is not None
               else (n if window is not None else min(n, m)))
        # One transpose and unstack, not a strided slice per column: cheaper, and LiteRT 2.3
        # returned wrong columns for strided slices of the YOLO decode's transposed output.
        by_column = tf.unstack(tf.transpose(scores), num=k, axis=0)
        for col in range(k):
            if not config.enabled()[col] or (bounds is not None and
                                             bounds.bound[col] == np.inf):
                continue  # never kept
            b, s, valid, _ = _nms(boxes, by_column[col], zero_area, cap=cap, iou=ious[col],
                                  sigma=sigmas[col])
            if sigmas[col] > 0:
                valid &= s >= thresholds[col]  # decayed scores are held to the threshold
            sel_boxes.append(b)
            sel_scores.append(s)
            sel_columns.append(tf.fill([cap], col))
            sel_valid.append(valid)
        if not sel_boxes:  # every class disabled: one empty selection keeps shapes defined
            sel_boxes = [tf.zeros([1, 4])]
            sel_scores = [tf.zeros([1])]
            sel_columns = [tf.zeros([1], tf.int32)]
            sel_valid = [tf.zeros([1], tf.bool)]
    out_boxes = tf.concat(sel_boxes, 0)
    out_scores = tf.concat(sel_scores, 0)
    out_columns = tf.concat(sel_columns, 0)
    valid = tf.concat(sel_valid, 0)
    if config.clip_boxes:
        out_boxes = tf.clip_by_value(out_boxes, 0.0, 1.0)
    if window is not None:
        out_boxes = ops.clip_to_window(out_boxes, tf.constant(window))
        valid &= (out_boxes[:, 2] - out_boxes[:, 0]) * (out_boxes[:, 3] - out_boxes[:, 1]) != 0.0
    rows = int(out_scores.shape[0])
    if rows < m:
        pad = m - rows
        out_boxes = tf.pad(out_boxes, [[0, pad], [0, 0]])
        out_scores = tf.pad(out_scores, [[0, pad]])
        out_columns = tf.pad(out_columns, [[0, pad]])
        valid = tf.pad(valid, [[0, pad]])
    top, idx = tf.math.top_k(tf.where(valid, out_scores, -np.inf), k=m)
    keep = top > -np.inf
    det_boxes = tf.where(keep[:, None], tf.gather(out_boxes, idx), 0.0)
    if window is not None and config.change_coordinate_frame:
        det_boxes = tf.where(keep[:, None], ops.change_box_frame(det_boxes, tf.constant(window)),
                             0.0)
    ids = np.asarray(config.emitted_class_ids(), np.float32)
    det_classes = tf.where(keep, tf.gather(tf.constant(ids), tf.gather(out_columns, idx)), 0.0)
    return {
        "detection_boxes": det_boxes[None],
        "detection_scores": tf.where(keep, top, 0.0)[None],
        "detection_classes": det_classes[None],
        "num_detections": tf.reduce_sum(tf.cast(keep, tf.float32))[None],
    }


def convert(fn) -> bytes:
    """Converts a `tf.function` with an input signature to a TFLite flatbuffer, builtin ops only.

    Raises:
      tf.errors / ConverterError: an op that has no builtin kernel (the message names it).
    """
    module = tf.Module()
    module.postprocess = fn
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                                module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


# ----------------------------------------------------------------------------- LiteRT


class LiteRunner:
    """Runs a TFLite model's only signature on the LiteRT runtime (`ai_edge_litert`).

    Args:
      model: the flatbuffer bytes or a `.tflite` path.
      num_threads: interpreter threads (default 1: one core, as a phone app would budget).
    """

    def __init__(self, model: bytes | str | Path, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

        if isinstance(model, (bytes, bytearray)):
            self.interpreter = Interpreter(model_content=bytes(model), num_threads=num_threads)
        else:
            self.interpreter = Interpreter(model_path=str(model), num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()

    @property
    def input_names(self) -> list[str]:
        return list(self.runner.get_input_details())

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.runner(**inputs).items()}


# ----------------------------------------------------------------------------- verification


def _rows(out: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(np.asarray(out["num_detections"]).reshape(-1)[0])
    return (np.asarray(out["detection_boxes"])[0, :n], np.asarray(out["detection_scores"])[0, :n],
            np.asarray(out["detection_classes"])[0, :n])


def compare_detections(want: Mapping[str, Any], got: Mapping[str, Any], *,
                       score_atol: float = SCORE_ATOL, box_atol: float = 0.0) -> list[str]:
    """Differences between two OD API outputs of one image (`[1, ...]`); empty when equal.

    Equal means: the same number of detections; the same (class id, box) pairs, boxes
    bit-exact; each pair's scores within `score_atol`; both sorted by descending score; padding
    rows all zero. Rows are matched by (class id, box) (one class never emits one box twice),
    so rows with near-equal scores may come in either order.
    """
    problems = []
    wb, ws, wc = _rows(want)
    gb, gs, gc = _rows(got)
    if len(ws) != len(gs):
        return [f"num_detections: TF {len(ws)}, TFLite {len(gs)}"]
    for name, out in (("TF", want), ("TFLite", got)):
        n = len(ws)
        scores = np.asarray(out["detection_scores"])[0]
        if np.any(np.diff(scores[:n]) > score_atol):
            problems.append(f"detection_scores: {name} rows are not sorted by descending score")
        pad = [np.asarray(out[k])[0, n:] for k in DETECTION_KEYS[:3]]
        if any(np.any(p != 0) for p in pad):
            problems.append(f"{name}: padding rows are not all zero")

    def order(b, c):
        return np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], c))

    wi, gi = order(wb, wc), order(gb, gc)
    if not np.array_equal(wc[wi], gc[gi]):
        problems.append(f"detection_classes: TF {sorted(wc.tolist())}, TFLite "
                        f"{sorted(gc.tolist())}")
    elif np.any(np.abs(wb[wi] - gb[gi]) > box_atol):
        bad = int(np.sum(np.any(np.abs(wb[wi] - gb[gi]) > box_atol, axis=1)))
        problems.append(f"detection_boxes: {bad} of {len(ws)} boxes differ (max "
                        f"{float(np.max(np.abs(wb[wi] - gb[gi]))):.3g})")
    else:
        diff = np.abs(ws[wi].astype(np.float64) - gs[gi])
        if diff.size and diff.max() > score_atol:
            problems.append(f"detection_scores: max |TF - TFLite| {diff.max():.3g} > "
                            f"{score_atol:g}")
    return problems


@dataclasses.dataclass(frozen=True)
class TFLiteVerification:
    """The LiteRT run against the TF post-processing on `inputs` images.

    Attributes:
      images: inputs compared; source: where they came from ('cached raw outputs' or 'seeded').
      detections: detections in the TF outputs, summed over images.
      max_score_diff: the largest |TF - LiteRT| score of matched detections.
      failures: one line per image that differs (empty: passed).
    """

    images: int
    source: str
    detections: int
    max_score_diff: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (f"TFLite on LiteRT vs TF postprocess_only: {self.images} images ({self.source}), "
                f"{self.detections} detections, max score difference {self.max_score_diff:.3g} "
                f"(tolerance {SCORE_ATOL:g})")
        if self.passed:
            return head + ": identical detections"
        return head + f": {len(self.failures)} differ\n  " + "\n  ".join(self.failures[:10])


def verify_tflite(model: bytes | str | Path, config: PostProcessConfig,
                  inputs: Iterable[tuple[np.ndarray, np.ndarray]], *, source: str = "seeded",
                  postprocessor=None, score_atol: float = SCORE_ATOL) -> TFLiteVerification:
    """Runs the model on LiteRT and the TF reference on each (boxes `[1, N, 4]`, raw scores
    `[1, N, C]`) pair and compares them (`compare_detections`)."""
    pp = reference_postprocessor(config) if postprocessor is None else postprocessor
    lite = LiteRunner(model)
    images = detections = 0
    max_diff = 0.0
    failures = []
    for i, (boxes, raw) in enumerate(inputs):
        boxes = np.asarray(boxes, np.float32)
        raw = np.asarray(raw, np.float32)
        want = {k: v.numpy() for k, v in pp(tf.constant(boxes), tf.constant(raw)).items()}
        got = lite(**{_INPUT_BOXES: boxes, _INPUT_SCORES: raw})
        images += 1
        detections += int(want["num_detections"][0])
        problems = compare_detections(want, got, score_atol=score_atol,
                                      box_atol=BOX_ATOL_FRAME if config.change_coordinate_frame
                                      else 0.0)
        if problems:
            failures.append(f"image {i}: " + "; ".join(problems))
        elif int(want["num_detections"][0]):
            ws, gs = np.sort(_rows(want)[1]), np.sort(_rows(got)[1])
            max_diff = max(max_diff, float(np.max(np.abs(ws.astype(np.float64) - gs))))
    return TFLiteVerification(images, source, detections, max_diff, tuple(failures))


def seeded_inputs(config: PostProcessConfig, num_boxes: int, count: int = 8, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded raw inputs: overlapping boxes in [0, 1] and scores in the converter's space,
    many near the class thresholds."""
    rng = np.random.default_rng(seed)
    columns = config.num_classes + int(config.background_column)
    out = []
    for _ in range(count):
        c = rng.uniform(0.1, 0.9, (num_boxes, 2))
        hw = rng.uniform(0.02, 0.4, (num_boxes, 2))
        boxes = np.concatenate([c - hw / 2, c + hw / 2], 1)[None].astype(np.float32)
        p = rng.beta(0.6, 2.0, (1, num_boxes, columns))
        if config.score_converter == "softmax":
            p = p / p.sum(-1, keepdims=True)
        raw = np.log(p) - np.log1p(-p) if config.score_converter == "identity" else p
        out.append((boxes, raw.astype(np.float32)))
    return out


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True, eq=False)
class TFLiteVerifyInputs:
    """Raw detector outputs to verify an export on, and where they came from.

    Attributes:
      pairs: (boxes `[1, N, 4]`, raw scores `[1, N, C]`) pairs, at least one.
      source: a word on where they came from, for the summary (e.g. "tune images' cached raw
        outputs").
    """

    pairs: Sequence[tuple[np.ndarray, np.ndarray]]
    source: str = "given"

    def __post_init__(self):
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs:
            raise ValueError("pairs: need at least one (boxes, raw scores) pair, got none")


@dataclasses.dataclass(frozen=True)
class YoloVariant:
    """What the YOLO raw-output variant needs: the adapter's layout keys, the network input
    size `[h1, w1]` and the detector's output shape `[1, rows, columns]`."""

    keys: Mapping[str, Any]
    input_size: tuple[int, int]
    raw_shape: tuple[int, int, int]

    def seeded_inputs(self, count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """Seeded detector outputs (centre-size boxes in the layout's units, class scores in
        [0, 1]) and original image sizes of several aspect ratios."""

        rng = np.random.default_rng(seed)
        k, n = yolo_adapter.num_classes_of(self.raw_shape, self.keys["layout"])
        scale = np.array(self.input_size[::-1] * 2, np.float64)  # w, h, w, h in pixels
        if self.keys["box_units"] == "normalized":
            scale = np.ones(4)
        out = []
        for i in range(count):
            centre = rng.uniform(0.1, 0.9, (n, 2))
            size = rng.uniform(0.02, 0.4, (n, 2))
            box = np.concatenate([centre, size], 1) * scale
            extra = 1 if self.keys["layout"] == "objectness" else 0
            scores = rng.beta(0.4, 3.0, (n, k + extra))
            rows = np.concatenate([box, scores], 1).astype(np.float32)  # [N, 4 + K]
            raw = rows.T[None] if self.keys["layout"] == "boxes_first" else rows[None]
            hw = [(480, 640), (640, 427), (720, 1280), (500, 500)][i % 4]
            out.append({"yolo_output": np.ascontiguousarray(raw),
                        "image_size": np.array(hw, np.float32)})
        return out


@dataclasses.dataclass(frozen=True)
class TFLiteExport:
    """What `export_tflite` wrote: the directory, its files, the model sizes and verifications.

    `yolo_path` / `yolo_verification`: the YOLO raw-output variant, when one was asked for."""

    directory: Path
    model_path: Path
    labels_path: Path
    metadata_path: Path
    model_bytes: int
    verification: TFLiteVerification
    yolo_path: Path | None = None
    yolo_verification: TFLiteVerification | None = None

    def summary(self) -> str:
        lines = [f"TFLite post-processing: {self.model_path} ({self.model_bytes} bytes, builtin "
                 f"ops)", f"  {self.verification.summary()}"]
        if self.yolo_path is not None:
            lines += [f"  YOLO raw-output variant: {self.yolo_path}",
                      f"  {self.yolo_verification.summary()}"]
        return "\n".join(lines)


def labels_text(config: PostProcessConfig, names: Mapping[int, str] | None = None) -> str:
    """One line per class column: `<class id>\\t<name>` (the id alone when no name is known);
    columns that are never emitted (disabled, or id -1) are included, so line k is column k."""
    names = dict(names or {})
    lines = []
    for i in config.emitted_class_ids():
        name = names.get(int(i), "")
        lines.append(f"{i}\t{name}" if name else f"{i}")
    return "\n".join(lines) + "\n"


def verify_yolo_tflite(model: bytes | str | Path, config: PostProcessConfig,
                       variant: YoloVariant, inputs: Iterable[Mapping[str, np.ndarray]], *,
                       postprocessor=None) -> TFLiteVerification:
    """The YOLO variant on LiteRT against the adapter's TF decode + the TF reference."""

    pp = reference_postprocessor(config) if postprocessor is None else postprocessor
    lite = LiteRunner(model)
    images = detections = 0
    max_diff = 0.0
    failures = []
    for i, one in enumerate(inputs):
        raw, hw = one["yolo_output"], one["image_size"]
        boxes, scores = yolo_adapter.decode(tf.constant(raw), (float(hw[0]), float(hw[1])), variant.keys,
                                    variant.input_size)
        want = {k: v.numpy() for k, v in pp(boxes, scores).items()}
        got = lite(yolo_output=raw, image_size=hw)
        images += 1
        detections += int(want["num_detections"][0])
        problems = compare_detections(want, got)
        if problems:
            failures.append(f"image {i}: " + "; ".join(problems))
        elif int(want["num_detections"][0]):
            ws, gs = np.sort(_rows(want)[1]), np.sort(_rows(got)[1])
            max_diff = max(max_diff, float(np.max(np.abs(ws.astype(np.float64) - gs))))
    return TFLiteVerification(images, "seeded detector outputs", detections, max_diff,
                              tuple(failures))


def export_tflite(config: PostProcessConfig, directory: str | Path, *, num_boxes: int,
                  name: str = "postprocess", inputs: TFLiteVerifyInputs | None = None,
                  category_names: Mapping[int, str] | None = None,
                  yolo: YoloVariant | None = None, overwrite: bool = False) -> TFLiteExport:
    """Builds, converts, verifies and writes the on-device post-processing.

    Writes the directory `directory` (atomically: nothing is there unless all succeeded) with
    `<name>.tflite`, `<name>.labels.txt` (`labels_text`) and `<name>.json` (the metadata: the
    config and its SHA-256, the input and output tensors, the verifications), and with `yolo`
    also `<name>_yolo.tflite`, the variant that takes the detector's own output tensor.

    Args:
      config: the tuned post-processing.
      directory: the output directory (must not exist unless `overwrite`).
      num_boxes: N, the detector's raw box count.
      name: the files' base name.
      inputs: the raw outputs to verify on and their source, e.g. the tune images' cached raw
        outputs; None: 8 seeded inputs (`seeded_inputs`).
      category_names: optional class id -> name for the labels file.
      yolo: also write the YOLO raw-output variant (`build_yolo_postprocess_fn`), verified on
        seeded detector outputs.
      overwrite: replace an existing directory.

    Returns:
      A `TFLiteExport`.

    Raises:
      TFLiteVerificationError: LiteRT's detections differ from the TF reference's.
      FileExistsError: `directory` exists and not `overwrite`.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists")
    pp = reference_postprocessor(config)
    bounds = raw_keep_bounds(config, pp)
    model = convert(build_postprocess_fn(config, num_boxes, bounds=bounds))
    if inputs is None:
        inputs = TFLiteVerifyInputs(seeded_inputs(config, num_boxes), "seeded")
    check = verify_tflite(model, config, inputs.pairs, source=inputs.source, postprocessor=pp)
    if not check.passed:
        raise TFLiteVerificationError(check.summary())
    yolo_model = yolo_check = None
    if yolo is not None:
        yolo_model = convert(build_yolo_postprocess_fn(config, yolo.keys, yolo.input_size,
                                                       yolo.raw_shape, bounds=bounds))
        yolo_check = verify_yolo_tflite(yolo_model, config, yolo, yolo.seeded_inputs(),
                                        postprocessor=pp)
        if not yolo_check.passed:
            raise TFLiteVerificationError("YOLO raw-output variant: " + yolo_check.summary())
    columns = config.num_classes + int(config.background_column)
    m = config.max_total_detections
    outputs = {"detection_boxes": [1, m, 4], "detection_scores": [1, m],
               "detection_classes": [1, m], "num_detections": [1]}
    metadata = {
        "format": "tfcal-tflite-postprocess/1",
        "config_sha256": config_sha256(config),
        "postprocess_config": json.loads(config.to_json()),
        "model": f"{name}.tflite",
        "inputs": {_INPUT_BOXES: [1, int(num_boxes), 4],
                   _INPUT_SCORES: [1, int(num_boxes), columns]},
        "outputs": outputs,
        "raw_keep_bounds": None if bounds is None else {
            "bound": [float(v) if np.isfinite(v) else ("inf" if v > 0 else "-inf")
                      for v in bounds.bound],
            "increasing": [bool(v) for v in bounds.increasing],
            "band": [int(v) for v in bounds.band]},
        "verification": dataclasses.asdict(check) | {"score_atol": SCORE_ATOL},
        "tensorflow_version": tf.__version__,
    }
    if yolo is not None:
        metadata["yolo_variant"] = {
            "model": f"{name}_yolo.tflite",
            "layout": dict(yolo.keys), "input_size": list(yolo.input_size),
            "inputs": {"yolo_output": list(yolo.raw_shape), "image_size": [2]},
            "outputs": outputs,
            "verification": dataclasses.asdict(yolo_check) | {"score_atol": SCORE_ATOL}}
    with atomic.directory(directory, overwrite=overwrite) as tmp:
        (tmp / f"{name}.tflite").write_bytes(model)
        if yolo_model is not None:
            (tmp / f"{name}_yolo.tflite").write_bytes(yolo_model)
        (tmp / f"{name}.labels.txt").write_text(labels_text(config, category_names),
                                                encoding="utf-8")
        (tmp / f"{name}.json").write_text(json.dumps(metadata, indent=2, allow_nan=False) + "\n",
                                          encoding="utf-8")
    return TFLiteExport(directory, directory / f"{name}.tflite", directory / f"{name}.labels.txt",
                        directory / f"{name}.json", len(model), check,
                        directory / f"{name}_yolo.tflite" if yolo_model is not None else None,
                        yolo_check)


# ----------------------------------------------------------------------------- handoff


def export_tflite_handoff(config: PostProcessConfig, detector, export_root: str | Path,
                          model_name: str, *,
                          raw_inputs: TFLiteVerifyInputs | None = None,
                          category_names: Mapping[int, str] | None = None,
                          overwrite: bool = False) -> TFLiteExport:
    """The TFLite export of a tuning run's handoff: `<export_root>/<model_name>_tflite/`.

    The detector's box count N comes from `raw_inputs` (the tune images' cached raw outputs,
    also verified on), a YOLO detector's output shape, or a SavedModel/Keras detector's raw
    boxes shape; a YOLO detector also gets the raw-output variant (`YoloVariant`).

    Args:
      config: the tuned post-processing.
      detector: the run's `tfcal.handoff.DetectorDescription`.
      export_root: `export.dir`.
      model_name: `export.model_name`.
      raw_inputs: (boxes `[1, N, 4]`, raw scores `[1, N, C]`) pairs and where they came
        from, or None (seeded inputs).
      category_names: class id -> name, for the labels file.
      overwrite: replace an existing `<model_name>_tflite` folder.

    Raises:
      TfcalError: N unknown, or per-class boxes (`[1, N, K, 4]`: not supported on device).
      TFLiteVerificationError: LiteRT differs from TF.
    """

    out = Path(export_root) / f"{model_name}_tflite"
    variant = None
    if detector is not None and detector.format == "yolo" and detector.saved_model:

        det = yolo_adapter.YoloDetector(detector)
        det.num_score_columns  # loads the model: its input size and output shape
        variant = YoloVariant(dict(detector.layout), tuple(det.input_size),
                              tuple(int(v) for v in det.raw_shape))
    if raw_inputs is not None:
        boxes = np.asarray(raw_inputs.pairs[0][0])
        if boxes.ndim != 3:
            raise TfcalError(f"export.tflite: the detector's raw boxes are per class "
                             f"{list(boxes.shape)}; the on-device export takes shared boxes "
                             f"[1, N, 4]")
        num_boxes = int(boxes.shape[1])
    elif variant is not None:

        num_boxes = int(yolo_adapter.num_classes_of(variant.raw_shape, variant.keys["layout"])[1])
    elif detector is not None and detector.saved_model:

        shape = open_described(detector).serving_graph().info.raw_boxes_shape
        if len(shape) != 3 or shape[1] is None:
            raise TfcalError(f"export.tflite: the detector's raw boxes {list(shape)} are not "
                             f"[1, N, 4] with a fixed N; the on-device export needs that")
        num_boxes = int(shape[1])
    else:
        raise TfcalError("export.tflite: the detector's box count is unknown without its raw "
                         "outputs; export it from `tfcal tune` with export.tflite: true")
    try:
        return export_tflite(config, out, num_boxes=num_boxes, inputs=raw_inputs,
                             category_names=category_names, yolo=variant, overwrite=overwrite)
    except FileExistsError:
        raise TfcalError(f"{out}: already exists; pass --overwrite (or set export.overwrite: "
                         f"true) to replace it") from None
