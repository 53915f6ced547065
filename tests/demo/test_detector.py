"""Tests of the committed demo detector `tfcal/demo/assets/detector` and its training helpers."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from box_reference import iou
from tfcal.demo import data as shapes
from tfcal.demo import train_detector

DETECTOR = Path(train_detector.__file__).resolve().parent / "assets" / "detector"
NUM_CELLS = 256


@pytest.fixture(scope="module")
def signature():
    assert (DETECTOR / "saved_model.pb").exists(), f"no committed detector at {DETECTOR}"
    return tf.saved_model.load(str(DETECTOR)).signatures["serving_default"]


def test_saved_model_is_small():
    assert (DETECTOR / "saved_model.pb").exists(), f"no committed detector at {DETECTOR}"
    assert train_detector.saved_model_size(DETECTOR) < 5 * 2**20


def test_signature_has_od_api_names_dtypes_and_shapes(signature):
    (inp,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == ["input_tensor"]
    assert inp.dtype == tf.uint8 and inp.shape.as_list() == [1, None, None, 3]
    outputs = signature.structured_outputs
    expected = {
        "raw_detection_boxes": [1, NUM_CELLS, 4],
        "raw_detection_scores": [1, NUM_CELLS, shapes.NUM_CLASSES + 1],
        "detection_boxes": [1, 100, 4],
        "detection_scores": [1, 100],
        "detection_classes": [1, 100],
        "num_detections": [1],
    }
    assert set(outputs) == set(expected)
    for name, shape in expected.items():
        assert outputs[name].dtype == tf.float32, name
        assert outputs[name].shape.as_list() == shape, name


def test_runs_on_generated_images_and_finds_the_shapes(signature):
    # Held-out scenes (seed 7 was not used for training); several sizes exercise the resize.
    scenes = shapes.render_scenes(3, seed=7) + shapes.render_scenes(
        1, image_size=(96, 160), seed=8)
    found = total = 0
    for scene in scenes:
        out = signature(input_tensor=tf.constant(scene.image[None]))
        raw_scores = out["raw_detection_scores"].numpy()
        raw_boxes = out["raw_detection_boxes"].numpy()
        assert np.all(raw_scores[..., 0] == 0) and np.all((raw_scores >= 0) & (raw_scores <= 1))
        assert np.all((raw_boxes >= 0) & (raw_boxes <= 1))
        n = int(out["num_detections"][0])
        classes = out["detection_classes"][0, :n].numpy()
        scores = out["detection_scores"][0, :n].numpy()
        assert np.all(np.isin(classes, [1, 2, 3, 4, 5])) and np.all(np.diff(scores) <= 0)
        h, w = scene.image.shape[:2]
        boxes = out["detection_boxes"][0, :n].numpy() * [h, w, h, w]
        keep = scores >= 0.2
        for (x, y, bw, bh), cat in zip(scene.boxes, scene.category_ids):
            gt = np.array([y, x, y + bh, x + bw])
            total += 1
            found += any(c == cat and iou(b, gt) > 0.5
                         for b, c in zip(boxes[keep], classes[keep]))
    # Far better than chance: most objects get a correct-class detection at IoU > 0.5.
    assert total > 5 and found / total >= 0.6


def test_targets_assign_every_object_its_own_cell():
    scenes = shapes.render_scenes(5, seed=5)
    classes, boxes = train_detector.build_targets(scenes)
    assert classes.shape == (5, NUM_CELLS) and boxes.shape == (5, NUM_CELLS, 4)
    for n, scene in enumerate(scenes):
        # Every category present in the scene owns at least one cell.
        assert set(np.unique(classes[n][classes[n] > 0])) == set(scene.category_ids.tolist())
        pos = classes[n] > 0
        assert np.all(boxes[n][pos, 2] > boxes[n][pos, 0])


def test_forward_shapes_and_focal_prior():
    weights = {k: tf.constant(v) for k, v in train_detector.init_weights(0).items()}
    logits, boxes = train_detector.forward(weights, tf.zeros([2, 128, 128, 3]))
    assert logits.shape == (2, NUM_CELLS, shapes.NUM_CLASSES) and boxes.shape == (2, NUM_CELLS, 4)
    np.testing.assert_allclose(tf.sigmoid(logits).numpy(), train_detector.CLS_PRIOR, rtol=1e-3)


def test_expected_calibration_error_hand_values():
    # Two bins of 15: scores 0.9 (labels 1, 0) -> |0.5 - 0.9| = 0.4 with weight 1/2;
    # scores 0.1 (labels 0, 0) -> |0 - 0.1| = 0.1 with weight 1/2. ECE = 0.25.
    scores = np.array([0.9, 0.9, 0.1, 0.1])
    labels = np.array([1.0, 0.0, 0.0, 0.0])
    assert train_detector.expected_calibration_error(scores, labels) == pytest.approx(0.25)
