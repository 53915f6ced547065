"""Tests for tfcal.detectors.odapi.OdapiDetector: the OD API adapter behind the Detector seam runs
every input type the OD API exporter writes, with the same outputs for the same pixels."""

from __future__ import annotations

import numpy as np
import pytest

from odapi_test_model import NUM_BOXES, NUM_CLASSES, build_odapi_test_model, sample_image
from tfcal import TfcalError
from tfcal.detectors import open_described
from tfcal.detectors.base import Detector
from tfcal.detectors.odapi import INPUT_TYPES, OdapiDetector
from tfcal.handoff import DetectorDescription


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("odapi_adapter")
    return {t: build_odapi_test_model(root / t, t) for t in INPUT_TYPES}


def test_every_input_type_gives_the_image_tensor_outputs(detectors):
    images = [sample_image(seed=3), sample_image(seed=4)]
    outputs = {}
    for input_type, path in detectors.items():
        det = open_described(DetectorDescription(saved_model=str(path)))
        assert isinstance(det, Detector) and isinstance(det, OdapiDetector)
        assert det.input_type == input_type
        assert det.num_score_columns == NUM_CLASSES + 1
        boxes, scores = det(images)
        assert boxes.shape == (2, NUM_BOXES, 4) and boxes.dtype == np.float32
        assert scores.shape == (2, NUM_BOXES, NUM_CLASSES + 1)
        outputs[input_type] = boxes, scores
    ref_boxes, ref_scores = outputs["image_tensor"]
    assert not np.allclose(ref_scores[0], ref_scores[1])  # the images differ, so do the scores
    for input_type, (boxes, scores) in outputs.items():
        # PNG is lossless, so string and Example inputs decode the very same pixels.
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-6, err_msg=input_type)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6, err_msg=input_type)


def test_fingerprint_is_the_cache_key_of_the_files_and_keys(detectors):
    path = detectors["image_tensor"]
    a = OdapiDetector(DetectorDescription(saved_model=str(path)))
    b = OdapiDetector(DetectorDescription(saved_model=str(path), raw_scores="other"))
    assert a.fingerprint() == DetectorDescription(saved_model=str(path)).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_errors_name_the_model(tmp_path, detectors):
    with pytest.raises(TfcalError, match="not a SavedModel folder"):
        OdapiDetector(DetectorDescription(saved_model=str(tmp_path)))
    det = OdapiDetector(DetectorDescription(saved_model=str(detectors["image_tensor"])),
                        num_score_columns=91)
    with pytest.raises(TfcalError, match=r"has 4 score columns, expected 91"):
        det([sample_image()])
