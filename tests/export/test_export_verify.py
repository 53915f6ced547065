"""Tests for tfcal.export.verify, and the end-to-end export of the shared real COCO detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from .odapi_test_model import build_odapi_test_model
from .odapi_test_model import encode_png
from .odapi_test_model import sample_image
from tfcal.export import saved_model
from tfcal.export import serving
from tfcal.export import verify
from tfcal.layers import PostProcessor

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
NANODET = SHARED / "models" / "nanodet_odapi"
COCO_TINY = SHARED / "data" / "coco_val2017_tiny"


@pytest.mark.parametrize("bad, message", [
    (dict(atol=-1e-5), "atol: expected a finite number >= 0"),
    (dict(timeout=0), "timeout: expected a finite number > 0"),
    (dict(run_saved_model_cli="no"), "run_saved_model_cli: expected true or false"),
])
def test_verify_options_are_validated_once(bad, message):
    with pytest.raises(ValueError, match=message):
        verify.VerifyOptions(**bad)


def test_verification_sample_needs_inputs_and_bytes():
    with pytest.raises(ValueError, match="inputs: expected a non-empty mapping"):
        verify.VerificationSample(inputs={})
    with pytest.raises(TypeError, match="encoded_images: expected bytes"):
        verify.VerificationSample(inputs={"x": np.zeros(1)}, encoded_images=["a.png"])


@pytest.mark.slow
def test_read_signature_specs(served):
    specs = verify.read_signature_specs(served.version_dir)
    assert set(specs) == {"serving_default", "encoded_image", "postprocess_only", "metadata"}
    assert specs["serving_default"]["inputs"] == {"input_tensor": ("uint8", (None, None, None, 3))}
    assert specs["serving_default"]["outputs"]["num_detections"] == ("float32", (None,))
    assert specs["metadata"] == {
        "inputs": {"request": ("string", (None,))},
        "outputs": {"postprocess_config": ("string", (None,))},
    }


@pytest.mark.slow
def test_verification_catches_a_different_config(served, postprocess_config):
    # The model holds thresholds (0.3, 0.4, 0.2); checking it against 0.9 must fail parity.
    other = postprocess_config.replace(min_score_thresh=(0.9,))
    feed = serving.serving_input(served.export.detector, sample_image(seed=1))
    report = verify.verify_export(
        served.version_dir,
        other,
        verify.VerificationSample(inputs=feed),
        served.export.detector,
        verify.VerifyOptions(run_saved_model_cli=False, raise_on_failure=False),
    )
    failed = {name for name, ok, _ in report.checks if not ok}
    assert {"metadata asset", "metadata signature value", "fresh_process num_detections"} <= failed
    assert not report.passed
    with pytest.raises(
        verify.ExportVerificationError, match="verification failed: .*metadata asset"
    ):
        verify.verify_export(
            served.version_dir,
            other,
            verify.VerificationSample(inputs=feed),
            served.export.detector,
            verify.VerifyOptions(run_saved_model_cli=False),
        )


@pytest.mark.slow
def test_encoded_image_string_tensor_detector(tmp_path, postprocess_config):
    det = build_odapi_test_model(tmp_path / "det", "encoded_image_string_tensor")
    image = sample_image(height=30, width=50, seed=7)
    result = serving.export_for_serving(
        det, postprocess_config, tmp_path / "export", "enc", warmup_images=[encode_png(image)]
    )
    assert result.export.detector.input_type == "encoded_image_string_tensor"
    assert result.verification.passed and "saved_model_cli" in result.verification.max_abs_diff
    specs = verify.read_signature_specs(result.version_dir)
    assert specs["serving_default"]["inputs"] == {"input_tensor": ("string", (None,))}
    (log,) = serving.read_warmup_requests(result.warmup_requests)
    assert tf.make_ndarray(log.predict_log.request.inputs["input_tensor"]).tolist() == [
        encode_png(image)
    ]


@pytest.mark.slow
def test_nanodet_export_reload_parity(tmp_path):
    if not (NANODET / "saved_model.pb").is_file():
        pytest.skip(f"real detector not found at {NANODET} (shared models folder absent)")
    images = sorted((COCO_TINY / "images").glob("*.jpg"))[:3]
    if len(images) < 3:
        pytest.skip(f"COCO images not found under {COCO_TINY / 'images'}")
    from tfcal.postprocess import PostProcessConfig

    # The detector's own post-processing, plus a temperature and tighter per-class numbers.
    ious = tuple(0.6 if k % 2 else 0.5 for k in range(90))
    config = PostProcessConfig(
        num_classes=90,
        calibration="temperature",
        calibration_params={"temperature": (1.2,)},
        min_score_thresh=(0.05,),
        nms_iou=ious,
        max_detections_per_class=100,
        max_total_detections=100,
        metadata={"data_fingerprint": "coco_val2017_tiny", "target": "demo"},
    )
    result = serving.export_for_serving(
        NANODET, config, tmp_path / "export", "nanodet", warmup_images=images[:1]
    )
    report = result.verification
    assert report.passed, report.failures()
    assert result.export.detector.batch_size == 1 and result.export.detector.detector_nms_ops == 0
    assert report.nms_ops["serving_default"] == report.nms_ops["postprocess_only"]
    # Reload in this process and check every image, and encoded_image on all three at once.
    loaded = tf.saved_model.load(str(result.version_dir))
    original = tf.saved_model.load(str(NANODET)).signatures["serving_default"]
    layer = PostProcessor.from_postprocess_config(config)
    encoded = [p.read_bytes() for p in images]
    batch = loaded.signatures["encoded_image"](encoded_image=tf.constant(encoded))
    for i, data in enumerate(encoded):
        x = tf.io.decode_jpeg(data, channels=3)[tf.newaxis]
        raw = original(input_tensor=x)
        want = layer(raw["raw_detection_boxes"], raw["raw_detection_scores"])
        got = loaded.signatures["serving_default"](input_tensor=x)
        assert int(got["num_detections"][0]) == int(want["num_detections"][0]) > 0
        for key in saved_model.DETECTION_KEYS:
            np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-5)
            np.testing.assert_allclose(batch[key].numpy()[i], got[key].numpy()[0], atol=1e-5)
    meta = loaded.signatures["metadata"](request=tf.constant([""]))["postprocess_config"]
    meta = json.loads(meta[0].numpy())
    assert meta["provenance"]["data_fingerprint"] == "coco_val2017_tiny"


@pytest.mark.slow
def test_box_dependent_calibration_exports_and_verifies(tmp_path, image_detector):
    # box_platt reads each box in the serving graph; the exported model must reproduce the
    # post-processing layer on the detector's raw outputs (the verification's parity checks).
    from tfcal.postprocess import PostProcessConfig

    config = PostProcessConfig(num_classes=3, calibration="box_platt",
                               calibration_params=dict(box_a=(1.2, 0.8, 1.0),
                                                       box_b=(0.1, -0.2, 0.3),
                                                       box_c=(2.0, -1.5, 0.5)),
                               min_score_thresh=(0.3, 0.4, 0.2), nms_iou=(0.5, 0.6, 0.5),
                               max_detections_per_class=5, max_total_detections=10)
    result = serving.export_for_serving(image_detector, config, tmp_path / "export", "det",
                                        warmup_images=[sample_image(seed=1)])
    assert result.verification.passed, result.verification.failures()
