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
