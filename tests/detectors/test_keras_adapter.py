"""Tests for tfcal.detectors.keras_model: a `.keras` model with raw boxes and scores outputs
behind the seam, and baked into an exported SavedModel that takes images."""

from __future__ import annotations

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.config import KerasConfig, ModelConfig
from tfcal.detectors import describe, open_detector
from tfcal.detectors.keras_model import KerasDetector
from tfcal.postprocess import PostProcessConfig

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

N, C = 6, 3  # boxes, score columns (background + 2 classes)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 3))
    f = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(x))
    corner = keras.layers.Reshape((N, 2))(keras.layers.Dense(N * 2, activation="sigmoid")(f))
    size = keras.layers.Reshape((N, 2))(keras.layers.Dense(N * 2, activation="sigmoid")(f))
    far = keras.layers.Add()([corner, size])  # may pass 1: the runner's range check's job
    boxes = keras.layers.Concatenate(name="boxes")([corner, far])  # [ymin, xmin, ymax, xmax]
    scores = keras.layers.Reshape((N, C), name="scores")(
        keras.layers.Dense(N * C, kernel_initializer="glorot_normal")(f))
    model = keras.Model(x, {"boxes": boxes, "scores": scores})
    path = tmp_path_factory.mktemp("keras") / "det.keras"
    model.save(path)
    return path, model


def _keras_model_config(path, **keys):
    return ModelConfig(format="keras", path=path, keras=KerasConfig(**keys),
                       score_converter="identity")


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(2)]


def test_outputs_are_the_model_on_resized_images(keras_file):
    path, model = keras_file
    det = open_detector(_keras_model_config(path))
    assert isinstance(det, KerasDetector) and det.batchable
    images = _images()
    boxes, scores = det(images)
    x = tf.image.resize(tf.cast(np.stack(images), tf.float32), (32, 32))  # the input size
    ref = model(x)
    assert boxes.shape == (2, N, 4) and scores.shape == (2, N, C)
    np.testing.assert_allclose(boxes, ref["boxes"], atol=1e-6)
    np.testing.assert_allclose(scores, ref["scores"], atol=1e-6)
    graph = det.serving_graph()
    assert graph.info.input_type == "image_tensor" and graph.info.raw_scores_shape[-1] == C
    b, s = graph.raw_fn(tf.constant(np.stack(images)))
    np.testing.assert_allclose(b, boxes, atol=1e-5)
    np.testing.assert_allclose(s, scores, atol=1e-5)
    # A fresh detector first run inside a trace loads eagerly (a Keras model loaded inside a
    # tf.function trace would run with other weights).
    traced = tf.function(open_detector(_keras_model_config(path)).raw_fn)(
        tf.constant(np.stack(images)))
    np.testing.assert_allclose(traced[1], scores, atol=1e-5)
    d = describe(_keras_model_config(path))
    assert d.format == "keras" and d.layout["boxes_output"] == "boxes"
    other = _keras_model_config(path, scores_output="other")
    assert d.fingerprint() != describe(other).fingerprint()


def test_every_serving_input_type_gives_the_adapter_outputs(keras_file):
    from tfcal.detectors.base import INPUT_TYPES
    from tfcal.detectors.odapi import encode_example

    det = open_detector(_keras_model_config(keras_file[0]))
    images = _images(seed=2)
    boxes, scores = det(images)
    png = [tf.io.encode_png(im).numpy() for im in images]
    feeds = {"image_tensor": np.stack(images), "float_image_tensor": np.stack(images) * 1.0,
             "encoded_image_string_tensor": np.array(png, dtype=object),
             "tf_example": np.array([encode_example(p) for p in png], dtype=object)}
    for input_type in INPUT_TYPES:
        graph = det.serving_graph(input_type=input_type)
        assert graph.info.input_type == input_type
        b, s = graph.raw_fn(tf.constant(feeds[input_type]))
        np.testing.assert_allclose(b, boxes, atol=1e-5, err_msg=input_type)
        np.testing.assert_allclose(s, scores, atol=1e-5, err_msg=input_type)
        ref = graph.reference({"input_tensor": feeds[input_type]})
        np.testing.assert_allclose(ref["raw_detection_scores"], scores, atol=1e-5)


def test_missing_outputs_are_named(keras_file):
    det = open_detector(_keras_model_config(keras_file[0], scores_output="logits"))
    with pytest.raises(TfcalError, match=r"outputs 'boxes' and 'logits'.*not found \(has "
                                         r"\['boxes', 'scores'\]\)"):
        det(_images())


