"""Tests for tfcal.detectors.odapi.OdapiDetector: the OD API adapter behind the Detector seam runs
every input type the OD API exporter writes, with the same outputs for the same pixels."""

from __future__ import annotations

import numpy as np
import pytest

from .odapi_test_model import NUM_BOXES, NUM_CLASSES, build_odapi_test_model, sample_image
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


def test_per_class_boxes_tune_and_export(tmp_path):
    """A SavedModel whose `raw_detection_boxes` are per class, `[B, N, K, 4]` (Faster R-CNN's
    second stage), is run, tuned with each class's own boxes, exported and verified."""
    import json

    import yaml
    from PIL import Image

    from tfcal.cli import main

    path = build_odapi_test_model(tmp_path / "frcnn", per_class_boxes=True)
    det = OdapiDetector(DetectorDescription(saved_model=str(path)))
    boxes, scores = det([sample_image(seed=3)])
    assert boxes.shape == (1, NUM_BOXES, NUM_CLASSES, 4)
    assert scores.shape == (1, NUM_BOXES, NUM_CLASSES + 1)
    assert not np.allclose(boxes[:, :, 0], boxes[:, :, 2])  # each class has its own box

    images, annotations = [], []
    (tmp_path / "images").mkdir()
    for i in range(12):
        pixels = sample_image(48, 64, seed=10 + i)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 64})
        b, s = det([pixels])
        for n in range(0, NUM_BOXES, 3):  # ground truth at the boxes of the best class
            k = int(np.argmax(s[0, n, 1:]))
            y0, x0, y1, x1 = b[0, n, k] * [48, 64, 48, 64]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": k + 1, "bbox": [float(x0), float(y0),
                                                               float(x1 - x0), float(y1 - y0)],
                                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(NUM_CLASSES)]
    (tmp_path / "gt.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": cats}))
    cfg = {"model": {"saved_model": str(path)},
           "data": {"annotations": "gt.json", "images": "images", "holdout_fraction": 0.3},
           "calibration": {"method": "none"},
           "tuning": {"confidence": None, "min_support": 1, "on_unreachable": "best_effort"},
           "output": {"dir": "run", "plots": False},
           "export": {"enabled": True, "dir": "export", "model_name": "frcnn", "verify": True}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(tmp_path / "cfg.yaml")]) == 0
    assert (tmp_path / "export" / "frcnn" / "1" / "saved_model.pb").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["summary"]["holdout"]["tp"] > 0  # matched with each class's own boxes


def test_extra_outputs_are_the_raw_rows_of_the_kept_boxes(tmp_path):
    """`ModelOptions.extra_outputs`: every detections signature also returns, per kept box, its
    index in the raw boxes and its raw score row (the OD API exporter's
    `detection_anchor_indices` and `detection_multiclass_scores`); padding rows are 0."""
    import tensorflow as tf

    from tfcal.export import ExportOptions, ModelOptions, export_handoff
    from tfcal.postprocess import PostProcessConfig

    path = build_odapi_test_model(tmp_path / "det")
    ppc = PostProcessConfig(num_classes=NUM_CLASSES, min_score_thresh=(0.3, 0.2, 0.4),
                            nms_iou=(0.5, 0.6, 0.5), max_detections_per_class=4,
                            max_total_detections=8)
    extras = ("detection_multiclass_scores", "detection_anchor_indices")
    options = ExportOptions(export_root=tmp_path / "export", model_name="det", verify=True,
                            model=ModelOptions(include_raw_outputs=True, extra_outputs=extras))
    result = export_handoff(ppc, DetectorDescription(saved_model=str(path)), options)
    loaded = tf.saved_model.load(str(result.version_dir))
    image = tf.constant(np.stack([sample_image(seed=5), sample_image(seed=6)]))
    out = loaded.signatures["serving_default"](input_tensor=image)
    enc = loaded.signatures["encoded_image"](
        encoded_image=tf.constant([tf.io.encode_png(i).numpy() for i in image]))
    raw_b, raw_s = out["raw_detection_boxes"].numpy(), out["raw_detection_scores"].numpy()
    idx, rows = out["detection_anchor_indices"].numpy(), out["detection_multiclass_scores"].numpy()
    assert rows.shape == (2, 8, NUM_CLASSES + 1) and idx.shape == (2, 8)
    for b in range(2):
        n = int(out["num_detections"][b])
        assert n > 0
        i = idx[b, :n].astype(int)
        np.testing.assert_array_equal(rows[b, :n], raw_s[b, i])
        np.testing.assert_allclose(out["detection_boxes"][b, :n], raw_b[b, i], atol=1e-6)
        cls = out["detection_classes"][b, :n].numpy().astype(int)  # label_offset 1: column + 1
        np.testing.assert_allclose(out["detection_scores"][b, :n], raw_s[b, i, cls], atol=1e-6)
        assert not rows[b, n:].any() and not idx[b, n:].any()
    for key in extras:
        np.testing.assert_allclose(enc[key], out[key], atol=1e-6)
    with pytest.raises(ValueError, match="extra_outputs"):
        ModelOptions(extra_outputs=("detection_masks",))


def test_masks_made_after_the_models_own_nms_are_refused(tmp_path):
    """A Mask R-CNN-style signature (masks for its own post-NMS detections) cannot follow the
    tuned NMS: the adapter refuses it in one line naming the output, for tuning and export."""
    import tensorflow as tf

    from tfcal.export.saved_model import load_detector

    class WithMasks(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8)])
        def serve(self, x):
            b = tf.zeros([1, 4, 4]) + tf.reduce_mean(tf.cast(x, tf.float32)) * 0.0
            return {"raw_detection_boxes": b, "raw_detection_scores": tf.zeros([1, 4, 3]),
                    "detection_masks": tf.zeros([1, 4, 8, 8])}

    model = WithMasks()
    tf.saved_model.save(model, str(tmp_path / "mrcnn"),
                        signatures={"serving_default": model.serve.get_concrete_function()})
    det = OdapiDetector(DetectorDescription(saved_model=str(tmp_path / "mrcnn"), input="x"))
    with pytest.raises(TfcalError, match=r"outputs \['detection_masks'\] are computed by the "
                                         r"model for its own post-NMS detections") as info:
        det([sample_image()])
    assert "\n" not in str(info.value)
    with pytest.raises(TfcalError, match="detection_masks"):
        load_detector(tmp_path / "mrcnn")
