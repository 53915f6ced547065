"""`PostProcessConfig`: the frozen JSON record of every tuned post-processing number.

The tuner writes it, the exporter reads it, and `tfcal.layers.PostProcessor` is built from it;
it is the only thing the offline side hands to the serving side. Every field is validated once,
on construction, with a `ValueError` that names the field and includes the bad value, by the
validators the layers use too (`tfcal.validation`; calibration parameters by their method).

Semantics (binding for the ops, the layers and the NumPy fitters):

- Calibration maps raw scores to class probabilities as the method in `tfcal.calibration`
  defines (`temperature` scales logits; `platt` is `sigmoid(a * z + b)`; `isotonic` maps the
  uncalibrated probability through per-class knots, clamped at the end knots).
- A calibrated score is kept iff `score >= min_score_thresh[k]`, its class is enabled, and the
  score is > 0 (a 0.0 score is "no detection", the same value as padding).
- Disabled classes (`class_enabled[k] = False`) are never emitted: their scores are zeroed before
  NMS, so they neither appear nor suppress other classes' boxes (NMS is per class).
- NMS is per class; a box is suppressed iff IoU > `nms_iou[k]` with a higher-scored box of its
  class. `class_agnostic` runs one NMS over all classes: it needs a single `nms_iou` and sigma,
  and a `max_detections_per_class` that cannot bind (None or >= `max_total_detections`). With
  `soft_nms_sigma[k] > 0` class k runs Gaussian soft-NMS (the OD API's `soft_nms_sigma`, see `tfcal.ops`): the scores of its
  boxes decay by `exp(-0.5 * iou**2 / sigma)` with the IoU to each selected box, `nms_iou[k]` has
  no effect (as in TF and the OD API), and a detection needs a decayed score >=
  `min_score_thresh[k]`.
- With a `clip_window` `[ymin, xmin, ymax, xmax]` (the OD API's), boxes are clipped to it after
  NMS and detections whose clipped box has zero area are dropped before the
  `max_total_detections` cut; `change_coordinate_frame` then re-expresses the boxes in the
  window's frame (`(box - [ymin, xmin, ymin, xmin]) / [h, w, h, w]`).
- A detection of column k is emitted with class id `class_ids[k]` (looked up in the serving
  graph), or `k + label_offset` when `class_ids` is empty (records written without ids, and
  OD API label maps). A column whose id is -1 has no category and is never emitted, whatever
  `class_enabled` says (`enabled()`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tfcal import TfcalError, atomic, ops, validation
from tfcal import calibration as _calibration
from tfcal.vocabulary import ScoreConverter


__all__ = ["PostProcessConfig", "ScoreConverter"]


def _parameter_names() -> set[str]:
    return {p for n in _calibration.names() for p in _calibration.get(n).params}


@dataclasses.dataclass(frozen=True, init=False)
class PostProcessConfig:
    """Every tuned post-processing number, for `K = num_classes` output class columns.

    Attributes:
      num_classes: K, the number of class columns after the background column is dropped.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'. The detector's
        score space (`identity`: raw scores are logits).
      background_column: raw score column 0 is background and is dropped.
      calibration: a registered calibration method (`tfcal.calibration.names()`: 'none',
        'temperature', 'platt', 'isotonic'), default='none'. Older records' `piecewise_linear`
        is read as `isotonic`.
      calibration_params: the method's parameters, validated by the method (temperature:
        `temperature`, 1 or K values > 0; platt: `platt_a`, `platt_b`, K values each; isotonic:
        `knots_x`, `knots_y`, K rows), by name: `PostProcessConfig(2, calibration=
        "temperature", calibration_params={"temperature": (1.3,)})`, read as
        `cfg.calibration_params["temperature"]`. Only the method's own names are accepted (a
        parameter it would ignore is an error). In JSON (`to_dict`), they are top-level keys
        after `calibration`.
      min_score_thresh: 1 or K values in [0, 1]; kept iff `score >= min_score_thresh`.
      class_enabled: () (all enabled) or K booleans; disabled classes are never emitted.
      nms_iou: 1 or K values in [0, 1] (`tfcal.validation.iou_thresholds`).
      soft_nms_sigma: 1 or K values >= 0, default (0.0,): hard NMS; > 0: Gaussian soft-NMS.
      class_agnostic: one NMS over all classes (needs a single `nms_iou` and sigma).
      max_detections_per_class: int >= 1, or None: no cap below `max_total_detections`. With
        `class_agnostic` (one NMS, no per-class cap): None or >= `max_total_detections`; the
        rule the layers and the op follow too (`tfcal.validation.detection_caps`).
      max_total_detections: int >= 1, rows of every output.
      clip_boxes: clip output boxes to [0, 1].
      clip_window: () or 4 floats `[ymin, xmin, ymax, xmax]`, ymin < ymax, xmin < xmax.
      change_coordinate_frame: emit boxes in the `clip_window`'s frame (needs a window).
      label_offset: int >= 0; column k is emitted as class id `k + label_offset` when
        `class_ids` is empty.
      class_ids: () or K category ids, one per column, distinct except -1 (a column with no
        category: never emitted); column k is emitted as class id `class_ids[k]`.
      metadata: JSON-able provenance (fit sizes, data fingerprints, ...).
    """

    num_classes: int
    score_converter: ScoreConverter = "sigmoid"
    background_column: bool = True
    calibration: str = "none"
    calibration_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    min_score_thresh: tuple[float, ...] = (0.0,)
    class_enabled: tuple[bool, ...] = ()
    nms_iou: tuple[float, ...] = (0.5,)
    soft_nms_sigma: tuple[float, ...] = (0.0,)
    class_agnostic: bool = False
    max_detections_per_class: int | None = 100
    max_total_detections: int = 100
    clip_boxes: bool = False
    clip_window: tuple[float, ...] = ()
    change_coordinate_frame: bool = False
    label_offset: int = 1
    class_ids: tuple[int, ...] = ()
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(self, num_classes, *, score_converter="sigmoid", background_column=True,
                 calibration="none", calibration_params=None, min_score_thresh=(0.0,),
                 class_enabled=(), nms_iou=(0.5,), soft_nms_sigma=(0.0,), class_agnostic=False,
                 max_detections_per_class=100, max_total_detections=100, clip_boxes=False,
                 clip_window=(), change_coordinate_frame=False, label_offset=1, class_ids=(),
                 metadata=None):
        def put(name, value):
            object.__setattr__(self, name, value)

        k = validation.integer("num_classes", num_classes, minimum=1)
        put("num_classes", k)
        put("score_converter", validation.choice("score_converter", score_converter,
                                                 ops.SCORE_CONVERTERS))
        put("background_column", validation.boolean("background_column", background_column))
        try:
            method = _calibration.get(calibration)
        except ValueError:
            raise ValueError(f"calibration: expected one of {list(_calibration.names())}, "
                             f"got {calibration!r}") from None
        put("calibration", method.name)
        params = {} if calibration_params is None else calibration_params
        if not isinstance(params, Mapping):
            raise ValueError(f"calibration_params: expected a mapping of the method's "
                             f"parameters, got {params!r}")
        method.own_params(params)
        put("calibration_params", method.check_params(params, k))
        put("min_score_thresh", validation.score_thresholds("min_score_thresh", min_score_thresh,
                                                            lengths=(1, k)))
        put("class_enabled", validation.booleans("class_enabled", class_enabled, lengths=(0, k)))
        put("nms_iou", validation.iou_thresholds("nms_iou", nms_iou, lengths=(1, k)))
        put("soft_nms_sigma", validation.soft_nms_sigmas("soft_nms_sigma", soft_nms_sigma,
                                                         lengths=(1, k)))
        agnostic = validation.boolean("class_agnostic", class_agnostic)
        for name in ("nms_iou", "soft_nms_sigma"):
            validation.one_value_when_agnostic(name, getattr(self, name), agnostic)
        # The other NMS numbers: checked by the record the NMS op takes, as in the layers.
        nms = ops.NmsOptions(
            iou_threshold=self.nms_iou, soft_nms_sigma=self.soft_nms_sigma,
            max_detections_per_class=max_detections_per_class,
            max_total_detections=max_total_detections, class_agnostic=agnostic,
            clip_boxes=clip_boxes, clip_window=clip_window,
            change_coordinate_frame=change_coordinate_frame, label_offset=label_offset)
        for name in ("class_agnostic", "max_detections_per_class", "max_total_detections",
                     "clip_boxes", "change_coordinate_frame", "label_offset"):
            put(name, getattr(nms, name))
        put("clip_window", () if nms.clip_window is None else nms.clip_window)
        put("class_ids", validation.class_ids("class_ids", class_ids, lengths=(0, k)))
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata: expected a mapping, got {metadata!r}")
        try:
            json.dumps(dict(metadata), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata: must be JSON-serializable ({e})") from None
        put("metadata", dict(metadata))

    def nms_options(self) -> ops.NmsOptions:
        """The `tfcal.ops.NmsOptions` of these numbers (IoU, sigma, caps, clipping, offset)."""
        return ops.NmsOptions(
            iou_threshold=self.nms_iou, soft_nms_sigma=self.soft_nms_sigma,
            max_detections_per_class=self.max_detections_per_class,
            max_total_detections=self.max_total_detections, class_agnostic=self.class_agnostic,
            clip_boxes=self.clip_boxes, clip_window=self.clip_window or None,
            change_coordinate_frame=self.change_coordinate_frame,
            label_offset=self.label_offset)

    # ------------------------------------------------------------------------- conversions

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (tuples become lists).

        The calibration parameters are top-level keys after `calibration`, and only the
        method's own (`"temperature": [...]`); records written before methods owned their
        parameters also hold the other methods' fields, empty, and still load.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "calibration_params":
                out.update({k: _jsonable(p) for k, p in v.items()})
                continue
            out[f.name] = _jsonable(v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PostProcessConfig":
        """Builds and validates a config from `to_dict` output (the calibration parameters as
        top-level keys); unknown keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"postprocess config: expected a mapping, got {type(data).__name__}")
        names = _FIELDS - {"calibration_params"}
        unknown = sorted(set(data) - names - _parameter_names())
        if unknown:
            raise ValueError(f"postprocess config: unknown field(s) {unknown}")
        if "num_classes" not in data:
            raise ValueError("postprocess config: num_classes is required")
        fields = {k: v for k, v in data.items() if k in names}
        given = {k: v for k, v in data.items() if k not in names}
        try:
            method = _calibration.get(fields.get("calibration", "none"))
        except ValueError:
            method = None  # the constructor names the field
        if method is not None:
            # Another method's field, empty, is how older records say "not used".
            fields["calibration_params"] = _calibration.split_params(method, given)
        return cls(**fields)

    def to_json(self) -> str:
        """Indented JSON of every field (no NaN/Infinity)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "PostProcessConfig":
        """Parses and validates `to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"postprocess config: invalid JSON ({e})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Writes `to_json()` to `path` atomically."""
        return atomic.write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PostProcessConfig":
        """Reads a file written by `save`; errors name the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TfcalError(f"{path}: cannot read: {e.strerror or e}") from None
        except ValueError as e:  # a file users may edit: a boundary, so a TfcalError
            raise TfcalError(f"{path}: {e}") from None

    def replace(self, **changes) -> "PostProcessConfig":
        """A validated copy with `changes` applied, by `to_dict` names: fields, or the
        calibration parameters by their own names (`replace(temperature=(1.2,))`). A new
        `calibration` method starts from no parameters unless they are given."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        params = dict(fields.pop("calibration_params"))
        if "calibration" in changes:
            params = {}
        params.update(changes.pop("calibration_params", {}))
        own = {k: changes.pop(k) for k in list(changes) if k in _parameter_names()}
        params.update(own)
        fields.update(changes)
        return type(self)(**fields, calibration_params=params)

    def thresholds(self) -> tuple[float, ...]:
        """`min_score_thresh` broadcast to K values."""
        t = self.min_score_thresh
        return t * self.num_classes if len(t) == 1 else t

    def enabled(self) -> tuple[bool, ...]:
        """The columns that can be emitted: `class_enabled` broadcast to K values (all True when
        empty), False for a column whose class id is -1 (no category)."""
        enabled = self.class_enabled or (True,) * self.num_classes
        if self.class_ids:
            enabled = tuple(e and i >= 0 for e, i in zip(enabled, self.class_ids))
        return enabled

    def emitted_class_ids(self) -> tuple[int, ...]:
        """The class id each column is emitted as: `class_ids`, or `k + label_offset`."""
        return self.class_ids or tuple(k + self.label_offset for k in range(self.num_classes))

    def columns_of_class_ids(self, ids):
        """The column of each emitted class id (the inverse of `emitted_class_ids`).

        Args:
          ids: int or float `[D]` class ids as emitted (`detection_classes`).

        Returns:
          int64 `[D]` columns.

        Raises:
          ValueError: an id that no column is emitted as.
        """
        table = {i: k for k, i in enumerate(self.emitted_class_ids()) if i >= 0}
        ids = np.asarray(ids).reshape(-1)
        try:
            return np.array([table[int(i)] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"detection_classes: {e.args[0]} is not the class id of a column "
                             f"(class ids {list(self.emitted_class_ids())})") from None

    def ious(self) -> tuple[float, ...]:
        """`nms_iou` broadcast to K values."""
        v = self.nms_iou
        return v * self.num_classes if len(v) == 1 else v


_FIELDS = {f.name for f in dataclasses.fields(PostProcessConfig)}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return dict(v)
    return v
