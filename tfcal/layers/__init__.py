"""Thin Keras layers over `tfcal.ops` and `tfcal.calibration`: the serving stages and their chain.

`CandidateBoxes` (optional: drops boxes that cannot pass) -> `ScoreCalibration` ->
`ClassThresholds` -> `CombinedNMS`; `PostProcessor` is that chain built from one
`PostProcessConfig`.

Every layer is registered as Keras-serializable under the package name `tfcal`, runs under
`tf.function` with a dynamic batch, computes in float32 and validates its arguments in
`__init__`.
"""

from tfcal.layers.candidate_boxes import CandidateBoxes
from tfcal.layers.class_thresholds import ClassThresholds
from tfcal.layers.combined_nms import CombinedNMS
from tfcal.layers.post_processor import PostProcessor
from tfcal.layers.score_calibration import ScoreCalibration

__all__ = ["CandidateBoxes", "ClassThresholds", "CombinedNMS", "PostProcessor", "ScoreCalibration"]
