"""The closed vocabularies that several parts of tfcal share, each typed once as a `Literal`
with the tuple of its values (`get_args`), so the config, the serving ops, the detector
handoff and the raw-output checks all read the same words. No tfcal imports: every layer may
read it.

- `ScoreConverter`: how a detector's raw scores become probabilities: ``sigmoid`` (one logit
  per class), ``softmax`` (over the class columns) or ``identity`` (already probabilities, or
  logits the calibration reads as they are). Read by `model.score_converter` (config), the ops
  and calibration methods (`tfcal.ops.SCORE_CONVERTERS`), `PostProcessConfig.score_converter`,
  `DetectorDescription.score_converter` (detector.json) and
  `tfcal.raw.checks.check_value_ranges`.
- `BoxFormat`: the layout of the boxes in raw outputs given to the tuner (`model.box_format`):
  ``yxyx`` ``[ymin, xmin, ymax, xmax]`` (the OD API's, default), ``xyxy`` ``[xmin, ymin, xmax,
  ymax]`` or ``cxcywh`` ``[x_center, y_center, width, height]``, all normalized to [0, 1];
  `tfcal.coco.boxes.to_yxyx` converts them.
- `HeadBoxFormat`: how a detector's own head encodes its boxes before its adapter decodes them,
  recorded in detector.json (`DetectorDescription.box_format`): ``yxyx_normalized`` (OD API,
  Keras adapters), ``cxcywh_normalized`` or ``cxcywh_pixels`` (YOLO heads). A different idea
  from `BoxFormat`: adapters always hand the runner ``yxyx`` boxes.
- `DetectorFormat`: the adapter that opens a detector (`model.format`, detector.json's
  ``format``): ``odapi``, ``yolo`` or ``keras``.
"""

from __future__ import annotations

from typing import Literal, get_args

ScoreConverter = Literal["sigmoid", "softmax", "identity"]
SCORE_CONVERTERS: tuple[str, ...] = get_args(ScoreConverter)

BoxFormat = Literal["yxyx", "xyxy", "cxcywh"]
BOX_FORMATS: tuple[str, ...] = get_args(BoxFormat)

HeadBoxFormat = Literal["yxyx_normalized", "cxcywh_normalized", "cxcywh_pixels"]
HEAD_BOX_FORMATS: tuple[str, ...] = get_args(HeadBoxFormat)

DetectorFormat = Literal["odapi", "yolo", "keras"]
DETECTOR_FORMATS: tuple[str, ...] = get_args(DetectorFormat)

__all__ = ["BOX_FORMATS", "DETECTOR_FORMATS", "HEAD_BOX_FORMATS", "SCORE_CONVERTERS",
           "BoxFormat", "DetectorFormat", "HeadBoxFormat", "ScoreConverter"]
