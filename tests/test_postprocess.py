"""Tests of tfcal.postprocess.PostProcessConfig: validation and JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfcal.postprocess import PostProcessConfig


NO_KNOTS = dict(knots_x=(), knots_y=())  # another method's empty fields, as old records hold
TEMPERATURE = dict(NO_KNOTS, calibration="temperature")


def full_config(**changes) -> PostProcessConfig:
    kw = dict(
        num_classes=3, score_converter="softmax", background_column=True,
        calibration="isotonic", knots_x=((0.0, 0.5, 1.0), (0.1, 0.9), (0.3,)),
        knots_y=((0.0, 0.4, 1.0), (0.0, 0.8), (0.5,)), min_score_thresh=(0.3, 0.25, 0.4),
        class_enabled=(True, False, True), nms_iou=(0.5, 0.6, 0.5), max_detections_per_class=50,
        max_total_detections=80, clip_boxes=True, label_offset=0, class_ids=(1, 3, 7),
        metadata={"source": "unit test", "n": 12})
    kw.update(changes)
    return PostProcessConfig.from_dict(kw)  # the calibration parameters as JSON keys


def test_json_round_trip_preserves_every_field():
    cfg = full_config()
    again = PostProcessConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["knots_x"][2] == [0.3]


def test_save_and_load(tmp_path):
    cfg = full_config()
    path = cfg.save(tmp_path / "sub" / "postprocess.json")
    assert PostProcessConfig.load(path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_defaults_and_list_inputs_become_tuples():
    cfg = PostProcessConfig(num_classes=2, min_score_thresh=[0.2, 0.3], nms_iou=np.array([0.5]),
                            class_ids=[np.int64(4), 5])
    assert cfg.min_score_thresh == (0.2, 0.3) and cfg.nms_iou == (0.5,)
    assert cfg.class_ids == (4, 5) and type(cfg.class_ids[0]) is int
    assert cfg.thresholds() == (0.2, 0.3) and cfg.ious() == (0.5, 0.5)
    assert cfg.calibration == "none" and cfg.label_offset == 1


def test_numpy_knots_from_a_fitter_are_accepted():
    kx, ky = np.array([0.0, 0.2, 1.0]), np.array([0.0, 0.1, 0.9])
    cfg = PostProcessConfig(num_classes=2, calibration="isotonic",
                            calibration_params={"knots_x": [kx, kx], "knots_y": [ky, ky]})
    assert cfg.calibration_params["knots_x"][0] == (0.0, 0.2, 1.0)
    assert PostProcessConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("changes, field", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.0), "num_classes"),
    (dict(score_converter="tanh"), "score_converter"),
    (dict(calibration="histogram"), "calibration"),
    (dict(TEMPERATURE, temperature=()), "temperature: expected 1 or 3 values"),
    (dict(TEMPERATURE, temperature=(1.0, 2.0)), "temperature: expected 1 or 3 values"),
    (dict(TEMPERATURE, temperature=(0.0,)), "temperature: each value must be > 0"),
    (dict(TEMPERATURE), "temperature: required"),
    (dict(NO_KNOTS, calibration="platt", platt_a=(1.0,), platt_b=(0.0,)), "platt_a"),
    (dict(temperature=(1.0,)), "temperature: a parameter of calibration method 'temperature'"),
    (dict(calibration="none"), "knots_x: a parameter of calibration method 'isotonic'"),
    (dict(knots_x=((0.0, 1.0),) * 2), "knots"),
    (dict(knots_x=((0.0, 0.5, 0.5), (0.1, 0.9), (0.3,))), "strictly increasing"),
    (dict(knots_y=((0.5, 0.4, 1.0), (0.0, 0.8), (0.5,))), "non-decreasing"),
    (dict(knots_x=((0.0, 0.5, 1.2), (0.1, 0.9), (0.3,))), "knots_x"),
    (dict(knots_y=((0.0, 0.4), (0.0, 0.8), (0.5,))), "knots_y"),
    (dict(min_score_thresh=(0.3, 0.2)), "min_score_thresh"),
    (dict(min_score_thresh=(1.5,)), "min_score_thresh"),
    (dict(min_score_thresh=(float("nan"),)), "min_score_thresh"),
    (dict(class_enabled=(True, False)), "class_enabled"),
    (dict(class_enabled=(1, 0, 1)), "class_enabled"),
    (dict(nms_iou=(0.5, 1.2, 0.5)), "nms_iou"),
    (dict(class_agnostic=True), "class_agnostic"),
    (dict(max_total_detections=0), "max_total_detections"),
    (dict(max_detections_per_class=True), "max_detections_per_class"),
    (dict(label_offset=-1), "label_offset"),
    (dict(class_ids=(1, 2)), "class_ids"),
    (dict(metadata={"bad": object()}), "metadata"),
    (dict(clip_boxes="yes"), "clip_boxes"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        full_config(**changes)


def test_from_json_rejects_unknown_fields_and_bad_json():
    data = full_config().to_dict()
    data["nms_iou_typo"] = [0.5]
    with pytest.raises(ValueError, match="nms_iou_typo"):
        PostProcessConfig.from_dict(data)
    with pytest.raises(ValueError, match="invalid JSON"):
        PostProcessConfig.from_json("{")
    with pytest.raises(ValueError, match="num_classes"):
        PostProcessConfig.from_json("{}")


def test_load_error_names_the_file(tmp_path):
    path = tmp_path / "pp.json"
    path.write_text('{"num_classes": 2, "nms_iou": [0.5, 0.5, 0.5]}')
    with pytest.raises(ValueError, match="pp.json: nms_iou"):
        PostProcessConfig.load(path)


def test_config_is_frozen_and_replace_validates():
    cfg = full_config()
    with pytest.raises(AttributeError):
        cfg.num_classes = 4
    assert cfg.replace(label_offset=1).label_offset == 1
    with pytest.raises(ValueError, match="label_offset"):
        cfg.replace(label_offset=-2)


# A file written before calibration methods owned their parameters (every method's fields, the
# unused ones empty, and the older name of isotonic); it must still load.
LEGACY_JSON = """{
  "num_classes": 2, "score_converter": "sigmoid", "background_column": true,
  "calibration": "piecewise_linear", "temperature": [], "platt_a": [], "platt_b": [],
  "knots_x": [[0.0, 1.0], [0.0, 0.5, 1.0]], "knots_y": [[0.1, 0.9], [0.0, 0.4, 1.0]],
  "min_score_thresh": [0.3], "class_enabled": [], "nms_iou": [0.5], "class_agnostic": false,
  "max_detections_per_class": 100, "max_total_detections": 100, "clip_boxes": false,
  "label_offset": 1, "class_ids": [1, 2], "metadata": {}
}"""


def test_records_written_before_the_method_registry_still_load():
    cfg = PostProcessConfig.from_json(LEGACY_JSON)
    assert cfg.calibration == "isotonic" and cfg.calibration_params["knots_x"][1] == (0.0, 0.5,
                                                                                     1.0)
    assert cfg.calibration_params.keys() == {"knots_x", "knots_y"}
    written = json.loads(cfg.to_json())
    # Only the method's own parameters are written, right after the method's name.
    assert list(written)[3:6] == ["calibration", "knots_x", "knots_y"]
    assert "temperature" not in written and written["calibration"] == "isotonic"
    assert PostProcessConfig.from_json(cfg.to_json()) == cfg


def test_a_stale_parameter_of_another_method_is_rejected_not_ignored():
    data = json.loads(LEGACY_JSON)
    data["temperature"] = [1.3]
    with pytest.raises(ValueError, match="temperature: a parameter of calibration method "
                                         "'temperature', which method 'isotonic' does not use"):
        PostProcessConfig.from_dict(data)


def test_replace_with_another_method_starts_from_its_own_parameters():
    cfg = full_config()
    cal = cfg.replace(calibration="temperature", temperature=(1.2,))
    assert cal.calibration_params == {"temperature": (1.2,)}
    assert cfg.replace(label_offset=1).calibration_params == cfg.calibration_params
    assert cfg.replace(knots_y=((0.1, 0.4, 1.0), (0.0, 0.8), (0.5,))).calibration_params[
        "knots_y"][0] == (0.1, 0.4, 1.0)
    with pytest.raises(ValueError, match="temperature: not a parameter of calibration method "
                                         "'isotonic'"):
        cfg.replace(temperature=(1.2,))  # isotonic would ignore it


# Written by the release before the record took its calibration parameters as one mapping: it
# loads, and serializes back byte for byte.
WRITTEN_JSON = """{
  "num_classes": 2,
  "score_converter": "sigmoid",
  "background_column": true,
  "calibration": "platt",
  "platt_a": [
    1.1,
    0.9
  ],
  "platt_b": [
    -0.2,
    0.1
  ],
  "min_score_thresh": [
    0.31,
    0.42
  ],
  "class_enabled": [
    true,
    false
  ],
  "nms_iou": [
    0.5,
    0.65
  ],
  "soft_nms_sigma": [
    0.0
  ],
  "class_agnostic": false,
  "max_detections_per_class": 50,
  "max_total_detections": 80,
  "clip_boxes": false,
  "clip_window": [
    0.0,
    0.0,
    1.0,
    1.0
  ],
  "change_coordinate_frame": false,
  "label_offset": 0,
  "class_ids": [
    3,
    -1
  ],
  "metadata": {
    "source": "unit test"
  }
}"""


def test_calibration_parameters_are_one_explicit_mapping_and_files_round_trip(tmp_path):
    cfg = PostProcessConfig.from_json(WRITTEN_JSON)
    assert cfg.calibration_params == {"platt_a": (1.1, 0.9), "platt_b": (-0.2, 0.1)}
    assert cfg.to_json() == WRITTEN_JSON
    path = tmp_path / "postprocess.json"
    path.write_text(WRITTEN_JSON + "\n")
    cfg.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    # No parameter reads as an attribute (another method's used to read as ()), and a
    # parameter is given in `calibration_params`, not as a keyword of its own.
    assert not hasattr(cfg, "platt_a") and not hasattr(cfg, "temperature")
    with pytest.raises(TypeError, match="temperature"):
        PostProcessConfig(2, calibration="temperature", temperature=(1.2,))
    with pytest.raises(ValueError, match="knots_x: not a parameter of calibration method 'platt'"):
        PostProcessConfig(2, calibration="platt", calibration_params={
            "platt_a": (1.0,) * 2, "platt_b": (0.0,) * 2, "knots_x": ()})
    with pytest.raises(ValueError, match="calibration_params: expected a mapping"):
        PostProcessConfig(2, calibration="temperature", calibration_params=[1.2])



def test_class_ids_are_binding_and_invertible():
    cfg = PostProcessConfig(num_classes=3, class_ids=(1, -1, 90), class_enabled=(True, True, False))
    assert cfg.emitted_class_ids() == (1, -1, 90)
    assert cfg.enabled() == (True, False, False)  # -1: no category, never emitted
    assert cfg.columns_of_class_ids(np.float32([90, 1, 1])).tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match="detection_classes: 2 is not the class id of a column"):
        cfg.columns_of_class_ids([2])
    # A record written without class ids means column + label_offset, as before.
    old = PostProcessConfig.from_dict({"num_classes": 2, "label_offset": 1})
    assert old.emitted_class_ids() == (1, 2) and old.enabled() == (True, True)
    assert old.columns_of_class_ids([2.0, 1.0]).tolist() == [1, 0]


@pytest.mark.parametrize("ids, message", [
    ((1, 1, 2), "id 1 is given to columns 0 and 1"),
    ((1, -2, 3), "ints in \\[-1, 16777216\\]"),
    ((1, 2), "expected 0 or 3 ints"),
    ((1, 2.0, 3), "ints"),
])
def test_bad_class_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        PostProcessConfig(num_classes=3, class_ids=ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(change_coordinate_frame=True), "change_coordinate_frame: needs a clip_window"),
    (dict(clip_window=(0.5, 0.0, 0.2, 1.0)), "clip_window: expected \\[ymin"),
    (dict(clip_window=(0.0, 0.0, 1.0)), "clip_window: expected 4 values"),
    (dict(soft_nms_sigma=(-1.0,)), "soft_nms_sigma: each value must be >= 0"),
    (dict(soft_nms_sigma=(0.1, 0.2), class_agnostic=True), "soft_nms_sigma: class_agnostic"),
])
def test_bad_nms_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostProcessConfig(num_classes=2, **kwargs)


def test_nms_options_hold_the_records_nms_numbers():
    cfg = full_config(soft_nms_sigma=(0.0, 0.5, 0.0), clip_window=(0.0, 0.1, 0.9, 1.0),
                      change_coordinate_frame=True)
    o = cfg.nms_options()
    assert (o.iou_threshold, o.soft_nms_sigma) == (cfg.nms_iou, cfg.soft_nms_sigma)
    assert (o.max_detections_per_class, o.max_total_detections) == (50, 80)
    assert o.clip_window == (0.0, 0.1, 0.9, 1.0) and o.change_coordinate_frame and o.clip_boxes
    assert o.label_offset == 0 and not o.class_agnostic
    assert PostProcessConfig(num_classes=2).nms_options().clip_window is None
