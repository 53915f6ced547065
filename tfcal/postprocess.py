"""`PostProcessConfig`: the frozen JSON record of every tuned post-processing number.

The tuner writes it, the exporter reads it, and `tfcal.layers.PostProcessor` is built from it;
it is the only thing the offline side hands to the serving side. Every field is validated once,
in `__post_init__`, with a `ValueError` that names the field and includes the bad value.

Semantics (binding for the ops, the layers and the NumPy fitters):

- Calibration maps raw scores to class probabilities as `tfcal.ops.calibrate_scores` documents
  (`temperature` scales logits; `platt` is `sigmoid(a * z + b)`; `piecewise_linear` maps the
  uncalibrated probability through per-class knots, clamped at the end knots).
- A calibrated score is kept iff `score >= min_score_thresh[k]`, its class is enabled, and the
  score is > 0 (a 0.0 score is "no detection", the same value as padding).
- Disabled classes (`class_enabled[k] = False`) are never emitted: their scores are zeroed before
  NMS, so they neither appear nor suppress other classes' boxes (NMS is per class).
- NMS is per class; a box is suppressed iff IoU > `nms_iou[k]` with a higher-scored box of its
  class. `class_agnostic` needs a single `nms_iou` value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from tfcal import TfcalError, atomic

ScoreConverter = Literal["sigmoid", "softmax", "identity"]
Calibration = Literal["none", "temperature", "platt", "piecewise_linear"]

_SCORE_CONVERTERS = ("sigmoid", "softmax", "identity")
_CALIBRATIONS = ("none", "temperature", "platt", "piecewise_linear")

__all__ = ["Calibration", "PostProcessConfig", "ScoreConverter"]


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not _is_bool(v) and math.isfinite(v)


def _float_tuple(name: str, value, *, lengths: tuple[int, ...] | None, lo=None, hi=None,
                 positive=False) -> tuple[float, ...]:
    """Validates a list of finite numbers; `lengths=None` accepts any non-empty list."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name}: expected a list of numbers, got {value!r}")
    values = tuple(value)
    if lengths is None and len(values) == 0:
        raise ValueError(f"{name}: expected at least one value, got []")
    if lengths is not None and len(values) not in lengths:
        want = " or ".join(str(n) for n in sorted(set(lengths)))
        raise ValueError(f"{name}: expected {want} values, got {len(values)}: {list(values)}")
    for v in values:
        if not _is_number(v):
            raise ValueError(f"{name}: expected finite numbers, got {list(values)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (positive and v <= 0):
            rng = "> 0" if positive else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}: each value must be {rng}, got {list(values)}")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class PostProcessConfig:
    """Every tuned post-processing number, for `K = num_classes` output class columns.

    Attributes:
      num_classes: K, the number of class columns after the background column is dropped.
      score_converter: {'sigmoid', 'softmax', 'identity'}, default='sigmoid'. The detector's
        score space (`identity`: raw scores are logits).
      background_column: raw score column 0 is background and is dropped.
      calibration: {'none', 'temperature', 'platt', 'piecewise_linear'}, default='none'.
      temperature: 1 (shared) or K values, each > 0; required for `temperature`.
      platt_a, platt_b: K values each; required for `platt`.
      knots_x: K rows, each strictly increasing in [0, 1]; required for `piecewise_linear`.
      knots_y: K rows, non-decreasing in [0, 1], each as long as its `knots_x` row.
      min_score_thresh: 1 or K values in [0, 1]; kept iff `score >= min_score_thresh`.
      class_enabled: () (all enabled) or K booleans; disabled classes are never emitted.
      nms_iou: 1 or K values in [0, 1].
      class_agnostic: one NMS over all classes (needs a single `nms_iou`).
      max_detections_per_class: int >= 1.
      max_total_detections: int >= 1, rows of every output.
      clip_boxes: clip output boxes to [0, 1].
      label_offset: int >= 0; column k is emitted as class id `k + label_offset`.
      class_ids: () or K category ids, one per column (informational).
      metadata: JSON-able provenance (fit sizes, data fingerprints, ...).
    """

    num_classes: int
    score_converter: ScoreConverter = "sigmoid"
    background_column: bool = True
    calibration: Calibration = "none"
    temperature: tuple[float, ...] = ()
    platt_a: tuple[float, ...] = ()
    platt_b: tuple[float, ...] = ()
    knots_x: tuple[tuple[float, ...], ...] = ()
    knots_y: tuple[tuple[float, ...], ...] = ()
    min_score_thresh: tuple[float, ...] = (0.0,)
    class_enabled: tuple[bool, ...] = ()
    nms_iou: tuple[float, ...] = (0.5,)
    class_agnostic: bool = False
    max_detections_per_class: int = 100
    max_total_detections: int = 100
    clip_boxes: bool = False
    label_offset: int = 1
    class_ids: tuple[int, ...] = ()
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        k = self.num_classes
        if not _is_int(k) or k < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {k!r}")
        k = int(k)
        put("num_classes", k)
        if self.score_converter not in _SCORE_CONVERTERS:
            raise ValueError(f"score_converter: expected one of {list(_SCORE_CONVERTERS)}, "
                             f"got {self.score_converter!r}")
        if self.calibration not in _CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {list(_CALIBRATIONS)}, "
                             f"got {self.calibration!r}")
        for name in ("background_column", "class_agnostic", "clip_boxes"):
            if not _is_bool(getattr(self, name)):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
            put(name, bool(getattr(self, name)))
        method = self.calibration
        put("temperature", _float_tuple(
            "temperature", self.temperature,
            lengths=(1, k) if method == "temperature" else (0, 1, k), positive=True))
        for name in ("platt_a", "platt_b"):
            put(name, _float_tuple(name, getattr(self, name),
                                   lengths=(k,) if method == "platt" else (0, k)))
        self._check_knots(k, required=method == "piecewise_linear")
        put("min_score_thresh", _float_tuple("min_score_thresh", self.min_score_thresh,
                                             lengths=(1, k), lo=0.0, hi=1.0))
        put("nms_iou", _float_tuple("nms_iou", self.nms_iou, lengths=(1, k), lo=0.0, hi=1.0))
        enabled = self.class_enabled
        if isinstance(enabled, (str, bytes)) or len(tuple(enabled)) not in (0, k) or not all(
                _is_bool(v) for v in enabled):
            raise ValueError(f"class_enabled: expected [] or {k} booleans, got {enabled!r}")
        put("class_enabled", tuple(bool(v) for v in enabled))
        if self.class_agnostic and len(set(self.nms_iou)) > 1:
            raise ValueError(f"nms_iou: class_agnostic needs a single value, got "
                             f"{list(self.nms_iou)}")
        for name in ("max_detections_per_class", "max_total_detections"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
            put(name, int(v))
        if not _is_int(self.label_offset) or self.label_offset < 0:
            raise ValueError(f"label_offset: expected an int >= 0, got {self.label_offset!r}")
        put("label_offset", int(self.label_offset))
        ids = self.class_ids
        if isinstance(ids, (str, bytes)) or len(tuple(ids)) not in (0, k) or not all(
                _is_int(v) for v in ids):
            raise ValueError(f"class_ids: expected [] or {k} ints, got {ids!r}")
        put("class_ids", tuple(int(v) for v in ids))
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"metadata: expected a mapping, got {self.metadata!r}")
        try:
            json.dumps(dict(self.metadata), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata: must be JSON-serializable ({e})") from None
        put("metadata", dict(self.metadata))

    def _check_knots(self, k: int, *, required: bool) -> None:
        kx, ky = self.knots_x, self.knots_y
        if not required and len(kx) == 0 and len(ky) == 0:
            object.__setattr__(self, "knots_x", ())
            object.__setattr__(self, "knots_y", ())
            return
        if len(kx) != k or len(ky) != k:
            raise ValueError(f"knots_x/knots_y: expected {k} rows each, got {len(kx)} and "
                             f"{len(ky)}")
        rows_x, rows_y = [], []
        for i, (rx, ry) in enumerate(zip(kx, ky)):
            x = _float_tuple(f"knots_x[{i}]", rx, lengths=None, lo=0.0, hi=1.0)
            y = _float_tuple(f"knots_y[{i}]", ry, lengths=(len(x),), lo=0.0, hi=1.0)
            if any(b <= a for a, b in zip(x, x[1:])):
                raise ValueError(f"knots_x[{i}]: must be strictly increasing, got {list(x)}")
            if any(b < a for a, b in zip(y, y[1:])):
                raise ValueError(f"knots_y[{i}]: must be non-decreasing, got {list(y)}")
            rows_x.append(x)
            rows_y.append(y)
        object.__setattr__(self, "knots_x", tuple(rows_x))
        object.__setattr__(self, "knots_y", tuple(rows_y))

    # ------------------------------------------------------------------------- conversions

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("knots_x", "knots_y"):
                v = [list(row) for row in v]
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PostProcessConfig":
        """Builds and validates a config from `to_dict` output; unknown keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"postprocess config: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"postprocess config: unknown field(s) {unknown}")
        if "num_classes" not in data:
            raise ValueError("postprocess config: num_classes is required")
        kw = dict(data)
        for name in ("knots_x", "knots_y"):
            if name in kw and isinstance(kw[name], (list, tuple)):
                kw[name] = tuple(tuple(r) if isinstance(r, (list, tuple)) else r
                                 for r in kw[name])
        return cls(**kw)

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
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def thresholds(self) -> tuple[float, ...]:
        """`min_score_thresh` broadcast to K values."""
        t = self.min_score_thresh
        return t * self.num_classes if len(t) == 1 else t

    def enabled(self) -> tuple[bool, ...]:
        """`class_enabled` broadcast to K values (all True when empty)."""
        return self.class_enabled or (True,) * self.num_classes

    def ious(self) -> tuple[float, ...]:
        """`nms_iou` broadcast to K values."""
        v = self.nms_iou
        return v * self.num_classes if len(v) == 1 else v
