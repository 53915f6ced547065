"""Detector adapters behind one seam (`base.Detector`), used by the runner and the exporter.

`open_detector(model_config)` builds the adapter the config's `model.format` names:

| format | adapter | models |
| --- | --- | --- |
| `odapi` | `odapi.OdapiDetector` | TF OD API exports (all four input types) |
| `yolo` | `yolo.YoloDetector` | YOLO-style heads as TFLite, SavedModel or Keras |
| `keras` | `keras_model.KerasDetector` | `.keras` models with raw boxes and scores outputs |

Adapters load lazily (TensorFlow is imported when a model is first run), so a Beam worker can
hold the picklable `ModelConfig` and open the detector itself.
"""

from __future__ import annotations

from typing import Any

from tfcal import TfcalError
from tfcal.detectors.base import INPUT_TYPES, Detector, DetectorInfo, ServingGraph
from tfcal.detectors.keras_model import KerasDetector
from tfcal.detectors.odapi import OdapiDetector
from tfcal.detectors.yolo import YoloDetector, resolve_layout
from tfcal.handoff import DetectorDescription

__all__ = ["INPUT_TYPES", "Detector", "DetectorInfo", "ServingGraph", "describe", "open_described",
           "open_detector", "servable"]


def describe(model: Any) -> DetectorDescription:
    """The `DetectorDescription` of a config's model section (`tfcal.config.ModelConfig`),
    without its category ids (the tuner fills them in from the data set)."""
    path = model.detector_path
    layout: dict[str, Any] = {}
    box_format = "yxyx_normalized"
    if model.format == "yolo" and path is not None:
        layout = resolve_layout(path, model.yolo.layout_choices(), signature=model.signature)
        box_format = f"cxcywh_{layout['box_units']}"
    elif model.format == "keras":
        k = model.keras
        layout = {"boxes_output": k.boxes_output, "scores_output": k.scores_output,
                  "input_size": None if k.input_size is None else list(k.input_size),
                  "pixel_range": k.pixel_range}
    return DetectorDescription(
        saved_model=None if path is None else str(path),
        signature=model.signature, input=model.input,
        raw_boxes=model.raw_boxes, raw_scores=model.raw_scores, box_format=box_format,
        score_converter=model.score_converter, background_column=model.background_column,
        label_offset=model.label_offset, format=model.format, layout=layout)


def open_described(description: DetectorDescription, num_score_columns: int | None = None
                   ) -> Detector:
    """The adapter for a `DetectorDescription` (a detector.json), e.g. at export."""
    if description.saved_model is None:
        raise TfcalError("model: no detector to open (tuned from precomputed raw outputs)")
    if description.format == "yolo":
        return YoloDetector(description)
    if description.format == "keras":
        return KerasDetector(description)
    return OdapiDetector(description, num_score_columns)


def servable(description: DetectorDescription) -> bool:
    """True when the detector can be baked into the exported SavedModel (not: precomputed raw
    outputs, and TFLite models, whose post-processing is exported alone)."""
    if description.saved_model is None:
        return False
    return not (description.format == "yolo" and
                description.layout.get("backend") == "tflite")


def open_detector(model: Any) -> Detector:
    """The `Detector` for a config's model section (`tfcal.config.ModelConfig`, validated at
    load). Nothing is loaded until the detector is first run.

    Raises:
      TfcalError: the model section names no detector (precomputed raw outputs), or its files
        are not there.
    """
    return open_described(describe(model))
