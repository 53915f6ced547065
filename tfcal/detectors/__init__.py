"""Detector adapters behind one seam (`base.Detector`), used by the runner and the exporter.

`open_detector(model_config)` builds the adapter the config's `model.format` names:

| format | adapter | models |
| --- | --- | --- |
| `odapi` | `odapi.OdapiDetector` | TF OD API exports (all four input types) |

Adapters load lazily (TensorFlow is imported when a model is first run), so a Beam worker can
hold the picklable `ModelConfig` and open the detector itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tfcal import TfcalError
from tfcal.detectors.base import INPUT_TYPES, Detector, DetectorInfo, ServingGraph

if TYPE_CHECKING:  # imported late: tfcal.handoff -> tfcal.coco -> the runner -> this package
    from tfcal.handoff import DetectorDescription

__all__ = ["INPUT_TYPES", "Detector", "DetectorInfo", "ServingGraph", "describe", "open_described",
           "open_detector"]


def describe(model: Any) -> DetectorDescription:
    """The `DetectorDescription` of a config's model section (`tfcal.config.ModelConfig`),
    without its category ids (the tuner fills them in from the data set)."""
    from tfcal.handoff import DetectorDescription

    path = model.saved_model
    return DetectorDescription(
        saved_model=None if path is None else str(path),
        signature=model.signature, input=model.input,
        raw_boxes=model.raw_boxes, raw_scores=model.raw_scores,
        score_converter=model.score_converter, background_column=model.background_column,
        label_offset=model.label_offset)


def open_described(description: DetectorDescription, num_score_columns: int | None = None
                   ) -> Detector:
    """The adapter for a `DetectorDescription` (a detector.json), e.g. at export."""
    from tfcal.detectors.odapi import OdapiDetector

    if description.saved_model is None:
        raise TfcalError("model: no detector to open (tuned from precomputed raw outputs)")
    return OdapiDetector(description, num_score_columns)


def open_detector(model: Any) -> Detector:
    """The `Detector` for a config's model section (`tfcal.config.ModelConfig`, validated at
    load). Nothing is loaded until the detector is first run.

    Raises:
      TfcalError: the model section names no detector (precomputed raw outputs), or its files
        are not there.
    """
    return open_described(describe(model))