@pytest.mark.slow
def test_exported_model_takes_images_and_runs_the_tuned_postprocessing(tmp_path, keras_file):
    from tfcal.export import export_detector
    from tfcal.layers import PostProcessor

    path, _ = keras_file
    cfg = _keras_model_config(path)
    ppc = PostProcessConfig(num_classes=C - 1, score_converter="identity",
                            min_score_thresh=(0.3, 0.2), nms_iou=(0.5, 0.6),
                            max_detections_per_class=4, max_total_detections=5)
    export_detector(describe(cfg), ppc, tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    images = _images(seed=1)[:1]
    out = served(input_tensor=tf.constant(np.stack(images)))
    boxes, scores = open_detector(cfg)(images)
    want = PostProcessor.from_postprocess_config(ppc)(tf.constant(boxes), tf.constant(scores))
    for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        np.testing.assert_allclose(out[key].numpy(), tf.cast(want[key], tf.float32).numpy(),
                                   atol=1e-5, err_msg=key)


def test_a_keras_yolo_head_through_the_yolo_adapter(tmp_path):
    from tfcal.detectors.yolo import LayoutChoices, YoloDetector, resolve_layout
    from tfcal.handoff import DetectorDescription

    from .test_yolo import _np_letterbox_decode

    keras.utils.set_random_seed(1)
    k, n = 2, 5
    x = keras.Input((32, 32, 3))
    f = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Reshape((4 + k, n))(keras.layers.Dense((4 + k) * n,
                                                               activation="sigmoid")(f))
    model = keras.Model(x, head)
    path = tmp_path / "yolo.keras"
    model.save(path)
    det = YoloDetector(DetectorDescription(
        saved_model=str(path), format="yolo",
        layout=resolve_layout(path, LayoutChoices(layout="boxes_first", box_units="normalized"))))
    image = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    boxes, scores = det([image])
    # 24 x 32 into 32 x 32: no resize, 4 gray rows above and below (hand-derived).
    padded = np.concatenate([np.full((4, 32, 3), 114, np.uint8), image,
                             np.full((4, 32, 3), 114, np.uint8)])[None] / 255.0
    raw = model(padded.astype(np.float32)).numpy()[0].T  # [N, 4 + K]
    np.testing.assert_allclose(boxes[0], _np_letterbox_decode(raw[:, :4] * 32.0, 24, 32, 32, 32),
                               atol=1e-5)
    np.testing.assert_allclose(scores[0], raw[:, 4:], atol=1e-6)


def test_export_input_type_from_the_config(tmp_path, keras_file):
    """`export.input_type` chooses the served input of a Keras (or YOLO) detector: here JPEG/PNG
    strings in, the same detections as the adapter on the decoded images."""
    import yaml

    from tfcal.cli import main
    from tfcal.layers import PostProcessor

    path, _ = keras_file
    cfg = _keras_model_config(path)
    ppc = PostProcessConfig(num_classes=C - 1, score_converter="identity",
                            min_score_thresh=(0.3, 0.2), nms_iou=(0.5, 0.6),
                            max_detections_per_class=4, max_total_detections=5)
    ppc.save(tmp_path / "run" / "postprocess.json")
    describe(cfg).save(tmp_path / "run" / "detector.json")
    doc = {"model": {"format": "keras", "path": str(path), "score_converter": "identity"},
           "data": {"annotations": "unused.json"}, "output": {"dir": "run"},
           "export": {"dir": "export", "model_name": "det", "verify": False,
                      "input_type": "encoded_image_string_tensor"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    assert main(["export", str(tmp_path / "cfg.yaml")]) == 0
    served = tf.saved_model.load(str(tmp_path / "export" / "det" / "1"))
    fn = served.signatures["serving_default"]
    (key, spec), = fn.structured_input_signature[1].items()
    assert spec.dtype == tf.string
    images = _images(seed=2)[:1]
    out = fn(**{key: tf.constant([tf.io.encode_png(images[0]).numpy()])})
    boxes, scores = open_detector(cfg)(images)
    want = PostProcessor.from_postprocess_config(ppc)(tf.constant(boxes), tf.constant(scores))
    for k in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        np.testing.assert_allclose(out[k].numpy(), tf.cast(want[k], tf.float32).numpy(),
                                   atol=1e-5, err_msg=k)
