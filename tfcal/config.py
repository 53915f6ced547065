"""The tuning config file: frozen dataclasses, `load_config(path)`, and all of its validation.

A config is read once, at the boundary, into frozen dataclasses. Every check happens here, before
any work starts; a bad file gives one `TfcalError` line that names the file and the key path:

    configs/x.yaml: tuning.target_precision: must be in (0, 1], got 1.5

Relative paths resolve against the directory of the config file. `configs/example.yaml`
documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from tfcal import TfcalError, validation
from tfcal.detectors.yolo import (BoxUnits, Layout, LayoutChoices, PixelRange, Resize,
                                  read_labels, resolve_layout)
from tfcal.objective_kinds import KINDS, ConfidenceBudget, ObjectiveName, OnUnreachable, check_fields
from tfcal.vocabulary import BoxFormat, DetectorFormat, ScoreConverter

YoloPreset = Literal["yolov8", "yolo11", "yolov5"]
OnUnknownLabel = Literal["error", "disable"]
ExtraOutput = Literal["detection_multiclass_scores", "detection_anchor_indices"]
ServedInputType = Literal["image_tensor", "float_image_tensor", "encoded_image_string_tensor",
                          "tf_example"]  # tfcal.detectors.odapi.INPUT_TYPES
CalibrationMethod = str  # a name in tfcal.calibration.names(), checked at load
Scope = Literal["per_class", "pooled"]
MultipleTesting = Literal["holm", "none"]
RunnerKind = Literal["local", "beam"]


def _checked_elsewhere(message: str) -> dict:
    """The rule a field's value must meet, for the config reference, where the check itself runs
    in `_check_shared_numbers` (by `tfcal.validation`, shared with the serving side)."""
    return {"rule": message}


def _check(predicate, message):
    """Field metadata: `predicate(value)` must hold, else `message` (with the value appended;
    a callable message is called when it is needed)."""
    return {"check": (predicate, message)}


def _unit_closed(v):
    return 0.0 <= v <= 1.0


def _positive(v):
    return v > 0


def _calibration_method(v):
    from tfcal import calibration  # the registry (it imports TensorFlow: not at import time)

    return v in calibration.names()


def _calibration_methods_message():
    from tfcal import calibration  # TensorFlow: only when a message names the methods

    return "must be one of " + " | ".join(calibration.names())


def _size(v):
    return len(v) == 2 and all(x > 0 for x in v)


@dataclasses.dataclass(frozen=True)
class YoloConfig:
    """A YOLO-style head (`format: yolo`, see `tfcal.detectors.yolo`); null keys come from the
    preset."""

    preset: YoloPreset | None = None
    layout: Layout | None = None  # boxes_first [B,4+K,N] | boxes_last [B,N,4+K] | objectness
    box_units: BoxUnits | None = None  # centre-size boxes normalized to the input, or its pixels
    resize: Resize | None = None  # default letterbox
    pixel_range: PixelRange | None = None  # network input values: unit [0, 1] (default) | byte
    input_size: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata=_check(_size, "must be [height, width], both > 0"))
    output: str | None = None  # the output key, when the model has several
    labels: Path | None = None  # class names, one per line, in column order
    on_unknown_label: OnUnknownLabel = "error"  # a label that is no data set category

    def layout_choices(self) -> LayoutChoices:
        """The layout keys this section gives (`tfcal.detectors.yolo.resolve_layout`)."""
        return LayoutChoices(preset=self.preset, layout=self.layout, box_units=self.box_units,
                             resize=self.resize, pixel_range=self.pixel_range,
                             input_size=self.input_size, output=self.output)


@dataclasses.dataclass(frozen=True)
class KerasConfig:
    """A Keras model (`format: keras`) with raw boxes `[B, N, 4]` (`[ymin, xmin, ymax, xmax]`
    normalized) and raw scores `[B, N, C]` outputs."""

    boxes_output: str = "boxes"
    scores_output: str = "scores"
    input_size: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata=_check(_size, "must be [height, width], both > 0"))
    pixel_range: PixelRange = "byte"


#: The score space of each non-OD API format, used when the config does not set it: YOLO
#: scores are sigmoid probabilities (score_converter sigmoid) with no background column.
FORMAT_SCORE_DEFAULTS: dict[str, dict[str, Any]] = {
    "yolo": {"score_converter": "sigmoid", "background_column": False},
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The detector and how to read its raw (pre-NMS) outputs."""

    format: DetectorFormat = "odapi"
    saved_model: Path | None = None
    path: Path | None = None  # format yolo / keras: the .tflite / .keras file or SavedModel folder
    raw_outputs: Path | None = None  # precomputed npz instead of a model (see README)
    signature: str = "serving_default"
    input: str = "input_tensor"
    raw_boxes: str = "raw_detection_boxes"
    raw_scores: str = "raw_detection_scores"
    box_format: BoxFormat = "yxyx"  # normalized layout of raw boxes, converted at load
    score_converter: ScoreConverter = "sigmoid"
    background_column: bool = True
    label_offset: int = dataclasses.field(default=1, metadata=_checked_elsewhere("must be >= 0"))
    category_columns: dict[str, int] | None = None  # explicit {category id or name: column}
    batch_size: int = dataclasses.field(default=8, metadata=_check(_positive, "must be > 0"))
    cache_dir: Path | None = None  # default: <output.dir>/cache
    yolo: YoloConfig = YoloConfig()
    keras: KerasConfig = KerasConfig()

    @property
    def detector_path(self) -> Path | None:
        """The model to run: `saved_model` (OD API) or `path`; None with `raw_outputs`."""
        return self.saved_model if self.format == "odapi" else self.path


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The COCO-format validation set and how it is split."""

    annotations: Path | None = None
    images: Path | None = None
    holdout_fraction: float = dataclasses.field(
        default=0.3, metadata=_check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"))
    seed: int = 0
    kfold: int | None = dataclasses.field(
        default=None, metadata=_check(lambda v: v >= 2, "must be >= 2 (or null for a holdout split)"))
    subgroups: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How raw scores become calibrated probabilities (fitted on the tune split)."""

    method: CalibrationMethod = dataclasses.field(
        default="temperature",
        metadata=_check(_calibration_method, _calibration_methods_message))
    per_class: bool = True
    min_samples: int = dataclasses.field(default=30, metadata=_check(_positive, "must be > 0"))


