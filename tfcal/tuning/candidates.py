"""Streaming candidate collection: calibrated, NMS'd detections per NMS IoU, batch by batch.

`collect_candidates` turns raw detector outputs (an iterable of batches, e.g. read from the raw
output cache) into the post-processed detections of every NMS IoU of the grid, at the lowest
candidate threshold. Each batch is calibrated once and run through combined NMS once per IoU in
one `tf.function`; only the post-NMS rows are kept, so memory is bounded by one batch of raw
scores plus the (small) kept detections, never by the whole raw score tensor.

The NMS is `tfcal.ops.combined_nms`, the op the serving graph runs: kept iff
`score >= lowest_threshold` and `score > 0`. Exactness: for hard NMS, thresholding before NMS
equals thresholding after, and the per-class and total caps keep the highest scores; so any
global `min_score_thresh >= lowest_threshold` applied to these candidates gives what
post-processing at that threshold gives. The same holds for soft-NMS (`soft_nms_sigma > 0`, on
the decayed scores): its selected scores never increase, so a higher threshold cuts a prefix of
the same greedy sequence (`tfcal.ops`). (Per-class thresholds can free total-cap slots for other
classes; the final check with the serving graph measures that.)

`calibrate_fn` runs on every raw score of a batch; a caller that knows a per-class raw floor below
which no score can calibrate to `lowest_threshold` may compute only the entries above it (see
benchmarks/tuner_speed.py: gather, calibrate, scatter).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from tfcal import validation


@dataclasses.dataclass(frozen=True, eq=False)
class Candidates:
    """Post-processed detections at one NMS IoU.

    Attributes:
        nms_iou: the NMS IoU used.
        image_id: int64 `[D]`.
        column: int32 `[D]` class column in `[0, K)`.
        score: float32 `[D]` calibrated probability, >= the lowest threshold.
        box: float32 `[D, 4]` `[ymin, xmin, ymax, xmax]` in the model's box units.
    """

    nms_iou: float
    image_id: np.ndarray
    column: np.ndarray
    score: np.ndarray
    box: np.ndarray

    def __len__(self) -> int:
        return int(self.score.shape[0])


def _identity(scores):
    return scores


@functools.lru_cache(maxsize=8)
def _combined_nms_fn(iou_grid, lowest_threshold, nms: ops.NmsOptions, calibrate_fn):
    import tensorflow as tf

    from tfcal.ops import combined_nms  # TensorFlow: tfcal.tuning's init imports this module

    @tf.function(reduce_retracing=True)
    def run(boxes, raw_scores):
        if getattr(calibrate_fn, "uses_boxes", False):  # box-dependent calibration
            scores = tf.cast(calibrate_fn(raw_scores, boxes), tf.float32)
        else:
            scores = tf.cast(calibrate_fn(raw_scores), tf.float32)
        outs = []
        for g in iou_grid:
            r = combined_nms(boxes, scores, dataclasses.replace(nms, iou_threshold=g),
                             score_threshold=lowest_threshold)
            outs.append((r["detection_boxes"], r["detection_scores"], r["detection_classes"],
                         tf.cast(r["num_detections"], tf.int32)))
        return outs

    return run


def collect_candidates(
    raw_batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    calibrate_fn: Callable | None,
    iou_grid: Sequence[float],
    lowest_threshold: float,
    nms: ops.NmsOptions | None = None,
) -> dict[float, Candidates]:
    """Calibrates and post-processes raw outputs batch by batch, once per NMS IoU.

    Args:
        raw_batches: iterable of `(image_ids, boxes, raw_scores)`: int `[B]`, float32
            `[B, N, 4]` (or `[B, N, K, 4]` per-class boxes) `[ymin, xmin, ymax, xmax]`, and
            float32 `[B, N, C]` raw scores. Batches may differ in `B`.
        calibrate_fn: maps raw scores float32 `[B, N, C]` to calibrated class probabilities
            float32 `[B, N, K]` (background dropped), with TF ops (it runs inside a
            `tf.function`); None when the raw scores already are the `K` class probabilities.
        iou_grid: NMS IoU values, each in (0, 1].
        lowest_threshold: the lowest candidate `min_score_thresh`, in [0, 1].
        nms: the rest of the serving NMS (`tfcal.ops.NmsOptions`: detection caps, soft-NMS
            sigma, clipping and clip window; boxes clipped to a window after NMS and zero-area
            ones dropped, the candidates staying in image frame), default None: `NmsOptions()` (100
            detections, no per-class cap below it). Its `iou_threshold` is replaced by each
            value of `iou_grid` and its `label_offset` by 0 (candidates carry class columns).

    Returns:
        `{nms_iou: Candidates}` in grid order.

    Raises:
        ValueError: bad grid or threshold, or inconsistent batch shapes.
    """
    grid = validation.iou_thresholds("iou_grid", list(iou_grid), allow_zero=False)
    lowest = validation.score_thresholds("lowest_threshold", lowest_threshold, lengths=(1,),
                                         scalar_ok=True)[0]
    from tfcal.ops import NmsOptions  # TensorFlow: tfcal.tuning's init imports this module

    nms = NmsOptions() if nms is None else nms
    if not isinstance(nms, NmsOptions):
        raise TypeError(f"nms: expected an NmsOptions, got {type(nms).__name__}")
    # One change of frame would hide the candidates' image-frame boxes from the matching.
    nms = dataclasses.replace(nms, label_offset=0, change_coordinate_frame=False)
    fn = _combined_nms_fn(grid, lowest, nms,
                          calibrate_fn if calibrate_fn is not None else _identity)
    parts: list[list[tuple]] = [[] for _ in grid]
    for image_ids, boxes, raw_scores in raw_batches:
        image_ids = np.asarray(image_ids, np.int64).reshape(-1)
        boxes = np.asarray(boxes, np.float32)
        raw_scores = np.asarray(raw_scores, np.float32)
        b = image_ids.shape[0]
        if boxes.shape[0] != b or raw_scores.shape[0] != b or boxes.shape[1] != raw_scores.shape[1]:
            raise ValueError(f"batch shapes disagree: image_ids [{b}], boxes {list(boxes.shape)}, "
                             f"raw_scores {list(raw_scores.shape)}")
        for gi, (nb, ns, nc, nv) in enumerate(fn(boxes, raw_scores)):
            nv = nv.numpy()
            valid = np.arange(ns.shape[1])[None, :] < nv[:, None]
            parts[gi].append((np.repeat(image_ids, nv), nc.numpy()[valid].astype(np.int32),
                              ns.numpy()[valid], nb.numpy()[valid]))
    out = {}
    for g, p in zip(grid, parts):
        if p:
            ids, cols, scores, bxs = (np.concatenate(a) for a in zip(*p))
        else:
            ids, cols = np.zeros(0, np.int64), np.zeros(0, np.int32)
            scores, bxs = np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        out[g] = Candidates(g, ids, cols, scores.astype(np.float32), bxs.astype(np.float32))
    return out
