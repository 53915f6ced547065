"""`CombinedNMS`: batched per-class NMS with per-class IoU and OD API outputs (a Keras layer)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcal import ops, validation
from tfcal.layers._common import constant_weight, float32_by_default


@keras.saving.register_keras_serializable(package="tfcal")
class CombinedNMS(keras.layers.Layer):
    """Per-class NMS over `tf.image.combined_non_max_suppression` (see `tfcal.ops.combined_nms`).

    Classes that share an IoU threshold are grouped; each group runs one combined NMS, and the
    groups' detections are merged by score. The IoU values decide the graph's structure, so they
    are plain config (not weights). Detections need `score >= score_threshold` and `score > 0`.
    The cost follows the boxes with a score above the threshold, not the input size (see
    `tfcal.ops.combined_nms`), so thresholded scores (`ClassThresholds`) are cheap to suppress.

    Args:
      iou_threshold: float or 1 or K floats in [0, 1]; default 0.5. A box is suppressed iff its
        IoU with a higher-scored box of the same class is > the class's value.
      max_detections_per_class: int >= 1; default None: up to `max_total_detections`. With
        `class_agnostic`, None or >= `max_total_detections` (one NMS over all classes has no
        per-class cap; the rule `PostProcessConfig` follows too,
        `tfcal.validation.detection_caps`).
      max_total_detections: int >= 1, default 100: the output row count M.
      score_threshold: float in [0, 1], default 0.0.
      clip_boxes: clip output boxes to [0, 1]; default False.
      class_agnostic: one NMS over all classes (each box with its best class); needs one IoU.
      label_offset: int >= 0, default 1: column k is emitted as class id k + 1 (OD API).
        Not used when `class_ids` is given.
      class_ids: optional K ints in [-1, 2**24], distinct except -1: column k is emitted as
        class id `class_ids[k]`, gathered in the graph from the non-trainable float32 weight
        `class_ids` (`[K]`). -1 marks a column with no category: disable it upstream
        (`ClassThresholds`), since it would be emitted as -1. Default None: `label_offset`.
      soft_nms_sigma: float or 1 or K floats >= 0; default 0.0 (hard NMS). Classes with a
        sigma > 0 run Gaussian soft-NMS as the OD API does (`tfcal.ops`): scores of overlapping
        boxes decay by `exp(-0.5 * iou**2 / sigma)`, the class's IoU threshold has no effect
        (as in TF's op), and detections carry the decayed scores. Pass the class thresholds at
        call time (`min_score_thresh`) so that decayed scores are held to them.
      clip_window: optional 4 floats `[ymin, xmin, ymax, xmax]` (ymin < ymax, xmin < xmax), the
        OD API's `clip_window`: after NMS each box is clipped to it and detections whose clipped
        box has zero area are dropped before the `max_total_detections` cut. Default None.
      change_coordinate_frame: with `clip_window`, emit boxes in the window's frame
        (`(box - [ymin, xmin, ymin, xmin]) / [h, w, h, w]`); default False.
      **kwargs: `keras.layers.Layer` arguments.

    Call args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, K, 4]`,
        `[ymin, xmin, ymax, xmax]`.
      scores: float `[batch, num_boxes, K]` probabilities (K static).
      min_score_thresh: optional float `[1]` or `[K]`: detections need a (decayed, with
        soft-NMS) score >= it (`tfcal.ops.combined_nms`).
      return_indices: also return `detection_indices` int32 `[batch, M]`, the input box of each
        detection (-1 for padding; see `tfcal.ops.combined_nms`).

    Returns:
      dict: `detection_boxes` float32 `[batch, M, 4]`, `detection_scores` float32 `[batch, M]`,
      `detection_classes` float32 `[batch, M]` (class ids), `num_detections` float32 `[batch]`;
      rows sorted by descending score, rows at or beyond `num_detections` all zero.
    """

    def __init__(self, iou_threshold=0.5, max_detections_per_class=None,
                 max_total_detections=100, score_threshold=0.0, clip_boxes=False,
                 class_agnostic=False, label_offset=1, class_ids=None, soft_nms_sigma=0.0,
                 clip_window=None, change_coordinate_frame=False, **kwargs):
        super().__init__(**float32_by_default(kwargs))
        # Every NMS number is checked once, by the record the op takes (`tfcal.validation`).
        self.options = ops.NmsOptions(
            iou_threshold=iou_threshold, soft_nms_sigma=soft_nms_sigma,
            max_detections_per_class=max_detections_per_class,
            max_total_detections=max_total_detections, class_agnostic=class_agnostic,
            clip_boxes=clip_boxes, clip_window=clip_window,
            change_coordinate_frame=change_coordinate_frame, label_offset=label_offset)
        o = self.options
        self.iou_threshold = list(o.iou_threshold)
        self.soft_nms_sigma = list(o.soft_nms_sigma)
        self.max_detections_per_class = o.max_detections_per_class
        self.max_total_detections = o.max_total_detections
        self.class_agnostic = o.class_agnostic
        self.clip_boxes = o.clip_boxes
        self.clip_window = None if o.clip_window is None else list(o.clip_window)
        self.change_coordinate_frame = o.change_coordinate_frame
        self.label_offset = o.label_offset
        self.score_threshold = validation.score_thresholds(
            "score_threshold", score_threshold, lengths=(1,), scalar_ok=True)[0]
        self.class_ids = None if class_ids is None else list(
            validation.class_ids("class_ids", class_ids))
        if self.class_ids is not None and len(self.iou_threshold) > 1 and \
                len(self.class_ids) != len(self.iou_threshold):
            raise ValueError(f"class_ids: {len(self.class_ids)} ids but iou_threshold has "
                             f"{len(self.iou_threshold)} values")
        self._class_ids = None if self.class_ids is None else constant_weight(
            self, "class_ids", self.class_ids)

    @property
    def class_ids_weight(self) -> keras.Variable | None:
        """The non-trainable float32 `[K]` weight of emitted class ids, or None (offset)."""
        return self._class_ids

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "skip_empty_classes" in config:
            # Saved by an earlier version: a speed switch (now always on inside the op), and a
            # per-class cap that class-agnostic NMS ignored.
            del config["skip_empty_classes"]
            if config.get("class_agnostic"):
                config["max_detections_per_class"] = None
        return cls(**config)

    @property
    def soft(self) -> bool:
        """Whether some class runs soft-NMS (sigma > 0)."""
        return any(v > 0 for v in self.soft_nms_sigma)

    def call(self, boxes, scores, min_score_thresh=None, return_indices=False):
        k = scores.shape[-1]
        if len(self.soft_nms_sigma) > 1 and k is not None and k != len(self.soft_nms_sigma):
            raise ValueError(f"scores: {k} class columns but soft_nms_sigma has "
                             f"{len(self.soft_nms_sigma)} values")
        if len(self.iou_threshold) > 1 and k is not None and k != len(self.iou_threshold):
            raise ValueError(f"scores: {k} class columns but iou_threshold has "
                             f"{len(self.iou_threshold)} values")
        if self.class_ids is not None and k is not None and k != len(self.class_ids):
            raise ValueError(f"scores: {k} class columns but class_ids has "
                             f"{len(self.class_ids)} ids")
        return ops.combined_nms(
            tf.cast(boxes, tf.float32), tf.cast(scores, tf.float32), self.options,
            score_threshold=self.score_threshold,
            class_ids=None if self._class_ids is None else tf.convert_to_tensor(self._class_ids),
            min_score_thresh=None if min_score_thresh is None else tf.cast(min_score_thresh,
                                                                           tf.float32),
            return_indices=bool(return_indices))

    def compute_output_spec(self, boxes, scores, min_score_thresh=None, return_indices=False):
        batch = scores.shape[0]
        m = self.max_total_detections
        spec = {
            "detection_boxes": keras.KerasTensor((batch, m, 4), dtype="float32"),
            "detection_scores": keras.KerasTensor((batch, m), dtype="float32"),
            "detection_classes": keras.KerasTensor((batch, m), dtype="float32"),
            "num_detections": keras.KerasTensor((batch,), dtype="float32"),
        }
        if return_indices:
            spec["detection_indices"] = keras.KerasTensor((batch, m), dtype="int32")
        return spec

    def get_config(self):
        config = super().get_config()
        config.update({
            "iou_threshold": list(self.iou_threshold),
            "max_detections_per_class": self.max_detections_per_class,
            "max_total_detections": self.max_total_detections,
            "score_threshold": self.score_threshold,
            "clip_boxes": self.clip_boxes,
            "class_agnostic": self.class_agnostic,
            "label_offset": self.label_offset,
            "class_ids": None if self.class_ids is None else list(self.class_ids),
            "soft_nms_sigma": list(self.soft_nms_sigma),
            "clip_window": None if self.clip_window is None else list(self.clip_window),
            "change_coordinate_frame": self.change_coordinate_frame,
        })
        return config