@dataclasses.dataclass(frozen=True)
class ClassOverride:
    """Per-class changes to the tuning target, keyed by category id or name."""

    objective: ObjectiveName | None = None
    # Ranges of the objective fields: tfcal.objective_kinds.check_fields, at load.
    target_precision: float | None = None
    target_recall: float | None = None
    beta: float | None = None
    c_fp: float | None = None
    c_fn: float | None = None
    on_unreachable: OnUnreachable | None = None


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The per-class joint search of `min_score_thresh` and NMS IoU."""

    objective: ObjectiveName = "precision_target"
    # Ranges of the objective fields: tfcal.objective_kinds.check_fields, at load.
    target_precision: float = 0.9
    target_recall: float = 0.9
    beta: float = 1.0
    c_fp: float = 1.0
    c_fn: float = 1.0
    # Target objectives are certified at this level by default; null is a point estimate.
    confidence: float | None = 0.95
    confidence_budget: ConfidenceBudget = "per_class"
    scope: Scope = "per_class"  # pooled: one threshold and IoU for all classes, on the pooled data
    # Certified mode: the share of tune images that plans each class's test (NMS IoU, start);
    # the rest certifies it at the whole level. 0: no learn split (Bonferroni over the IoU grid).
    learn_fraction: float = dataclasses.field(
        default=0.3, metadata=_check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    match_iou: float = dataclasses.field(
        default=0.5, metadata=_check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"))
    nms_iou_grid: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    default_nms_iou: float | None = dataclasses.field(
        default=None, metadata=_checked_elsewhere("must be in (0, 1] and in nms_iou_grid"))
    # OD API soft_nms_sigma: > 0 runs Gaussian soft-NMS, in the search's candidates and in the
    # served graph alike (the NMS IoU then has no effect, as in TF); 0: hard NMS.
    soft_nms_sigma: float = dataclasses.field(default=0.0,
                                              metadata=_checked_elsewhere("must be >= 0"))
    # OD API clip_window [ymin, xmin, ymax, xmax] (normalized): boxes are clipped to it after NMS
    # and zero-area ones dropped, in the search and the served graph; change_coordinate_frame
    # makes the served boxes relative to the window (the tuner matches them in image frame).
    clip_window: tuple[float, ...] | None = None
    change_coordinate_frame: bool = False
    # The numbers the served NMS takes too are checked by `tfcal.validation`, as there.
    max_detections_per_class: int = dataclasses.field(
        default=100, metadata=_checked_elsewhere("must be > 0 and <= max_total_detections"))
    max_total_detections: int = dataclasses.field(default=100,
                                                  metadata=_checked_elsewhere("must be > 0"))
    min_support: int = dataclasses.field(default=10, metadata=_check(_positive, "must be > 0"))
    min_candidate_thresh: float = dataclasses.field(
        default=0.001, metadata=_check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    # pool (default when the target is certified per class with a learn split, else disable):
    # every class the learn part does not show below the target keeps the strongest certified
    # statement it can carry, alone or in the group (tfcal.tuning.search).
    on_unreachable: OnUnreachable = "pool"
    classes: dict[str, ClassOverride] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where report.json, report.md, postprocess.json and plots/ go."""

    dir: Path = Path("runs/example")
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The TF Serving package written after tuning."""

    enabled: bool = True
    dir: Path = Path("export")
    model_name: str = "detector"
    version: int | None = dataclasses.field(default=None, metadata=_check(_positive, "must be > 0"))
    overwrite: bool = False
    include_raw_outputs: bool = False
    extra_outputs: tuple[ExtraOutput, ...] = ()
    input_type: ServedInputType | None = None
    verify: bool = True
    tflite: bool = False  # also the on-device post-processing, <dir>/<model_name>_tflite/


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """How `tfcal drift` judges new data against the tuning report (see `tfcal.tuning.drift`).

    Attributes:
      ece_tolerance: drift when ECE rose by more than this.
      precision_tolerance: a class's fall from its holdout precision counts only when larger
        than this (and significant).
      min_support: detections needed on each side a precision test compares.
      significance: family-wise level of the precision tests, in (0, 0.5].
      multiple_testing: ``holm`` adjusts the p-values of every test together; ``none`` judges
        each at `significance` (more false alarms with many classes).
    """

    ece_tolerance: float = dataclasses.field(default=0.05, metadata=_check(_unit_closed, "must be in [0, 1]"))
    precision_tolerance: float = dataclasses.field(
        default=0.05, metadata=_check(_unit_closed, "must be in [0, 1]"))
    min_support: int = dataclasses.field(default=10, metadata=_check(_positive, "must be > 0"))
    significance: float = dataclasses.field(
        default=0.05, metadata=_check(lambda v: 0.0 < v <= 0.5, "must be in (0, 0.5]"))
    multiple_testing: MultipleTesting = "holm"


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Where the detector pass runs (`tfcal.coco.runner` or `tfcal.beam`).

    Attributes:
      kind: ``local`` runs the detector in this process; ``beam`` runs it as an Apache Beam
        pipeline (the ``tfcal[beam]`` extra) with RunInference, sharded, and merges the
        per-image statistics into the same raw-output cache.
      beam_options: Beam's own pipeline flags, passed through as given, e.g.
        ``[--runner=DataflowRunner, --project=p, --region=r, --temp_location=gs://b/t]``
        (default: the DirectRunner in this process).
      shard_images: images per statistics shard (a worker holds at most one shard of raw
        outputs in memory).
    """

    kind: RunnerKind = "local"
    beam_options: tuple[str, ...] = ()
    shard_images: int = dataclasses.field(default=256, metadata=_check(_positive, "must be > 0"))


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole tuning config, as loaded from YAML."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    tuning: TuningConfig = TuningConfig()
    output: OutputConfig = OutputConfig()
    export: ExportConfig = ExportConfig()
    drift: DriftConfig = DriftConfig()
    runner: RunnerConfig = RunnerConfig()
    source: Path | None = dataclasses.field(default=None, compare=False)
    sha256: str = dataclasses.field(default="", compare=False)


