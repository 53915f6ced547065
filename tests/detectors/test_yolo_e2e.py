"""A YOLO-layout detector built here (the demo detector re-exported as `[B, 4 + K, N]` with
permuted columns, see yolo_test_model.py) through the adapter, `tfcal tune` and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from box_reference import iou, xywh_to_corners
from tfcal.cli import main
from tfcal.coco.dataset import load_coco
from tfcal.demo.data import generate_dataset
from tfcal.demo.run import demo_settings
from tfcal.detectors import open_described
from tfcal.detectors.yolo import LayoutChoices, YoloDetector, resolve_layout
from tfcal.handoff import DetectorDescription

from . import yolo_test_model
from .test_yolo import _np_letterbox_decode

tf = pytest.importorskip("tensorflow")

HEIGHT, WIDTH = 96, 128  # letterboxed into 128 x 128: no resize, 16 gray rows above and below


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return yolo_test_model.build(tmp_path_factory.mktemp("yolo_models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo_data")
    generate_dataset(root, num_images=60, image_size=(HEIGHT, WIDTH), seed=7)
    return root


def _adapter(path, **keys):
    layout = resolve_layout(path, LayoutChoices(preset="yolov8", box_units="normalized", **keys))
    return YoloDetector(DetectorDescription(saved_model=str(path), format="yolo", layout=layout))


def _reference(module, image):
    """NumPy letterbox (hand-derived: 16 rows of 114 above and below), the network, NumPy
    scale_boxes."""
    pad = np.full((16, WIDTH, 3), 114, np.uint8)
    x = np.concatenate([pad, image, pad], 0)[None].astype(np.float32) / 255.0
    raw = module.serve(tf.constant(x))["output0"].numpy()[0].T  # [N, 4 + K]
    boxes = _np_letterbox_decode(raw[:, :4] * 128.0, HEIGHT, WIDTH, 128, 128)
    return boxes, raw[:, 4:]


def _images(data, n):
    ds = load_coco(data / "instances.json", data / "images")
    return [tf.io.decode_png(tf.io.read_file(str(p))).numpy()[..., :3] for p in
            ds.image_paths[:n]]


@pytest.mark.slow
def test_backends_match_the_numpy_letterbox_reference(models, data):
    images = _images(data, 3)
    refs = [_reference(models["module"], im) for im in images]
    for key, atol in (("saved_model", 1e-5), ("tflite", 1e-4)):
        det = _adapter(models[key])
        assert det.num_score_columns == 5 and det.input_size == (128, 128)
        assert det.batchable == (key == "saved_model")
        boxes, scores = det(images[:1]) if key == "tflite" else det(images)
        for i in range(len(boxes)):
            np.testing.assert_allclose(boxes[i], refs[i][0], atol=atol, err_msg=key)
            np.testing.assert_allclose(scores[i], refs[i][1], atol=atol, err_msg=key)
    # uint8 input: quantized through the input tensor's scale; int8 weights change the numbers a
    # little, not the detections.
    boxes, scores = _adapter(models["tflite_uint8"])(images[:1])
    assert np.abs(scores[0] - refs[0][1]).mean() < 0.02
    top = refs[0][1].max(-1) > 0.5
    assert top.any() and np.abs(boxes[0][top] - refs[0][0][top]).max() < 0.05


def _tune_yolo(tmp_path, data, model_path, labels, name, *, verify=True):
    settings = demo_settings(tmp_path)
    settings["model"] = {"format": "yolo", "path": str(model_path), "batch_size": 8,
                         "yolo": {"preset": "yolov8", "box_units": "normalized",
                                  "labels": str(labels)}}
    settings["data"].update(annotations=str(data / "instances.json"), images=str(data / "images"),
                            subgroups=[])
    settings["export"].update(model_name=name, verify=verify)
    settings["tuning"].update(on_unreachable="best_effort")  # every class emits
    settings["output"]["plots"] = False
    path = tmp_path / "yolo.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert main(["tune", str(path)]) == 0
    return path


@pytest.mark.slow
def test_tune_and_export_a_yolo_saved_model_emits_category_ids(tmp_path, models, data):
    _tune_yolo(tmp_path, data, models["saved_model"], models["labels"], "yolo", verify=False)
    ppc = json.loads((tmp_path / "run" / "postprocess.json").read_text())
    # Column j is demo class PERM[j], category id PERM[j] + 1, by the labels file's names.
    assert ppc["class_ids"] == [k + 1 for k in yolo_test_model.PERM]
    assert (ppc["score_converter"], ppc["background_column"]) == ("sigmoid", False)
    described = DetectorDescription.load(tmp_path / "run" / "detector.json")
    assert described.format == "yolo" and described.layout["backend"] == "saved_model"
    assert described.box_format == "cxcywh_normalized"
    assert isinstance(open_described(described), YoloDetector)

    version = tmp_path / "export" / "yolo" / "1"
    served = tf.saved_model.load(str(version)).signatures["serving_default"]
    dataset = load_coco(data / "instances.json", data / "images")
    holdout = json.loads((tmp_path / "run" / "report.json").read_text())["split"][
        "holdout_image_ids"][:24]
    emitted = []  # (emitted class, category id of the ground truth box it finds)
    for image_id in holdout:
        path = dataset.image_paths[int(np.flatnonzero(dataset.image_ids == image_id)[0])]
        image = tf.io.decode_png(tf.io.read_file(str(path)))[..., :3]
        out = served(input_tensor=image[tf.newaxis])
        n = int(out["num_detections"][0])
        gt = [a for a in dataset.dataset["annotations"] if a["image_id"] == image_id]
        for box, cls in zip(out["detection_boxes"][0, :n].numpy(),
                            out["detection_classes"][0, :n].numpy()):
            y0, x0, y1, x1 = box * [HEIGHT, WIDTH, HEIGHT, WIDTH]
            best = max(gt, key=lambda a: iou([x0, y0, x1, y1], xywh_to_corners(a["bbox"])),
                       default=None)
            if best is not None and iou([x0, y0, x1, y1], xywh_to_corners(best["bbox"])) >= 0.5:
                emitted.append((int(cls), int(best["category_id"])))
    assert len(emitted) >= 20, emitted
    right = np.mean([c == g for c, g in emitted])
    # The served classes are the category ids themselves (the serving graph's column -> id
    # lookup), not column + label_offset.
    assert right >= 0.8, (right, emitted)


@pytest.mark.slow
def test_a_tflite_yolo_exports_its_postprocessing_alone(tmp_path, models, data):
    _tune_yolo(tmp_path, data, models["tflite"], models["labels"], "yolo", verify=False)
    described = DetectorDescription.load(tmp_path / "run" / "detector.json")
    assert described.layout["backend"] == "tflite"
    assert not (tmp_path / "export" / "yolo").exists()
    version = tmp_path / "export" / "yolo_postprocess" / "1"
    sig = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert set(sig.structured_input_signature[1]) == {"raw_detection_boxes",
                                                      "raw_detection_scores"}
