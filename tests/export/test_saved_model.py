"""Tests for tfcal.export.saved_model: input types, raw-output wrapping, pruning, signatures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from .odapi_test_model import build_odapi_test_model
from .odapi_test_model import encode_png
from .odapi_test_model import sample_image
from tfcal import TfcalError
from tfcal.export import saved_model
from tfcal.handoff import DetectorDescription
from tfcal.layers import PostProcessor

DETECTION_DTYPES = {k: tf.float32 for k in saved_model.DETECTION_KEYS}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, image_detector, postprocess_config):
    """The image detector exported with raw outputs passed through: (ExportResult, loaded)."""
    out = tmp_path_factory.mktemp("odapi") / "model"
    result = saved_model.export_detector(
        DetectorDescription(saved_model=image_detector), postprocess_config, out,
        saved_model.ModelOptions(include_raw_outputs=True)
    )
    return result, tf.saved_model.load(str(out))


@pytest.mark.parametrize(
    "dtype, shape, ops, expected",
    [
        (tf.uint8, [1, None, None, 3], {}, "image_tensor"),
        (tf.uint8, [None, None, None, 3], {}, "image_tensor"),
        (tf.float32, [None, None, None, 3], {}, "float_image_tensor"),
        (tf.string, [None], {"DecodeImage": 1}, "encoded_image_string_tensor"),
        (tf.string, [None], {"ParseExampleV2": 1}, "tf_example"),
    ],
)
def test_detect_input_type(dtype, shape, ops, expected):
    spec = tf.TensorSpec(shape, dtype, name="input_tensor")
    assert saved_model.detect_input_type(spec, ops) == expected


def test_detect_input_type_rejects_other_inputs():
    with pytest.raises(TfcalError, match="input_tensor.*int32"):
        saved_model.detect_input_type(tf.TensorSpec([None, 4], tf.int32, name="input_tensor"))


@pytest.mark.slow
def test_load_detector_prunes_its_nms(image_detector):
    # The test detector has one CombinedNonMaxSuppression behind its detection_* outputs.
    assert saved_model.count_nms_ops(image_detector) == {"CombinedNonMaxSuppression": 1}
    det = saved_model.load_detector(image_detector)
    info = det.info
    assert (info.input_name, info.input_type, info.input_dtype) == (
        "input_tensor",
        "image_tensor",
        "uint8",
    )
    assert info.input_shape == (None, None, None, 3)
    assert info.raw_boxes_shape == (None, 12, 4) and info.raw_scores_shape == (None, 12, 4)
    assert info.pruned and info.detector_nms_ops == 0
    # Same raw outputs as the detector's own signature.
    x = tf.constant(np.stack([sample_image(seed=2), sample_image(seed=3)]))
    boxes, scores = det.raw_fn(x)
    original = tf.saved_model.load(str(image_detector)).signatures["serving_default"](
        input_tensor=x
    )
    np.testing.assert_allclose(boxes, original["raw_detection_boxes"], atol=1e-6)
    np.testing.assert_allclose(scores, original["raw_detection_scores"], atol=1e-6)
    unpruned = saved_model.load_detector(image_detector, prune=False)
    assert not unpruned.info.pruned and unpruned.info.detector_nms_ops == 1


def test_load_detector_errors(tmp_path, image_detector):
    with pytest.raises(TfcalError, match="no saved_model.pb"):
        saved_model.load_detector(tmp_path)
    with pytest.raises(TfcalError, match="output 'raw_boxes' not found"):
        saved_model.load_detector(image_detector, raw_boxes_key="raw_boxes")
    with pytest.raises(TfcalError, match="signature 'detect' not found"):
        saved_model.load_detector(image_detector, signature_key="detect")
    with pytest.raises(TfcalError, match="does not match"):
        saved_model.load_detector(image_detector, input_type="tf_example")


@pytest.mark.slow
def test_export_detector_signatures_and_parity(exported, postprocess_config):
    result, loaded = exported
    assert set(result.signatures) == {
        "serving_default",
        "encoded_image",
        "postprocess_only",
        "metadata",
    }
    serve = loaded.signatures["serving_default"]
    ((name, spec),) = serve.structured_input_signature[1].items()
    assert (name, spec.dtype, spec.shape.as_list()) == (
        "input_tensor",
        tf.uint8,
        [None, None, None, 3],
    )
    for key, dtype in DETECTION_DTYPES.items():
        assert serve.structured_outputs[key].dtype == dtype
        assert serve.structured_outputs[key].shape[0] is None  # dynamic batch, batch-first

    # A batch of two images goes through in one call; detections equal the in-process layer.
    images = np.stack([sample_image(seed=4), sample_image(seed=5)])
    got = {k: v.numpy() for k, v in serve(input_tensor=tf.constant(images)).items()}
    assert got["detection_boxes"].shape == (2, 10, 4) and got["num_detections"].shape == (2,)
    layer = PostProcessor.from_postprocess_config(postprocess_config)
    want = layer(tf.constant(got["raw_detection_boxes"]), tf.constant(got["raw_detection_scores"]))
    for key in saved_model.DETECTION_KEYS:
        np.testing.assert_allclose(got[key], want[key].numpy(), atol=1e-6)
    assert got["num_detections"].min() > 0
    # Classes are 1-based ids (column + label_offset) and respect the per-class thresholds.
    n = int(got["num_detections"][0])
    classes = got["detection_classes"][0, :n].astype(int)
    thresh = np.array(postprocess_config.min_score_thresh)[classes - 1]
    assert set(classes) <= {1, 2, 3} and np.all(got["detection_scores"][0, :n] >= thresh)

    # encoded_image: PNGs of different sizes in one request equal serving_default per image.
    other = sample_image(height=40, width=30, seed=6)
    enc = loaded.signatures["encoded_image"](
        encoded_image=tf.constant([encode_png(images[0]), encode_png(other)])
    )
    single = serve(input_tensor=tf.constant(other[np.newaxis]))
    for key in saved_model.DETECTION_KEYS:
        np.testing.assert_allclose(enc[key].numpy()[0], got[key][0], atol=1e-6)
        np.testing.assert_allclose(enc[key].numpy()[1], single[key].numpy()[0], atol=1e-6)

    # postprocess_only: raw in, the same detections out.
    pp = loaded.signatures["postprocess_only"](
        raw_detection_boxes=tf.constant(got["raw_detection_boxes"]),
        raw_detection_scores=tf.constant(got["raw_detection_scores"]),
    )
    np.testing.assert_allclose(pp["detection_scores"].numpy(), got["detection_scores"], atol=1e-6)


@pytest.mark.slow
def test_exported_graph_has_no_detector_nms(tmp_path, exported, image_detector, postprocess_config):
    out = exported[0].path
    own = saved_model.count_nms_ops(out, "postprocess_only")
    # Two IoU groups (0.5: classes 1 and 3; 0.6: class 2): the PostProcessor's two NMS ops only.
    assert own == {"CombinedNonMaxSuppression": 2}
    assert saved_model.count_nms_ops(out, "serving_default") == own
    assert saved_model.count_nms_ops(out, "encoded_image") == own
    unpruned = tmp_path / "unpruned"
    saved_model.export_detector(DetectorDescription(saved_model=image_detector),
                                postprocess_config, unpruned,
                                saved_model.ModelOptions(prune=False))
    served = saved_model.count_nms_ops(unpruned, "serving_default")
    assert sum(served.values()) == sum(own.values()) + 1  # the detector's NMS is still reachable


@pytest.mark.slow
def test_metadata_signature_and_asset(exported, postprocess_config):
    result, loaded = exported
    asset = json.loads((result.path / "assets" / saved_model.METADATA_ASSET).read_text())
    out = loaded.signatures["metadata"](request=tf.constant(["", ""]))["postprocess_config"]
    assert out.shape == (2,) and out[0].numpy() == out[1].numpy()
    served = json.loads(out[0].numpy())
    assert asset == served == json.loads(json.dumps(result.metadata))
    assert served["config_sha256"] == saved_model.config_sha256(postprocess_config)
    assert served["provenance"]["data_fingerprint"] == "d00d"
    assert served["postprocess_config"]["nms_iou"] == [0.5, 0.6, 0.5]
    assert served["detector"]["input_type"] == "image_tensor"
    assert served["detector"]["detector_postprocessing_pruned"] is True


@pytest.mark.parametrize("bad, message", [
    (dict(input_type="jpeg"), "input_type: expected one of"),
    (dict(prune=1), "prune: expected true or false"),
    (dict(raw_scores_columns=0), "raw_scores_columns: expected an int >= 1"),
])
def test_model_options_are_validated_once(bad, message):
    with pytest.raises(ValueError, match=message):
        saved_model.ModelOptions(**bad)


def test_export_detector_takes_a_description(tmp_path, postprocess_config):
    with pytest.raises(TypeError, match="DetectorDescription"):
        saved_model.export_detector(str(tmp_path), postprocess_config, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_export_refuses_existing_dir(tmp_path, postprocess_config):
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(FileExistsError):
        saved_model.export_detector(None, postprocess_config, out)


@pytest.mark.slow
def test_postprocess_only_export(tmp_path, postprocess_config):
    out = tmp_path / "pp"
    result = saved_model.export_detector(None, postprocess_config, out)
    assert set(result.signatures) == {"serving_default", "metadata"}
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(size=(2, 20, 4)).astype(np.float32), axis=-1)[..., [0, 1, 2, 3]]
    boxes = np.concatenate([boxes[..., :2], boxes[..., :2] + 0.2], axis=-1)
    scores = rng.uniform(size=(2, 20, 4)).astype(np.float32)
    got = serve(raw_detection_boxes=tf.constant(boxes), raw_detection_scores=tf.constant(scores))
    want = PostProcessor.from_postprocess_config(postprocess_config)(
        tf.constant(boxes), tf.constant(scores)
    )
    for key in saved_model.DETECTION_KEYS:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("input_type", ["float_image_tensor", "tf_example"])
def test_other_input_types(tmp_path, postprocess_config, input_type):
    det_dir = build_odapi_test_model(tmp_path / "det", input_type)
    det = saved_model.load_detector(det_dir)
    assert det.info.input_type == input_type
    result = saved_model.export_detector(DetectorDescription(saved_model=det_dir),
                                         postprocess_config, tmp_path / "model")
    # tf_example detectors get no encoded_image signature (no in-graph Example writer).
    assert ("encoded_image" in result.signatures) == (input_type != "tf_example")
