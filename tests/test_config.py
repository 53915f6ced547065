"""Tests of tfcal.config: the documented example loads, and every bad key gives one clear line."""

from pathlib import Path

import pytest
import yaml

from tfcal import TfcalError
from tfcal.config import Config, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"model": {"saved_model": "det"}, "data": {"annotations": "ann.json"}}


def _write(tmp_path, doc, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def _with(section, key, value):
    doc = {k: dict(v) for k, v in MINIMAL.items()}
    doc.setdefault(section, {})[key] = value
    return doc


def test_example_config_documents_every_key():
    cfg = load_config(REPO / "configs" / "example.yaml")
    defaults = config_to_dict(Config())
    loaded = config_to_dict(cfg)
    # Every key of every section appears in the example, so the example documents them all.
    text = (REPO / "configs" / "example.yaml").read_text()
    for section, keys in defaults.items():
        assert f"\n{section}:" in f"\n{text}"
        for key in keys:
            assert f"  {key}:" in text, f"{section}.{key} is not documented in example.yaml"
    assert loaded["tuning"]["nms_iou_grid"] == [0.4, 0.5, 0.6, 0.7]


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = load_config(_write(sub, MINIMAL))
    assert cfg.model.saved_model == sub.resolve() / "det"
    assert cfg.data.annotations == sub.resolve() / "ann.json"
    assert len(cfg.sha256) == 64


def test_per_class_overrides_are_typed(tmp_path):
    doc = _with("tuning", "classes", {"person": {"target_precision": 0.95}, 3: {"objective": "f1"}})
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.tuning.classes["person"].target_precision == 0.95
    assert cfg.tuning.classes["3"].objective == "f1"


BAD = [
    (_with("tuning", "target_precision", 1.5), "tuning.target_precision: must be in (0, 1], got 1.5"),
    (_with("tuning", "target_precision", 0), "tuning.target_precision: must be in (0, 1], got 0"),
    (_with("tuning", "target_precision", "high"), "tuning.target_precision: must be a number"),
    (_with("tuning", "objective", "accuracy"), "tuning.objective: must be one of"),
    (_with("tuning", "on_unreachable", "ignore"), "tuning.on_unreachable: must be one of"),
    (_with("tuning", "nms_iou_grid", []), "tuning.nms_iou_grid: expected at least one value"),
    (_with("tuning", "nms_iou_grid", [0.5, 1.2]),
     "tuning.nms_iou_grid: each value must be in [0.0, 1.0], got [0.5, 1.2]"),
    (_with("tuning", "nms_iou_grid", [0.0, 0.5]),
     "tuning.nms_iou_grid: each value must be in (0, 1], got [0.0, 0.5]"),
    (_with("tuning", "default_nms_iou", 0.0), "tuning.default_nms_iou: must be in (0, 1], got 0.0"),
    (_with("tuning", "nms_iou_grid", [0.5, 0.5]), "tuning.nms_iou_grid: must not repeat"),
    (_with("tuning", "nms_iou_grid", 0.5), "tuning.nms_iou_grid: must be a list"),
    (_with("tuning", "default_nms_iou", 0.55), "tuning.default_nms_iou: must be one of"),
    (_with("tuning", "confidence", 1.0), "tuning.confidence: must be in (0, 1)"),
    (_with("tuning", "soft_nms_sigma", -0.5), "tuning.soft_nms_sigma: must be >= 0.0, got -0.5"),
    (_with("tuning", "soft_nms_sigma", "gauss"), "tuning.soft_nms_sigma: must be a number"),
    (_with("tuning", "clip_window", [0.0, 0.5, 1.0, 0.4]),
     "tuning.clip_window: expected [ymin, xmin, ymax, xmax] with ymin < ymax"),
    (_with("tuning", "clip_window", [0.0, 0.0, 1.0]), "tuning.clip_window: expected 4 values"),
    (_with("tuning", "change_coordinate_frame", True),
     "tuning.change_coordinate_frame: needs a tuning.clip_window"),
    (_with("tuning", "c_fp", 0), "tuning.c_fp: must be > 0, got 0"),
    (_with("tuning", "classes", {"car": {"beta": -1}}), "tuning.classes.car.beta: must be > 0"),
    (_with("tuning", "match_iou", float("nan")), "tuning.match_iou: must be finite"),
    (_with("tuning", "max_total_detections", 0),
     "tuning.max_total_detections: expected an int >= 1, got 0"),
    (_with("tuning", "max_detections_per_class", 0),
     "tuning.max_detections_per_class: expected an int >= 1, got 0"),
    (_with("tuning", "max_detections_per_class", 200),
     "tuning.max_detections_per_class: must be <= tuning.max_total_detections"),
    (_with("tuning", "max_total_detections", 10.5), "tuning.max_total_detections: must be an integer"),
    (_with("tuning", "classes", {"person": {"target_precision": 2}}),
     "tuning.classes.person.target_precision: must be in (0, 1]"),
    (_with("tuning", "classes", {"person": {"thresh": 0.5}}), "tuning.classes.person.thresh: unknown key"),
    (_with("tuning", "colour", 1), "tuning.colour: unknown key"),
    (_with("model", "score_converter", "relu"), "model.score_converter: must be one of"),
    (_with("model", "background_column", "yes"), "model.background_column: must be true or false"),
    (_with("model", "label_offset", -1), "model.label_offset: expected an int >= 0, got -1"),
    (_with("model", "raw_outputs", "raw.npz"), "model: give exactly one of saved_model or raw_outputs"),
    (_with("model", "category_columns", {"person": -2}), "model.category_columns.person: must be a column"),
    (_with("data", "holdout_fraction", 1.0), "data.holdout_fraction: must be in (0, 1)"),
    (_with("data", "subgroups", "camera"), "data.subgroups: must be a list"),
    (_with("data", "annotations", None), "data.annotations: is required"),
    (_with("calibration", "method", "beta"), "calibration.method: must be one of"),
    (_with("calibration", "min_samples", 0), "calibration.min_samples: must be > 0"),
    (_with("export", "version", 0), "export.version: must be > 0"),
    (_with("export", "input_type", "jpeg"), "export.input_type: must be one of image_tensor"),
    (_with("export", "extra_outputs", ["detection_masks"]),
     "export.extra_outputs[0]: must be one of detection_multiclass_scores"),
    (_with("export", "model_name", ""), "export.model_name: must be a non-empty string"),
    ({**MINIMAL, "tuning": {"scope": "pooled", "learn_fraction": 0},
      "calibration": {"method": "temperature"}},
     "tuning.learn_fraction: must be > 0 with tuning.scope: pooled, a certified "
     "precision_target and calibration.method: temperature"),
    ({**MINIMAL, "tuning": {"on_unreachable": "pool", "confidence": None}},
     "tuning.on_unreachable: pool needs a certified target"),
    ({**MINIMAL, "tuning": {"on_unreachable": "pool", "objective": "f1"}},
     "tuning.on_unreachable: pool needs a certified target"),
    ({**MINIMAL, "tuning": {"on_unreachable": "pool", "scope": "pooled"}},
     "tuning.on_unreachable: pool needs tuning.scope: per_class"),
    ({**MINIMAL, "tuning": {"on_unreachable": "pool", "learn_fraction": 0}},
     "tuning.learn_fraction: must be > 0 with tuning.on_unreachable: pool"),
    (_with("tuning", "classes", {"person": {"on_unreachable": "pool"}}),
     "tuning.classes.person.on_unreachable: pool is set for all classes at once"),
    ({**MINIMAL, "outputs": {}}, "outputs: unknown key (did you mean output?)"),
    (_with("tuning", "target_precison", 0.9),
     "tuning.target_precison: unknown key (did you mean target_precision?)"),
    (_with("tuning", "colour", 1), "tuning.colour: unknown key (known keys: beta, c_fn"),
    ({**MINIMAL, "tuning": [1, 2]}, "tuning: must be a mapping"),
    ([1, 2], "(top level): must be a mapping"),
]


@pytest.mark.parametrize("doc, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_gives_one_line_naming_file_and_key(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(TfcalError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "model:\n  saved_model: [unclosed\n")
    with pytest.raises(TfcalError, match=r"cfg\.yaml: invalid YAML \(line \d+\)"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(TfcalError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_default_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    # Run from elsewhere: the default output.dir and export.dir sit beside the config, like
    # every relative path written in it.
    sub = tmp_path / "job"
    sub.mkdir()
    path = _write(sub, MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.output.dir == sub.resolve() / "runs" / "example"
    assert cfg.export.dir == sub.resolve() / "export"


def test_config_and_objective_share_one_check():
    # The same rule and words at the config boundary and in the Python API.
    from tfcal.tuning.search import Objective

    with pytest.raises(ValueError, match=r"^c_fp: must be > 0, got 0$"):
        Objective(c_fp=0)
    with pytest.raises(ValueError, match=r"^target_recall: must be in \(0, 1\], got 1.5$"):
        Objective(target_recall=1.5)


def test_pooled_scope_without_a_learn_split_is_fine_when_nothing_orders_the_classes(tmp_path):
    """The learn-split rule binds only where a calibration compares classes in a certified
    pooled test: uncalibrated or point-estimate pooled runs may use every tune image."""
    for tuning, method in (({"learn_fraction": 0}, "none"),
                           ({"learn_fraction": 0, "confidence": None}, "temperature"),
                           ({"learn_fraction": 0, "objective": "f1"}, "temperature")):
        doc = {**MINIMAL, "tuning": {"scope": "pooled", **tuning},
               "calibration": {"method": method}}
        cfg = load_config(_write(tmp_path, doc))
        assert cfg.tuning.scope == "pooled" and cfg.tuning.learn_fraction == 0


def test_on_unreachable_defaults_to_pool_where_it_can_run(tmp_path):
    """Unset, `tuning.on_unreachable` is pool for a certified per-class target with a learn
    split, and disable where pool cannot run (never an error for a key the user did not set);
    a value the user sets is kept, and checked."""
    def resolved(tuning):
        return load_config(_write(tmp_path, {**MINIMAL, "tuning": tuning})).tuning.on_unreachable

    assert resolved({}) == "pool"
    assert resolved({"objective": "recall_target"}) == "pool"
    for tuning in ({"confidence": None}, {"objective": "f1"}, {"scope": "pooled"},
                   {"learn_fraction": 0}):
        assert resolved(tuning) == "disable", tuning
    assert resolved({"on_unreachable": "disable"}) == "disable"
    assert resolved({"on_unreachable": "best_effort"}) == "best_effort"