_PATH_KEYS = {"saved_model", "path", "raw_outputs", "annotations", "images", "dir", "cache_dir",
              "labels"}


class _Loader:
    """Walks a YAML mapping into a dataclass tree, failing on the first bad key."""

    def __init__(self, source: str, base: Path):
        self.source = source
        self.base = base

    def fail(self, keypath: str, message: str, value: Any = dataclasses.MISSING):
        got = "" if value is dataclasses.MISSING else f", got {value!r}"
        raise TfcalError(f"{self.source}: {keypath}: {message}{got}")

    def build(self, cls, raw: Any, keypath: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.fail(keypath or "(top level)", "must be a mapping", raw)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("source", "sha256")}
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = (f"did you mean {close[0]}?" if close
                        else f"known keys: {', '.join(sorted(fields))}")
                self.fail(_join(keypath, str(key)), f"unknown key ({hint})")
        values = {}
        for name, field in fields.items():
            if name not in raw:
                default = field.default
                if name in _PATH_KEYS and isinstance(default, Path) and not default.is_absolute():
                    # Defaults are relative paths too: they resolve against the config file.
                    values[name] = self.base / default
                elif dataclasses.is_dataclass(default):
                    values[name] = self.build(type(default), {}, _join(keypath, name))
                continue
            path = _join(keypath, name)
            value = self.convert(hints[name], raw[name], path, is_path=name in _PATH_KEYS)
            check = field.metadata.get("check")
            if check is not None and value is not None and not check[0](value):
                message = check[1]() if callable(check[1]) else check[1]
                self.fail(path, message, raw[name])
            values[name] = value
        return cls(**values)

    def convert(self, hint, value, path, *, is_path=False):
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, _UnionType) and type(None) in args:
            if value is None:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, path, is_path=is_path)
        if origin is Literal:
            if value not in args:
                self.fail(path, "must be one of " + " | ".join(map(str, args)), value)
            return value
        if hint is bool:
            if not isinstance(value, bool):
                self.fail(path, "must be true or false", value)
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, "must be an integer", value)
            return value
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, "must be a number", value)
            if not math.isfinite(value):
                self.fail(path, "must be finite", value)
            return float(value)
        if hint is str:
            if not isinstance(value, str) or not value:
                self.fail(path, "must be a non-empty string", value)
            return value
        if hint is Path:
            if not isinstance(value, str) or not value:
                self.fail(path, "must be a path string", value)
            p = Path(value).expanduser()
            return p if p.is_absolute() else (self.base / p)
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                self.fail(path, "must be a list", value)
            return tuple(self.convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, Mapping):
                self.fail(path, "must be a mapping", value)
            out = {}
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    self.fail(path, "keys must be category ids or names", k)
                out[str(k)] = self.convert(args[1], v, _join(path, str(k)))
            return out
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)
        raise TypeError(f"unsupported config type {hint!r} at {path}")  # a bug, not user input


