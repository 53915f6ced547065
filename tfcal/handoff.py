"""The sealed handoff from tuning to serving: the `DetectorDescription` record, and the two
records `tfcal tune` writes into its run folder (postprocess.json and detector.json).

The offline side gives the serving side exactly two records: the `PostProcessConfig` (every
tuned number) and the `DetectorDescription` (which detector, which signature and tensors, how
its raw outputs are read, its fingerprint, and an image to warm it up with). `tfcal export`
reads these two and nothing of the tuning config's data section or of the data set; before
anything is built it checks that the SavedModel on disk is the one that was tuned
(`check_detector`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from tfcal import TfcalError, atomic, validation
from tfcal.rundir import DETECTOR_FILE, POSTPROCESS_FILE
from tfcal.raw.fingerprint import model_fingerprint
from tfcal.vocabulary import (DETECTOR_FORMATS, HEAD_BOX_FORMATS, SCORE_CONVERTERS,
                              DetectorFormat, HeadBoxFormat, ScoreConverter)

__all__ = ["DETECTOR_FILE", "POSTPROCESS_FILE",
           "DetectorDescription", "check_detector", "check_fingerprint"]



@dataclasses.dataclass(frozen=True)
class DetectorDescription:
    """The detector a `PostProcessConfig` was tuned for, and how its raw outputs are read.

    Attributes:
      saved_model: the detector model: its SavedModel folder, or for `format` ``yolo`` /
        ``keras`` its ``.tflite`` / ``.keras`` file or SavedModel folder; None when tuned from
        precomputed raw outputs (only a `postprocess_only` model can then be exported).
      signature: the signature key, default ``serving_default``.
      input: the signature input's key, default ``input_tensor``.
      input_dtype: the input's dtype name as tuned (``uint8``), or None when not known.
      raw_boxes: output key of the raw boxes, float32 `[batch, N, 4]`.
      raw_scores: output key of the raw scores, float32 `[batch, N, C]`.
      box_format: how the model's own head gives boxes: ``yxyx_normalized`` (`[ymin, xmin,
        ymax, xmax]` in `[0, 1]`, OD API), ``cxcywh_normalized`` or ``cxcywh_pixels`` (YOLO
        centre-size, normalized to or in pixels of the network input). The adapter always
        hands the tuner and the exported graph ``yxyx_normalized`` boxes of the original image.
      score_converter: how raw scores become probabilities, one of `SCORE_CONVERTERS`
        (`tfcal.vocabulary`).
      background_column: True when score column 0 is background.
      label_offset: class id = class column + `label_offset` (>= 0).
      category_ids: the category id of each class column (-1: no category), `[K]`.
      model_fingerprint: sha256 of the SavedModel and its keys (``raw_outputs:<sha256>`` when
        tuned from precomputed outputs; empty when not known).
      warmup_image: an image of the tuning data for the warmup requests, or None (a small
        generated image is used).
      format: the adapter, one of `DETECTOR_FORMATS` (default ``odapi``: files written before
        adapters existed read as OD API).
      layout: the adapter's layout keys (``yolo``: `tfcal.detectors.yolo.resolve_layout`;
        ``keras``: the output names and input size), empty for ``odapi``.
    """

    saved_model: str | None = None
    signature: str = "serving_default"
    input: str = "input_tensor"
    input_dtype: str | None = None
    raw_boxes: str = "raw_detection_boxes"
    raw_scores: str = "raw_detection_scores"
    box_format: HeadBoxFormat = "yxyx_normalized"
    score_converter: ScoreConverter = "sigmoid"
    background_column: bool = True
    label_offset: int = 1
    category_ids: tuple[int, ...] = ()
    model_fingerprint: str = ""
    warmup_image: str | None = None
    format: DetectorFormat = "odapi"
    layout: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("signature", "input", "raw_boxes", "raw_scores"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
        validation.choice("box_format", self.box_format, HEAD_BOX_FORMATS)
        validation.choice("format", self.format, DETECTOR_FORMATS)
        if not isinstance(self.layout, Mapping):
            raise ValueError(f"layout: must be a mapping, got {self.layout!r}")
        object.__setattr__(self, "layout", dict(self.layout))
        validation.choice("score_converter", self.score_converter, SCORE_CONVERTERS)
        validation.boolean("background_column", self.background_column)
        validation.integer("label_offset", self.label_offset, minimum=0)
        object.__setattr__(self, "category_ids",
                           tuple(validation.integer("category_ids", c, minimum=-1)
                                 for c in self.category_ids))
        for name in ("saved_model", "warmup_image"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["category_ids"] = list(self.category_ids)
        out["layout"] = json.loads(json.dumps(self.layout))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DetectorDescription":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
        fields = dict(data)
        if "category_ids" in fields:
            fields["category_ids"] = tuple(fields["category_ids"])
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DetectorDescription":
        """Reads a detector.json (TfcalError naming the file when it is not a valid one)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"must be a JSON object, got {type(data).__name__}")
            return cls.from_dict(data)
        except (OSError, ValueError, TypeError) as e:
            raise TfcalError(f"{path}: not a detector description: {e}") from None

    def fingerprint(self) -> str | None:
        """The fingerprint of the model on disk and the keys (None: no model there).

        OD API: `tfcal.raw.fingerprint.model_fingerprint` of the SavedModel and its signature keys.
        Other formats: of the SavedModel folder or the model file's bytes, with the format and
        its layout keys (what the raw outputs depend on)."""
        if self.saved_model is None:
            return None
        path = Path(self.saved_model)
        if self.format == "odapi":
            if not (path / "saved_model.pb").is_file():
                return None
            return model_fingerprint(path, keys=(self.signature, self.input,
                                                 self.raw_boxes, self.raw_scores))
        keys = (self.format, json.dumps(self.layout, sort_keys=True))
        if (path / "saved_model.pb").is_file():
            return model_fingerprint(path, keys=keys)
        if not path.is_file():
            return None
        h = hashlib.sha256(b"tfcal-model-file-v1\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        for k in keys:
            h.update(b"key\0" + k.encode() + b"\0")
        return h.hexdigest()


def check_fingerprint(postprocess_config, ppc_path, model_fp: str | None, what: str) -> None:
    """Refuses `model_fp` when it differs from ``metadata.model_fingerprint`` of
    `postprocess_config` (read from `ppc_path`): TfcalError naming both. Nothing is compared
    when either side has no model to fingerprint (precomputed raw outputs)."""
    tuned = str((postprocess_config.metadata or {}).get("model_fingerprint") or "")
    if not tuned or tuned.startswith("raw_outputs:") or not model_fp or \
            model_fp.startswith("raw_outputs:"):
        return
    if model_fp != tuned:
        raise TfcalError(f"{what}: model fingerprint {model_fp[:16]}... differs from the one "
                         f"tuned ({ppc_path} metadata.model_fingerprint {tuned[:16]}...): this "
                         f"is not the detector the thresholds were tuned for; run `tfcal tune` "
                         f"for it, or point the config at the tuned detector")


def check_detector(postprocess_config, detector: DetectorDescription, ppc_path) -> None:
    """Refuses a SavedModel other than the one `postprocess_config` was tuned for."""
    check_fingerprint(postprocess_config, ppc_path, detector.fingerprint(),
                      f"model.saved_model {detector.saved_model}")
