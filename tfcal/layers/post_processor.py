"""`PostProcessor`: calibration, class thresholds and NMS chained from one `PostProcessConfig`."""

from __future__ import annotations

from typing import Any, Mapping

import keras
import tensorflow as tf

from tfcal import ops
from tfcal.layers._common import float32_by_default
from tfcal.layers.class_thresholds import ClassThresholds
from tfcal.layers.combined_nms import CombinedNMS
from tfcal.layers.score_calibration import ScoreCalibration
from tfcal.postprocess import PostProcessConfig


# Below this lowest enabled threshold the candidate pre-filter keeps almost every box.
PREFILTER_MIN_THRESH = 0.01


_CORE_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections",
                 "detection_indices")


def _check_extras(extras) -> dict:
    """The extra per-box outputs' names, checked (see `PostProcessor`'s call args)."""
    if extras is None:
        return {}
    if not isinstance(extras, Mapping):
        raise TypeError(f"extras: expected a mapping of output name -> [batch, num_boxes, ...] "
                        f"tensor, got {type(extras).__name__}")
    for name in extras:
        if not isinstance(name, str) or not name.startswith("detection_") or \
                name in _CORE_OUTPUTS:
            raise ValueError(f"extras: output names start with 'detection_' and are not one of "
                             f"{list(_CORE_OUTPUTS)}, got {name!r}")
        if name == "detection_masks":
            raise ValueError("extras: detection_masks cannot be passed through: an OD API model "
                             "computes masks for its own detections after its NMS, not for the "
                             "pre-NMS boxes the tuned NMS selects from; export without masks")
    return dict(extras)