_UnionType = type(int | None)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _cross_checks(cfg: Config, fail) -> None:
    """Checks that involve more than one key."""
    m, t = cfg.model, cfg.tuning
    _check_model_format(m, fail)
    if m.box_format != "yxyx" and m.detector_path is not None:
        fail("model.box_format", "must be yxyx with a detector model (its adapter gives "
             "[ymin, xmin, ymax, xmax]); other layouts are for model.raw_outputs", m.box_format)
    _check_shared_numbers(cfg, fail)
    if len(set(t.nms_iou_grid)) != len(t.nms_iou_grid):
        fail("tuning.nms_iou_grid", "must not repeat a value", list(t.nms_iou_grid))
    if t.default_nms_iou is not None and t.default_nms_iou not in t.nms_iou_grid:
        fail("tuning.default_nms_iou", "must be one of tuning.nms_iou_grid", t.default_nms_iou)
    if t.max_detections_per_class > t.max_total_detections:
        fail("tuning.max_detections_per_class", "must be <= tuning.max_total_detections",
             t.max_detections_per_class)
    if m.category_columns is not None:
        for key, col in m.category_columns.items():
            if isinstance(col, bool) or not isinstance(col, int) or col < 0:
                fail(f"model.category_columns.{key}", "must be a column index >= 0", col)
    if cfg.data.annotations is None:
        fail("data.annotations", "is required")
    _check_objectives(t, fail)
    if t.scope == "pooled" and t.classes:
        fail("tuning.classes", "per-class overrides need tuning.scope: per_class (pooled is one "
             "decision for every class)")
    if (t.scope == "pooled" and t.confidence is not None and t.learn_fraction == 0
            and KINDS[t.objective].certifiable and cfg.calibration.method != "none"):
        fail("tuning.learn_fraction", f"must be > 0 with tuning.scope: pooled, a certified "
             f"{t.objective} and calibration.method: {cfg.calibration.method}: the calibration "
             "decides how the classes' scores compare, so it is fitted on the learn part and "
             "must not see the images that certify (or set calibration.method: none)",
             t.learn_fraction)
    if t.on_unreachable == "pool":
        if not (KINDS[t.objective].certifiable and t.confidence is not None):
            fail("tuning.on_unreachable", "pool needs a certified target (objective "
                 "precision_target or recall_target with a confidence): the group's pooled "
                 "target is what is certified", "pool")
        if t.scope != "per_class":
            fail("tuning.on_unreachable", "pool needs tuning.scope: per_class (scope pooled "
                 "already shares one threshold)", "pool")
        if t.learn_fraction == 0:
            fail("tuning.learn_fraction", "must be > 0 with tuning.on_unreachable: pool: the "
                 "learn part decides which classes form the group, without the certify labels",
                 t.learn_fraction)
    for key, ov in t.classes.items():
        if ov.on_unreachable == "pool":
            fail(f"tuning.classes.{key}.on_unreachable", "pool is set for all classes at once "
                 "(tuning.on_unreachable): the group is one decision", "pool")
    if cfg.runner.kind == "beam" and m.detector_path is None:
        fail("runner.kind", "beam runs a detector (model.saved_model or model.path); with "
             "model.raw_outputs there is none to run (use kind: local)")
    for i, flag in enumerate(cfg.runner.beam_options):
        if not flag.startswith("--"):
            fail(f"runner.beam_options[{i}]", "must be a Beam pipeline flag like "
                 "--runner=DirectRunner", flag)
    if len(set(cfg.data.subgroups)) != len(cfg.data.subgroups):
        fail("data.subgroups", "must not repeat a field", list(cfg.data.subgroups))


