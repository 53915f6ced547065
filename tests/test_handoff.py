"""Tests of tfcal.handoff: the detector description record and the fingerprint check."""

from __future__ import annotations

import pytest

from tfcal import TfcalError
from tfcal.handoff import DetectorDescription, check_fingerprint
from tfcal.postprocess import PostProcessConfig


def test_the_record_round_trips_through_its_file(tmp_path):
    d = DetectorDescription(saved_model=tmp_path / "det", category_ids=(1, 2, -1),
                            model_fingerprint="ab" * 32, warmup_image=tmp_path / "a.jpg")
    assert d.saved_model == str(tmp_path / "det")  # paths are kept as strings (JSON)
    d.save(tmp_path / "detector.json")
    assert DetectorDescription.load(tmp_path / "detector.json") == d


@pytest.mark.parametrize("fields, error", [
    ({"box_format": "xywh"}, "box_format: expected one of"),
    ({"score_converter": "tanh"}, "score_converter: expected one of"),
    ({"label_offset": -1}, "label_offset: expected an int >= 0"),
    ({"category_ids": (1, -2)}, "category_ids: expected an int >= -1"),
    ({"raw_boxes": ""}, "raw_boxes: must be a non-empty string"),
])
def test_a_bad_record_is_refused_when_built(fields, error):
    with pytest.raises(ValueError, match=error):
        DetectorDescription(**fields)


def test_a_bad_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "detector.json"
    path.write_text('{"saved_model": "x", "colour": "red"}')
    with pytest.raises(TfcalError, match=rf"{path}: not a detector description: unknown keys "
                                         r"\['colour'\]"):
        DetectorDescription.load(path)


def test_the_fingerprint_check_compares_only_models():
    ppc = PostProcessConfig(num_classes=1, metadata={"model_fingerprint": "a" * 64})
    check_fingerprint(ppc, "p.json", "a" * 64, "model.saved_model m")
    check_fingerprint(ppc, "p.json", None, "model.saved_model m")  # no model on disk
    check_fingerprint(ppc, "p.json", "raw_outputs:" + "b" * 64, "model.saved_model m")
    with pytest.raises(TfcalError, match=r"model.saved_model m: model fingerprint bbbb.*differs "
                                         r"from the one tuned \(p.json metadata"):
        check_fingerprint(ppc, "p.json", "b" * 64, "model.saved_model m")


def test_detector_description_formats_round_trip_and_old_files_read_as_odapi(tmp_path):
    from tfcal.handoff import DetectorDescription

    old = {"saved_model": "det", "signature": "serving_default", "input": "input_tensor",
           "raw_boxes": "raw_detection_boxes", "raw_scores": "raw_detection_scores",
           "box_format": "yxyx_normalized", "score_converter": "sigmoid",
           "background_column": True, "label_offset": 1, "category_ids": [1, 2],
           "model_fingerprint": "", "warmup_image": None, "input_dtype": "uint8"}
    d = DetectorDescription.from_dict(old)
    assert d.format == "odapi" and d.layout == {}
    model = tmp_path / "m.tflite"
    model.write_bytes(b"tflite bytes")
    yolo = DetectorDescription(saved_model=str(model), format="yolo",
                               box_format="cxcywh_normalized", background_column=False,
                               layout={"backend": "tflite", "layout": "boxes_first",
                                       "input_size": None})
    path = yolo.save(tmp_path / "detector.json")
    again = DetectorDescription.load(path)
    assert again == yolo and again.fingerprint() == yolo.fingerprint()
    changed = DetectorDescription(**{**yolo.to_dict(), "layout": {"backend": "tflite",
                                                                  "layout": "boxes_last"}})
    assert changed.fingerprint() != yolo.fingerprint()  # the cache key covers the layout
    before = yolo.fingerprint()
    model.write_bytes(b"other bytes")
    assert DetectorDescription.load(path).fingerprint() != before  # and the model's bytes
    with pytest.raises(ValueError, match="format"):
        DetectorDescription(format="onnx")