@keras.saving.register_keras_serializable(package="tfcal")
class PostProcessor(keras.layers.Layer):
    """Raw detector outputs to OD API detections: calibration -> class thresholds -> NMS.

    Chains `ScoreCalibration`, `ClassThresholds` and `CombinedNMS`, after the candidate
    pre-filter that `CandidateBoxes` also applies (`tfcal.ops.select_candidate_boxes`), with
    raw-score bounds recomputed from the sub-layers' weights at every call.

    Built from a `PostProcessConfig` (or its `to_dict()`); `get_config()["postprocess_config"]`
    is that dict, so a saved model carries every tuned number in its config as well as in the
    sub-layers' non-trainable weights. The weights are what runs: assigning one (say
    `class_thresholds` `min_score_thresh`) changes the output without retracing, but not
    `get_config()`, which keeps the constructor's values. IoU values shape the graph (one NMS
    per IoU group), so they are config only.

    Before calibration, boxes that cannot pass any class threshold are dropped using
    conservative raw-score bounds derived from the thresholds and the calibration map
    (`ScoreCalibration.raw_lower_bounds`, from the current weights, through the method's
    inverse); the detections are identical to running the full tensor, and the cost of
    calibration and NMS scales with the few candidate boxes instead of all of them. (Softmax
    temperature scaling mixes columns, so it is never pre-filtered.)
    When every enabled class threshold in the config is below `PREFILTER_MIN_THRESH` (0.01),
    nearly every box passes and the pre-filter would only add work, so it is left out.

    Args:
      postprocess_config: a `PostProcessConfig` or a dict accepted by
        `PostProcessConfig.from_dict` (validated here: lengths against `num_classes`, ranges).
      candidate_prefilter: allow the pre-filter (default True); it is used when it can drop
        boxes (see above and `uses_candidate_prefilter`). False runs every box through every
        stage, for testing.
      **kwargs: `keras.layers.Layer` arguments.

    Call args:
      boxes: float `[batch, num_boxes, 4]` or `[batch, num_boxes, K, 4]`,
        `[ymin, xmin, ymax, xmax]`.
      raw_scores: float `[batch, num_boxes, C]` in the detector's score space (`C = K + 1` with
        a background column).
      extras: optional `{output name: [batch, num_boxes, ...] tensor}`: per-box outputs the
        detector computes before NMS (keypoints, embeddings, its class-score distribution...),
        emitted for the kept boxes under the given names (OD API names such as
        `detection_multiclass_scores`, `detection_keypoints`, `detection_keypoint_scores`), as
        `[batch, M, ...]` with zeros in padding rows. The boxes are found through
        `tfcal.ops.combined_nms(..., return_indices=True)`. `detection_masks` is refused:
        an OD API model computes masks for its own post-NMS detections, which are not the
        pre-NMS boxes this layer selects from.

    Returns:
      The `CombinedNMS` dict: `detection_boxes` float32 `[batch, M, 4]`, `detection_scores`
      float32 `[batch, M]`, `detection_classes` float32 `[batch, M]` (`class_ids[column]`, a
      lookup in the graph, or column + `label_offset` without class ids),
      `num_detections` float32 `[batch]`, with `M = max_total_detections`.

    Example:
      >>> cfg = PostProcessConfig(90, calibration="temperature",
      ...                         calibration_params={"temperature": (1.3,)},
      ...                         min_score_thresh=(0.3,), nms_iou=(0.6,))
      >>> out = PostProcessor.from_postprocess_config(cfg)(boxes, raw_scores)
    """

    def __init__(self, postprocess_config, candidate_prefilter=True, **kwargs):
        super().__init__(**float32_by_default(kwargs))
        if not isinstance(candidate_prefilter, bool):
            raise ValueError(f"candidate_prefilter: expected a bool, got {candidate_prefilter!r}")
        self.candidate_prefilter = candidate_prefilter
        if isinstance(postprocess_config, PostProcessConfig):
            cfg = postprocess_config
        elif isinstance(postprocess_config, Mapping):
            cfg = PostProcessConfig.from_dict(postprocess_config)
        else:
            raise ValueError(f"postprocess_config: expected a PostProcessConfig or a dict, got "
                             f"{type(postprocess_config).__name__}")
        self.postprocess_config = cfg
        k = cfg.num_classes
        self.score_calibration = ScoreCalibration(
            score_converter=cfg.score_converter, background_column=cfg.background_column,
            method=cfg.calibration, num_classes=k, name="score_calibration",
            **cfg.calibration_params)
        # Columns with no category (class id -1) are disabled too: never emitted.
        enabled = cfg.enabled()
        self.class_thresholds = ClassThresholds(
            min_score_thresh=list(cfg.min_score_thresh),
            class_enabled=list(enabled) if cfg.class_enabled or not all(enabled) else None,
            num_classes=k, name="class_thresholds")
        self.nms = CombinedNMS(
            iou_threshold=list(cfg.nms_iou),
            max_detections_per_class=cfg.max_detections_per_class,
            max_total_detections=cfg.max_total_detections, score_threshold=0.0,
            clip_boxes=cfg.clip_boxes, class_agnostic=cfg.class_agnostic,
            label_offset=cfg.label_offset,
            class_ids=list(cfg.class_ids) if cfg.class_ids else None,
            soft_nms_sigma=list(cfg.soft_nms_sigma),
            clip_window=list(cfg.clip_window) if cfg.clip_window else None,
            change_coordinate_frame=cfg.change_coordinate_frame, name="combined_nms")

    @classmethod
    def from_postprocess_config(cls, config: PostProcessConfig | Mapping[str, Any],
                                **kwargs) -> "PostProcessor":
        """Builds the layer from a `PostProcessConfig` (or its dict)."""
        return cls(postprocess_config=config, **kwargs)

    def build(self, boxes_shape, raw_scores_shape=None):
        if raw_scores_shape is not None:
            self.score_calibration.build(raw_scores_shape)
            scores_shape = self.score_calibration.compute_output_shape(raw_scores_shape)
            self.class_thresholds.build(scores_shape)
        self.nms.build(boxes_shape)

    @property
    def uses_candidate_prefilter(self) -> bool:
        """Whether `call` drops boxes that cannot pass before calibrating (see the class doc)."""
        cfg = self.postprocess_config
        if not self.candidate_prefilter or not self.score_calibration.calibration_method \
                .filters_raw_scores(cfg.score_converter):
            return False
        live = [t for t, e in zip(cfg.thresholds(), cfg.enabled()) if e]
        return not live or min(live) >= PREFILTER_MIN_THRESH

    def raw_lower_bounds(self) -> tf.Tensor:
        """Conservative per-class raw-score bounds implied by the current weights."""
        thresholds = self.class_thresholds
        enabled = thresholds.class_enabled_weight
        return self.score_calibration.raw_lower_bounds(
            tf.convert_to_tensor(thresholds.min_score_thresh_weight),
            None if enabled is None else tf.convert_to_tensor(enabled),
            num_classes=self.postprocess_config.num_classes)

    @property
    def _box_floor(self) -> bool:
        return hasattr(self.score_calibration.calibration_method, "box_candidate_floor_tf")

    def _box_candidates(self, boxes, raw_scores):
        """bool `[batch, num_boxes]`: the boxes whose best class score reaches their own floor."""
        thresholds = self.class_thresholds
        enabled = thresholds.class_enabled_weight
        floor = self.score_calibration.box_candidate_floor(
            boxes, tf.convert_to_tensor(thresholds.min_score_thresh_weight),
            None if enabled is None else tf.convert_to_tensor(enabled),
            num_classes=self.postprocess_config.num_classes)
        cls = raw_scores[:, :, 1:] if self.postprocess_config.background_column else raw_scores
        return tf.reduce_max(cls, axis=-1) >= floor

    def call(self, boxes, raw_scores, extras=None):
        extras = _check_extras(extras)
        boxes = tf.cast(boxes, tf.float32)
        raw_scores = tf.cast(raw_scores, tf.float32)
        kept = None  # input index of each box the NMS sees, when it is not the identity
        if self.uses_candidate_prefilter and self._box_floor and boxes.shape.rank == 3:
            # A box-dependent calibration: each box's floor from its size (tighter).
            found = ops.select_passing_boxes(
                boxes, raw_scores, self._box_candidates(boxes, raw_scores),
                return_indices=bool(extras))
            boxes, raw_scores = found[:2]
            kept = found[2] if extras else None
        elif self.uses_candidate_prefilter:
            # Only boxes that can pass some class threshold are calibrated and sent to NMS; the
            # result is identical, and most boxes of a real detector are dropped here.
            found = ops.select_candidate_boxes(
                boxes, raw_scores, self.raw_lower_bounds(),
                background_column=self.postprocess_config.background_column,
                return_indices=bool(extras))
            boxes, raw_scores = found[:2]
            kept = found[2] if extras else None
        if self.score_calibration.calibration_method.uses_boxes:
            scores = self.score_calibration(raw_scores, boxes)
        else:
            scores = self.score_calibration(raw_scores)
        scores = self.class_thresholds(scores)
        # Soft-NMS decays scores: the decayed ones are held to the class thresholds too.
        nms_args = {}
        if self.nms.soft:
            nms_args["min_score_thresh"] = tf.convert_to_tensor(
                self.class_thresholds.min_score_thresh_weight)
        if extras:
            nms_args["return_indices"] = True
        out = dict(self.nms(boxes, scores, **nms_args))
        if extras:
            index = out.pop("detection_indices")
            if kept is not None:
                index = tf.where(index >= 0, tf.gather(kept, tf.maximum(index, 0), batch_dims=1),
                                 -1)
            for name, values in extras.items():
                out[name] = ops.gather_detections(values, index)
        return out

    def compute_output_spec(self, boxes, raw_scores, extras=None):
        spec = self.nms.compute_output_spec(boxes, raw_scores)
        m = self.postprocess_config.max_total_detections
        for name, values in _check_extras(extras).items():
            spec[name] = keras.KerasTensor((values.shape[0], m) + tuple(values.shape[2:]),
                                           dtype=values.dtype)
        return spec

    def get_config(self):
        config = super().get_config()
        config["postprocess_config"] = self.postprocess_config.to_dict()
        config["candidate_prefilter"] = self.candidate_prefilter
        return config