def _check_shared_numbers(cfg: Config, fail) -> None:
    """The numbers the served post-processing takes too (IoU, sigma, window, caps, label offset),
    by the checks `PostProcessConfig`, `tfcal.ops.NmsOptions` and the layers run
    (`tfcal.validation`), so a value is accepted or refused alike on both sides."""
    m, t = cfg.model, cfg.tuning
    checks = [
        ("tuning", lambda: validation.iou_thresholds("nms_iou_grid", list(t.nms_iou_grid),
                                                     allow_zero=False)),
        ("tuning", lambda: t.default_nms_iou is None or validation.iou_thresholds(
            "default_nms_iou", t.default_nms_iou, scalar_ok=True, allow_zero=False)),
        ("tuning", lambda: validation.soft_nms_sigmas("soft_nms_sigma", t.soft_nms_sigma,
                                                      scalar_ok=True)),
        ("tuning", lambda: t.clip_window is None or validation.clip_window(
            "clip_window", list(t.clip_window))),
        ("tuning", lambda: validation.window_frame(t.change_coordinate_frame, t.clip_window)),
        ("tuning", lambda: validation.detection_caps(t.max_detections_per_class,
                                                     t.max_total_detections)),
        ("model", lambda: validation.label_offset("label_offset", m.label_offset)),
    ]
    for section, check in checks:
        try:
            check()
        except ValueError as err:
            field, _, message = str(err).partition(": ")
            fail(f"{section}.{field}", message.replace("clip_window", "tuning.clip_window"))


def _check_model_format(m: ModelConfig, fail) -> None:
    """The model keys each `model.format` takes, and a YOLO layout that resolves."""
    if m.format == "odapi":
        if m.path is not None:
            fail("model.path", "is for format yolo or keras; an OD API model is "
                 "model.saved_model")
        if (m.saved_model is None) == (m.raw_outputs is None):
            fail("model", "give exactly one of saved_model or raw_outputs")
    else:
        if m.saved_model is not None:
            fail("model.saved_model", f"is for format odapi; a {m.format} model is model.path")
        if (m.path is None) == (m.raw_outputs is None):
            fail("model", "give exactly one of path or raw_outputs")
        if m.path is not None and not m.path.exists():
            fail("model.path", "no such file or folder", str(m.path))
    for section, default in (("yolo", YoloConfig()), ("keras", KerasConfig())):
        if m.format != section and getattr(m, section) != default:
            fail(f"model.{section}", f"is for format {section} (model.format is {m.format})")
    if m.format == "yolo":
        y = m.yolo
        if y.labels is None and m.category_columns is None:
            fail("model.yolo.labels", "is required (or model.category_columns): YOLO columns "
                 "map to categories by name")
        if y.labels is not None and m.category_columns is not None:
            fail("model.yolo.labels", "give labels or model.category_columns, not both")
        if y.labels is not None:
            try:
                read_labels(y.labels)
            except TfcalError as err:
                fail("model.yolo.labels", str(err))
        if m.path is not None:
            try:
                resolve_layout(m.path, y.layout_choices(), signature=m.signature)
            except ValueError as err:
                field, _, message = str(err).partition(": ")
                fail(f"model.yolo.{field}", message)
            except TfcalError as err:
                fail("model.path", str(err))
    if m.format == "keras" and m.path is not None and m.path.suffix != ".keras":
        fail("model.path", "format keras takes a .keras file", str(m.path))


def _pool_possible(t: TuningConfig) -> bool:
    """Whether `on_unreachable: pool` can run: a certified target, per class, a learn split."""
    return (KINDS[t.objective].certifiable and t.confidence is not None
            and t.scope == "per_class" and t.learn_fraction > 0)


def _on_unreachable_default(cfg: Config, raw: Any) -> Config:
    """`tuning.on_unreachable` left unset: pool where it can run, else disable."""
    given = raw.get("tuning") if isinstance(raw, Mapping) else None
    if isinstance(given, Mapping) and "on_unreachable" in given:
        return cfg
    if cfg.tuning.objective not in KINDS or _pool_possible(cfg.tuning):
        return cfg  # an unknown objective is reported by the validation
    return dataclasses.replace(cfg, tuning=dataclasses.replace(cfg.tuning,
                                                               on_unreachable="disable"))


def _format_defaults(cfg: Config, raw: Any) -> Config:
    """The score space of `model.format` for the score keys the file does not set."""
    defaults = FORMAT_SCORE_DEFAULTS.get(cfg.model.format)
    if not defaults:
        return cfg
    given = raw.get("model") if isinstance(raw, Mapping) else None
    given = given if isinstance(given, Mapping) else {}
    changes = {k: v for k, v in defaults.items() if k not in given}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def _check_objectives(t: TuningConfig, fail) -> None:
    """The objective fields of `tuning` and of each `tuning.classes` entry, by the check that
    `tfcal.tuning.search.Objective` runs too."""
    names = ("target_precision", "target_recall", "beta", "c_fp", "c_fn")
    entries = [("tuning", dict(objective=t.objective, confidence=t.confidence,
                               on_unreachable=t.on_unreachable,
                               **{n: getattr(t, n) for n in names}))]
    for key, ov in t.classes.items():
        entries.append((f"tuning.classes.{key}", dict(
            objective=ov.objective, on_unreachable=ov.on_unreachable,
            **{n: getattr(ov, n) for n in names})))
    for where, fields in entries:
        try:
            check_fields(**fields)
        except ValueError as err:
            field, _, message = str(err).partition(": ")
            fail(f"{where}.{field}", message)


def load_config(path: str | Path) -> Config:
    """Reads and validates a YAML tuning config.

    Args:
      path: the YAML file. Relative paths inside it resolve against its directory.

    Returns:
      The frozen `Config`, with `source` set to the file and `sha256` to its content hash.

    Raises:
      TfcalError: one line naming the file and key path, for a missing or unreadable file,
        invalid YAML, an unknown key, a wrong type or an out-of-range value.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise TfcalError(f"{path}: cannot read config: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise TfcalError(f"{path}: invalid YAML{where}: {problem}") from None
    loader = _Loader(str(path), path.resolve().parent)
    cfg = _on_unreachable_default(_format_defaults(loader.build(Config, raw, ""), raw), raw)
    _cross_checks(cfg, loader.fail)
    return dataclasses.replace(cfg, source=path, sha256=hashlib.sha256(text).hexdigest())


def config_to_dict(cfg: Any) -> Any:
    """A JSON-able view of a config (paths as strings), for reports and provenance."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.name not in ("source", "sha256")}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg
