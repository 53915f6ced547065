"""Tests of tfcal.layers: config round trips, tf.function with dynamic batch, saving, semantics."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcal import calibration, ops
from tfcal.layers import (CandidateBoxes, ClassThresholds, CombinedNMS, PostProcessor,
                          ScoreCalibration)
from tfcal.postprocess import PostProcessConfig

K = 3

PP_CONFIG = PostProcessConfig(
    num_classes=K, calibration="temperature",
    calibration_params={"temperature": (1.5, 0.7, 1.1)},
    min_score_thresh=(0.3, 0.2, 0.4), class_enabled=(True, True, False), nms_iou=(0.5, 0.7, 0.5),
    max_detections_per_class=4, max_total_detections=6, label_offset=1)

# Each registered calibration method's parameters for K classes.
METHOD_PARAMS = {
    "none": {},
    "temperature": dict(temperature=[2.0, 0.5, 1.5]),
    "platt": dict(platt_a=[1.0] * K, platt_b=[0.5] * K),
    "box_platt": dict(box_a=[1.0] * K, box_b=[0.5] * K, box_c=[1.0, -1.0, 0.0]),
    "isotonic": dict(knots_x=[[0.0, 1.0], [0.2, 0.5, 0.8], [0.5]],
                     knots_y=[[0.1, 0.9], [0.0, 0.5, 1.0], [0.4]]),
}

# Every layer with every __init__ argument set to a non-default value; ScoreCalibration once
# per calibration method, with that method's parameters (its `**kwargs` beside Layer's).
LAYER_CASES = [
    *[(ScoreCalibration, dict(score_converter="identity", background_column=False,
                              method=method, num_classes=K, **METHOD_PARAMS[method]))
      for method in calibration.names()],
    (ClassThresholds, dict(min_score_thresh=[0.1, 0.2, 0.3], class_enabled=[True, False, True],
                           num_classes=K)),
    (CombinedNMS, dict(iou_threshold=[0.4, 0.6, 0.4], max_detections_per_class=7,
                       max_total_detections=9, score_threshold=0.05, clip_boxes=True,
                       class_agnostic=False, label_offset=0, class_ids=[1, 7, 90],
                       soft_nms_sigma=[0.0, 0.5, 0.3], clip_window=[0.0, 0.1, 0.9, 1.0],
                       change_coordinate_frame=True)),
    (CandidateBoxes, dict(raw_lower_bounds=[0.2, -np.inf, np.inf], background_column=False)),
    (PostProcessor, dict(postprocess_config=PP_CONFIG.to_dict(), candidate_prefilter=False)),
]


def _case_id(case):
    cls, kwargs = case
    return cls.__name__ + (f"-{kwargs['method']}" if cls is ScoreCalibration else "")


@pytest.mark.parametrize("cls, kwargs", LAYER_CASES, ids=[_case_id(c) for c in LAYER_CASES])
def test_get_config_holds_every_init_argument(cls, kwargs):
    params = [p for p in inspect.signature(cls.__init__).parameters
              if p not in ("self", "kwargs")]
    if cls is ScoreCalibration:
        params += list(calibration.get(kwargs["method"]).params)
    assert sorted(params) == sorted(kwargs), "the case must set every argument"
    layer = cls(**kwargs, name="probe", dtype="float32")
    config = layer.get_config()
    for p in params:
        assert config[p] == kwargs[p], p
    assert config["name"] == "probe" and "dtype" in config
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_object(f"tfcal>{cls.__name__}") is cls


def test_configs_saved_by_the_previous_version_still_load():
    # ScoreCalibration held every method's fields (the unused ones empty) and called isotonic
    # `piecewise_linear`; CombinedNMS had a `skip_empty_classes` speed switch.
    old = dict(name="score_calibration", dtype="float32", score_converter="sigmoid",
               background_column=True, method="piecewise_linear", temperature=[], platt_a=[],
               platt_b=[], num_classes=K, **METHOD_PARAMS["isotonic"])
    layer = ScoreCalibration.from_config(old)
    assert layer.method == "isotonic" and "temperature" not in layer.get_config()
    nms = CombinedNMS.from_config(dict(iou_threshold=[0.5], max_detections_per_class=100,
                                       max_total_detections=100, score_threshold=0.0,
                                       clip_boxes=False, class_agnostic=True, label_offset=1,
                                       skip_empty_classes=True))
    assert nms.max_detections_per_class is None and "skip_empty_classes" not in nms.get_config()


def make_inputs(seed, batch=2, num_boxes=12, background=True):
    rng = np.random.default_rng(seed)
    yx = rng.uniform(0, 0.8, (batch, num_boxes, 2))
    hw = rng.uniform(0.05, 0.3, (batch, num_boxes, 2))
    boxes = np.concatenate([yx, yx + hw], -1).astype(np.float32)
    raw = rng.uniform(0, 1, (batch, num_boxes, K + int(background))).astype(np.float32)
    return boxes, raw


def test_post_processor_runs_under_tf_function_with_dynamic_batch_and_static_shapes():
    layer = PostProcessor.from_postprocess_config(PP_CONFIG)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                             tf.TensorSpec([None, None, K + 1], tf.float32)])
    concrete = fn.get_concrete_function()
    shapes = {k: v.shape.as_list() for k, v in concrete.structured_outputs.items()}
    assert shapes == {"detection_boxes": [None, 6, 4], "detection_scores": [None, 6],
                      "detection_classes": [None, 6], "num_detections": [None]}
    for batch in (1, 3):
        boxes, raw = make_inputs(batch, batch=batch)
        out = fn(boxes, raw)
        eager = layer(boxes, raw)
        assert out["detection_boxes"].shape == (batch, 6, 4)
        for key in out:
            assert out[key].dtype == tf.float32
            np.testing.assert_allclose(out[key].numpy(), eager[key].numpy())
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("layer_factory, inputs", [
    (lambda: ScoreCalibration(method="platt", platt_a=[1.2] * K, platt_b=[0.1] * K),
     lambda b, r: (r,)),
    (lambda: ClassThresholds(min_score_thresh=[0.3, 0.4, 0.5]), lambda b, r: (r[..., 1:],)),
    (lambda: CombinedNMS(iou_threshold=[0.5, 0.6, 0.7], max_total_detections=5),
     lambda b, r: (b, r[..., 1:])),
    (lambda: CandidateBoxes([0.5, 0.6, 0.7]), lambda b, r: (b, r)),
], ids=["ScoreCalibration", "ClassThresholds", "CombinedNMS", "CandidateBoxes"])
def test_layers_trace_once_for_any_batch_and_output_float32(layer_factory, inputs):
    layer = layer_factory()
    boxes, raw = make_inputs(3, batch=2)
    args = inputs(tf.constant(boxes), tf.constant(raw, tf.float16))  # cast at the edge
    spec = [tf.TensorSpec([None] + a.shape[1:].as_list(), a.dtype) for a in args]
    fn = tf.function(layer, input_signature=spec)
    out_a = fn(*args)
    out_b = fn(*[a[:1] for a in args])
    assert fn.experimental_get_tracing_count() == 1
    for t in tf.nest.flatten(out_a) + tf.nest.flatten(out_b):
        assert t.dtype == tf.float32


@pytest.mark.parametrize("factory, message", [
    (lambda: ScoreCalibration(score_converter="tanh"), "score_converter"),
    (lambda: ScoreCalibration(method="histogram"), "method"),
    (lambda: ScoreCalibration(method="temperature"), "temperature: required"),
    (lambda: ScoreCalibration(method="temperature", temperature=[-1.0]), "temperature"),
    (lambda: ScoreCalibration(method="temperature", temperature=[1.0, 2.0], num_classes=3),
     "temperature"),
    (lambda: ScoreCalibration(method="platt", platt_a=[1.0], platt_b=[]), "platt_b"),
    (lambda: ScoreCalibration(method="isotonic", knots_x=[[0.5, 0.1]],
                              knots_y=[[0.1, 0.2]]), "strictly increasing"),
    (lambda: ScoreCalibration(num_classes=0), "num_classes"),
    # Arguments that would be ignored are errors, not silent no-ops.
    (lambda: ScoreCalibration(score_converter="sigmoid", temperature=[1.3]),
     "temperature: a parameter of calibration method 'temperature', which method 'none'"),
    (lambda: ScoreCalibration(method="temperature", temperature=[1.3], platt_a=[1.0] * K),
     "platt_a: a parameter of calibration method 'platt'"),
    (lambda: CombinedNMS(class_agnostic=True, max_detections_per_class=10),
     "max_detections_per_class: class_agnostic NMS has no per-class cap"),
    (lambda: ClassThresholds(min_score_thresh=1.5), "min_score_thresh"),
    (lambda: ClassThresholds(min_score_thresh=[0.1, 0.2], num_classes=3), "min_score_thresh"),
    (lambda: ClassThresholds(class_enabled=[1, 0]), "class_enabled"),
    (lambda: CombinedNMS(iou_threshold=-0.1), "iou_threshold"),
    (lambda: CombinedNMS(max_total_detections=0), "max_total_detections"),
    (lambda: CombinedNMS(max_detections_per_class=2.5), "max_detections_per_class"),
    (lambda: CombinedNMS(iou_threshold=[0.5, 0.6], class_agnostic=True), "class_agnostic"),
    (lambda: CombinedNMS(label_offset=-1), "label_offset"),
    (lambda: CombinedNMS(clip_boxes="no"), "clip_boxes"),
    (lambda: CombinedNMS(class_ids=[1, 7, 7]), "class_ids: id 7 is given to columns 1 and 2"),
    (lambda: CombinedNMS(class_ids=[1, -2]), "class_ids"),
    (lambda: CombinedNMS(class_ids=[1.0, 2.0]), "class_ids"),
    (lambda: CombinedNMS(class_ids=[1, 2 ** 24 + 1]), "class_ids"),
    (lambda: CombinedNMS(iou_threshold=[0.5, 0.6], class_ids=[1, 2, 3]), "class_ids: 3 ids"),
    (lambda: CombinedNMS(soft_nms_sigma=-0.5), "soft_nms_sigma: must be >= 0.0, got -0.5"),
    (lambda: CombinedNMS(iou_threshold=[0.5, 0.6], soft_nms_sigma=[0.1, 0.2, 0.3]),
     "soft_nms_sigma: 3 values"),
    (lambda: CombinedNMS(soft_nms_sigma=[0.1, 0.2], class_agnostic=True), "soft_nms_sigma"),
    (lambda: CombinedNMS(clip_window=[0.0, 0.5, 1.0, 0.2]), "clip_window: expected"),
    (lambda: CombinedNMS(clip_window=[0.0, 0.0, 1.0]), "clip_window: expected 4 values"),
    (lambda: CombinedNMS(change_coordinate_frame=True), "change_coordinate_frame: needs"),
    (lambda: CandidateBoxes(raw_lower_bounds=[]), "raw_lower_bounds"),
    (lambda: CandidateBoxes(raw_lower_bounds=[np.nan]), "raw_lower_bounds"),
    (lambda: PostProcessor({"num_classes": 2, "min_score_thresh": [0.1, 0.2, 0.3]}),
     "min_score_thresh"),
    (lambda: PostProcessor("config.json"), "postprocess_config"),
])
def test_bad_arguments_raise_value_error_in_init(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_wrong_column_count_is_rejected_at_call():
    layer = ScoreCalibration(method="platt", platt_a=[1.0] * K, platt_b=[0.0] * K)
    with pytest.raises(ValueError, match="columns"):
        layer(np.zeros((1, 2, K), np.float32))  # background column missing


@pytest.mark.parametrize("method, params", [
    ("none", {}), ("temperature", dict(temperature=[1.0])),
    ("platt", dict(platt_a=[1.0] * K, platt_b=[0.0] * K)),
    ("isotonic", dict(knots_x=[[0.0, 1.0]] * K, knots_y=[[0.0, 1.0]] * K)),
])
def test_identity_calibration_layer_returns_input(method, params):
    _, raw = make_inputs(4)
    raw[0, 0] = [0.0, 1.0, 0.0, 0.5]
    out = ScoreCalibration(method=method, **params)(raw).numpy()
    np.testing.assert_allclose(out, raw[..., 1:], atol=1e-6)


def test_class_thresholds_keep_scores_equal_to_the_threshold():
    scores = np.float32([[[0.3, 0.2, 0.9], [0.29, 0.19, 0.95]]])
    out = ClassThresholds(min_score_thresh=[0.3, 0.2, 0.4], class_enabled=[True, True, False])(
        scores).numpy()
    np.testing.assert_array_equal(out, np.float32([[[0.3, 0.2, 0.0], [0.0, 0.0, 0.0]]]))


def test_score_equal_to_threshold_survives_the_whole_chain():
    # sigmoid converter, no calibration: the raw 0.3 is the calibrated score and equals the
    # threshold -> emitted; 0.29999998 (the float32 below) is not; a disabled class never is.
    cfg = PostProcessConfig(num_classes=2, min_score_thresh=(0.3,), class_enabled=(True, False),
                            max_total_detections=3)
    boxes = np.float32([[[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]])
    raw = np.float32([[[0.7, 0.3, 0.0], [0.7, np.nextafter(np.float32(0.3), 0), 0.0],
                       [0.1, 0.0, 0.99]]])
    for prefilter in (True, False):
        out = PostProcessor(cfg.to_dict(), candidate_prefilter=prefilter)(boxes, raw)
        np.testing.assert_array_equal(out["num_detections"].numpy(), [1.0])
        np.testing.assert_array_equal(out["detection_scores"].numpy(), np.float32([[0.3, 0, 0]]))
        np.testing.assert_array_equal(out["detection_classes"].numpy(), [[1.0, 0, 0]])


def test_threshold_zero_keeps_positive_scores_only():
    cfg = PostProcessConfig(num_classes=1, min_score_thresh=(0.0,), max_total_detections=3)
    boxes = np.float32([[[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]])
    raw = np.float32([[[1.0, 0.0], [0.999, 1e-6], [0.0, 1.0]]])
    out = PostProcessor(cfg)(boxes, raw)
    np.testing.assert_allclose(out["detection_scores"].numpy(), [[1.0, 1e-6, 0.0]])


PREFILTER_CASES = [
    ("sigmoid", "none", {}),
    ("sigmoid", "temperature", dict(temperature=(1.6, 0.5, 1.0))),
    ("identity", "temperature", dict(temperature=(2.0,))),
    ("sigmoid", "platt", dict(platt_a=(1.2, -0.5, 0.8), platt_b=(0.3, 0.1, -0.4))),
    ("softmax", "platt", dict(platt_a=(1.2, 0.5, 0.8), platt_b=(0.3, 0.1, -0.4))),
    ("softmax", "temperature", dict(temperature=(1.3,))),
    ("sigmoid", "box_platt", dict(box_a=(1.2, 0.0, 0.8), box_b=(0.3, 0.1, -0.4),
                                  box_c=(2.5, 1.0, -3.0))),
    ("identity", "box_platt", dict(box_a=(0.9, 1.5, 0.8), box_b=(1.0, 0.1, -0.4),
                                   box_c=(-2.0, 3.0, 0.5))),
    ("identity", "isotonic", dict(knots_x=((0.0, 0.5, 1.0), (0.2, 0.6), (0.4,)),
                                          knots_y=((0.0, 0.2, 1.0), (0.1, 0.9), (0.5,)))),
    ("sigmoid", "isotonic", dict(knots_x=((0.0, 0.5, 1.0), (0.2, 0.6), (0.4,)),
                                         knots_y=((0.0, 0.35, 0.35), (0.1, 0.9), (0.5,)))),
]


@pytest.mark.parametrize("converter, method, params", PREFILTER_CASES)
def test_candidate_prefilter_gives_identical_detections(converter, method, params):
    rng = np.random.default_rng(21)
    cfg = PostProcessConfig(num_classes=K, score_converter=converter, calibration=method,
                            min_score_thresh=(0.35, 0.2, 0.5), nms_iou=(0.3, 0.6, 0.3),
                            max_detections_per_class=5, max_total_detections=8,
                            calibration_params=params)
    boxes, _ = make_inputs(22, batch=3, num_boxes=40)
    if converter == "identity":
        raw = rng.normal(-2, 2, (3, 40, K + 1)).astype(np.float32)
    else:
        raw = rng.dirichlet(np.ones(K + 1) * 0.3, size=(3, 40)).astype(np.float32)
    raw[2] = raw[2] * 0.01 if converter != "identity" else raw[2] - 20  # an image with nothing
    fast = PostProcessor(cfg)(boxes, raw)
    full = PostProcessor(cfg, candidate_prefilter=False)(boxes, raw)
    assert full["num_detections"].numpy()[:2].min() > 0, "the case must produce detections"
    for key in fast:
        np.testing.assert_array_equal(fast[key].numpy(), full[key].numpy(), err_msg=key)


def test_per_class_boxes_through_the_prefilter():
    rng = np.random.default_rng(23)
    boxes, raw = make_inputs(24, batch=2, num_boxes=30)
    per_class = boxes[:, :, None, :] + rng.normal(0, 0.02, (2, 30, K, 4)).astype(np.float32)
    fast = PostProcessor(PP_CONFIG)(per_class, raw)
    full = PostProcessor(PP_CONFIG, candidate_prefilter=False)(per_class, raw)
    assert fast["num_detections"].numpy().min() > 0
    for key in fast:
        np.testing.assert_array_equal(fast[key].numpy(), full[key].numpy(), err_msg=key)


def test_box_platt_per_class_boxes_through_the_prefilter():
    # Per-class boxes [B, N, K, 4]: each class's score reads its own box.
    rng = np.random.default_rng(25)
    boxes, raw = make_inputs(26, batch=2, num_boxes=30)
    per_class = boxes[:, :, None, :] + rng.normal(0, 0.02, (2, 30, K, 4)).astype(np.float32)
    cfg = PostProcessConfig(num_classes=K, calibration="box_platt",
                            calibration_params=dict(box_a=(1.1, 0.9, 1.0), box_b=(0.2, -0.1, 0.0),
                                                    box_c=(3.0, -2.0, 1.0)),
                            min_score_thresh=(0.4, 0.3, 0.5), nms_iou=(0.5,),
                            max_total_detections=6)
    fast = PostProcessor(cfg)(per_class, raw)
    full = PostProcessor(cfg, candidate_prefilter=False)(per_class, raw)
    assert fast["num_detections"].numpy().min() > 0
    for key in fast:
        np.testing.assert_array_equal(fast[key].numpy(), full[key].numpy(), err_msg=key)
    q = calibration.calibrate_scores_tf(raw, method="box_platt", boxes=per_class,
                                        **cfg.calibration_params).numpy()
    flat = calibration.calibrate_scores_tf(raw, method="box_platt", boxes=per_class[:, :, 0],
                                           **cfg.calibration_params).numpy()
    np.testing.assert_array_equal(q[..., 0], flat[..., 0])  # class 0 reads box 0
    assert not np.array_equal(q[..., 1], flat[..., 1])


def test_box_platt_needs_the_boxes():
    layer = ScoreCalibration(method="box_platt", **METHOD_PARAMS["box_platt"])
    with pytest.raises(ValueError, match="needs the boxes"):
        layer(np.zeros((1, 2, K + 1), np.float32))


def test_post_processor_matches_the_ops_chain():
    boxes, raw = make_inputs(8, batch=2, num_boxes=30)
    out = PostProcessor(PP_CONFIG)(boxes, raw)
    q = calibration.calibrate_scores_tf(raw, method="temperature",
                                        **PP_CONFIG.calibration_params)
    q = ops.apply_class_thresholds(q, PP_CONFIG.min_score_thresh, PP_CONFIG.class_enabled)
    ref = ops.combined_nms(boxes, q, PP_CONFIG.nms_options())
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), ref[key].numpy(), err_msg=key)
    assert 3.0 not in out["detection_classes"].numpy(), "class 3 is disabled"


def test_saved_and_reloaded_keras_model_round_trip(tmp_path):
    layer = PostProcessor.from_postprocess_config(PP_CONFIG)
    boxes_in = keras.Input((None, 4), name="boxes")
    raw_in = keras.Input((None, K + 1), name="raw_scores")
    model = keras.Model([boxes_in, raw_in], layer(boxes_in, raw_in))
    # Tuned numbers are weights: change one after building; the saved file must keep it.
    layer.class_thresholds.min_score_thresh_weight.assign([0.25, 0.2, 0.4])
    boxes, raw = make_inputs(9, batch=2, num_boxes=25)
    before = model([boxes, raw])
    path = tmp_path / "post.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded([boxes, raw])
    for key in before:
        np.testing.assert_array_equal(after[key].numpy(), before[key].numpy(), err_msg=key)
    reloaded_layer = [lay for lay in loaded.layers if isinstance(lay, PostProcessor)][0]
    assert PostProcessConfig.from_dict(
        reloaded_layer.get_config()["postprocess_config"]) == PP_CONFIG
    np.testing.assert_allclose(reloaded_layer.class_thresholds.min_score_thresh_weight.numpy(),
                               [0.25, 0.2, 0.4])
    assert all(not w.trainable for w in reloaded_layer.weights)


def test_tf_saved_model_round_trip_with_dynamic_shapes(tmp_path):
    module = tf.Module()
    module.post = PostProcessor(PP_CONFIG)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                  tf.TensorSpec([None, None, K + 1], tf.float32)])
    def serve(boxes, raw_scores):
        return module.post(boxes, raw_scores)

    module.serve = serve
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": serve})
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    for num_boxes in (5, 31):
        boxes, raw = make_inputs(num_boxes, batch=2, num_boxes=num_boxes)
        got = loaded.signatures["serving_default"](boxes=tf.constant(boxes),
                                                   raw_scores=tf.constant(raw))
        want = module.post(boxes, raw)
        for key in want:
            np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)


def test_combined_nms_on_an_empty_batch_with_no_classes():
    # tf.image.combined_non_max_suppression gives [0, max_total, ...] here; so does the layer.
    out = CombinedNMS(max_total_detections=5)(tf.zeros([0, 0, 0, 4]), tf.zeros([0, 0, 0]))
    assert out["detection_boxes"].shape == (0, 5, 4)
    assert out["detection_scores"].shape == out["detection_classes"].shape == (0, 5)
    assert out["num_detections"].shape == (0,)


def test_class_agnostic_post_processor_with_per_class_boxes():
    # One NMS over all classes: no per-class cap.
    cfg = PP_CONFIG.replace(nms_iou=(0.5,), class_agnostic=True, max_detections_per_class=None)
    boxes, raw = make_inputs(25, batch=2, num_boxes=30)
    per_class = np.repeat(boxes[:, :, None, :], K, axis=2)
    fast = PostProcessor(cfg)(per_class, raw)
    full = PostProcessor(cfg, candidate_prefilter=False)(boxes, raw)
    assert fast["num_detections"].numpy().min() > 0
    for key in fast:
        np.testing.assert_array_equal(fast[key].numpy(), full[key].numpy(), err_msg=key)
    assert 3.0 not in fast["detection_classes"].numpy(), "class 3 is disabled"


@pytest.mark.parametrize("thresh, enabled, prefiltered", [
    ((0.3,), (), True),
    ((0.001,), (), False),                        # near-zero thresholds: nothing to drop
    ((0.001, 0.3, 0.3), (), False),
    ((0.001, 0.3, 0.3), (False, True, True), True),  # the low threshold is on a disabled class
])
def test_prefilter_is_left_out_when_thresholds_are_near_zero(thresh, enabled, prefiltered):
    cfg = PP_CONFIG.replace(min_score_thresh=thresh, class_enabled=enabled, nms_iou=(0.5,))
    layer = PostProcessor(cfg)
    assert layer.uses_candidate_prefilter == prefiltered
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                             tf.TensorSpec([None, None, K + 1], tf.float32)])
    boxes, raw = make_inputs(5, batch=2, num_boxes=30)
    full = PostProcessor(cfg, candidate_prefilter=False)(boxes, raw)
    out = fn(boxes, raw)
    for key in full:
        np.testing.assert_allclose(out[key], full[key], atol=1e-6)


@pytest.mark.parametrize("converter, method, params", PREFILTER_CASES)
def test_the_stages_one_by_one_give_what_post_processor_gives(converter, method, params):
    # The README's composition: CandidateBoxes (bounds from the calibration layer) first, then
    # calibration, thresholds and NMS; the same detections as PostProcessor and as no
    # pre-filter at all.
    rng = np.random.default_rng(31)
    thresh = [0.35, 0.2, 0.5]
    cfg = PostProcessConfig(num_classes=K, score_converter=converter, calibration=method,
                            min_score_thresh=tuple(thresh), nms_iou=(0.3, 0.6, 0.3),
                            max_detections_per_class=5, max_total_detections=8,
                            calibration_params=params)
    boxes, _ = make_inputs(32, batch=2, num_boxes=40)
    raw = (rng.normal(-2, 2, (2, 40, K + 1)) if converter == "identity" else
           rng.dirichlet(np.ones(K + 1) * 0.3, size=(2, 40))).astype(np.float32)
    calibrate = ScoreCalibration(score_converter=converter, method=method, **params)
    thresholds = ClassThresholds(min_score_thresh=thresh)
    nms = CombinedNMS(iou_threshold=[0.3, 0.6, 0.3], max_detections_per_class=5,
                      max_total_detections=8)
    candidates = CandidateBoxes(calibrate.raw_lower_bounds(thresh, num_classes=K))
    kept_boxes, kept_raw = candidates(boxes, raw)
    # (A box-dependent calibration reads the boxes of the rows it calibrates; the others
    # ignore them.)
    composed = nms(kept_boxes, thresholds(calibrate(kept_raw, kept_boxes)))
    dense = nms(boxes, thresholds(calibrate(raw, boxes)))
    fused = PostProcessor(cfg)(boxes, raw)
    assert dense["num_detections"].numpy().min() > 0, "the case must produce detections"
    for key in fused:
        np.testing.assert_array_equal(composed[key].numpy(), fused[key].numpy(), err_msg=key)
        np.testing.assert_array_equal(dense[key].numpy(), fused[key].numpy(), err_msg=key)


def test_candidate_boxes_keeps_passing_boxes_in_order():
    raw = np.float32([[[0.9, 0.1, 0.0], [0.2, 0.6, 0.0], [0.1, 0.0, 0.7], [0.5, 0.3, 0.2]]])
    boxes = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    # Bounds 0.5 and 0.8: a box is kept when its best class score reaches the lowest bound (one
    # max per box; a superset of the boxes that can pass). Boxes 1 (0.6) and 2 (0.7) are kept,
    # in their order; box 0's 0.9 is background, box 3's best is 0.3.
    kept_boxes, kept_raw = CandidateBoxes([0.5, 0.8])(boxes, raw)
    np.testing.assert_array_equal(kept_boxes.numpy(), boxes[:, [1, 2]])
    np.testing.assert_array_equal(kept_raw.numpy(), raw[:, [1, 2]])
    with pytest.raises(ValueError, match="columns"):
        CandidateBoxes([0.5, 0.8, 0.1])(boxes, raw)


def test_the_stages_one_by_one_save_and_load_as_a_keras_model(tmp_path):
    thresh = [0.3, 0.2, 0.4]
    boxes_in = keras.Input((None, 4))
    raw_in = keras.Input((None, K + 1))
    calibrate = ScoreCalibration(method="temperature", temperature=[1.5, 0.7, 1.1])
    kept_boxes, kept_raw = CandidateBoxes(calibrate.raw_lower_bounds(thresh, num_classes=K))(
        boxes_in, raw_in)
    probs = ClassThresholds(min_score_thresh=thresh)(calibrate(kept_raw))
    model = keras.Model([boxes_in, raw_in],
                        CombinedNMS(iou_threshold=0.5, max_total_detections=6)(kept_boxes, probs))
    boxes, raw = make_inputs(33, batch=2, num_boxes=25)
    before = model([boxes, raw])
    model.save(tmp_path / "stages.keras")
    after = keras.models.load_model(tmp_path / "stages.keras")([boxes, raw])
    assert before["num_detections"].numpy().min() > 0
    for key in before:
        np.testing.assert_array_equal(after[key].numpy(), before[key].numpy(), err_msg=key)


# ----------------------------------------------------------------------------- class ids


def _one_box_per_column(scores_by_column):
    """One image, one disjoint box per column, scored `scores_by_column[k]` in column k only."""
    k = len(scores_by_column)
    boxes = np.float32([[[0.1 * i, 0.0, 0.1 * i + 0.05, 0.05] for i in range(k)]])
    scores = np.zeros((1, k, k), np.float32)
    scores[0, np.arange(k), np.arange(k)] = scores_by_column
    return boxes, scores


def test_combined_nms_emits_the_class_id_of_each_column_from_a_weight():
    boxes, scores = _one_box_per_column([0.9, 0.8, 0.7])
    layer = CombinedNMS(class_ids=[1, 7, 90], max_total_detections=5)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                             tf.TensorSpec([None, None, 3], tf.float32)])
    out = fn(boxes, scores)
    # Sorted by score: column 0 (0.9) -> id 1, column 1 -> 7, column 2 -> 90; padding rows 0.
    np.testing.assert_array_equal(out["detection_classes"].numpy(), [[1, 7, 90, 0, 0]])
    assert out["detection_classes"].dtype == tf.float32
    layer.class_ids_weight.assign([3.0, 5.0, 11.0])  # the weight is what runs, no retrace
    np.testing.assert_array_equal(fn(boxes, scores)["detection_classes"].numpy(),
                                  [[3, 5, 11, 0, 0]])
    assert fn.experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match="class_ids has 3 ids"):
        layer(boxes[:, :2], scores[:, :2, :2])


def test_post_processor_class_ids_survive_keras_saving(tmp_path):
    cfg = PostProcessConfig(num_classes=3, min_score_thresh=(0.5,), class_ids=(1, 7, 90),
                            max_total_detections=4)
    boxes, scores = _one_box_per_column([0.6, 0.9, 0.7])
    raw = np.concatenate([np.zeros((1, 3, 1), np.float32), scores], -1)
    inputs = [keras.Input((None, 4)), keras.Input((None, 4))]
    model = keras.Model(inputs, PostProcessor.from_postprocess_config(cfg)(*inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded([boxes, raw])["detection_classes"].numpy(),
                                  [[7, 90, 1, 0]])


def test_post_processor_never_emits_a_column_without_category():
    # Column 1 has id -1 (no category) and the best score: it is neither emitted nor counted.
    cfg = PostProcessConfig(num_classes=3, class_ids=(4, -1, 2), max_total_detections=3,
                            background_column=False)
    boxes, scores = _one_box_per_column([0.5, 0.99, 0.6])
    out = PostProcessor.from_postprocess_config(cfg)(boxes, scores)
    np.testing.assert_array_equal(out["detection_classes"].numpy(), [[2, 4, 0]])
    assert out["num_detections"].numpy().tolist() == [2.0]
    # Without class ids the OD API convention holds: column + label_offset.
    out = PostProcessor.from_postprocess_config(cfg.replace(class_ids=(), label_offset=1))(
        boxes, scores)
    np.testing.assert_array_equal(out["detection_classes"].numpy(), [[2, 3, 1]])


# ----------------------------------------------------------------------------- soft-NMS


def test_post_processor_soft_nms_holds_decayed_scores_to_class_thresholds():
    # Two boxes of column 0 with IoU 9/11, sigma 0.5: the second decays from 0.8 to
    # 0.8 exp(-(9/11)^2) = 0.40961. Threshold 0.4 keeps it, 0.41 does not (hand-derived).
    boxes = np.float32([[[0, 0, 1, 1], [0, 0.1, 1, 1.1]]])
    raw = np.float32([[[0.0, 0.9], [0.0, 0.8]]])
    for thresh, expected in ((0.4, [0.9, 0.8 * np.exp(-(9 / 11) ** 2)]), (0.41, [0.9, 0.0])):
        cfg = PostProcessConfig(num_classes=1, min_score_thresh=(thresh,), nms_iou=(0.5,),
                                soft_nms_sigma=(0.5,), max_total_detections=2)
        layer = PostProcessor.from_postprocess_config(cfg)
        fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                                 tf.TensorSpec([None, None, 2], tf.float32)])
        out = fn(boxes, raw)
        np.testing.assert_allclose(out["detection_scores"].numpy()[0], expected, rtol=1e-5)
        assert out["detection_scores"].shape == (1, 2)
        hard = PostProcessor.from_postprocess_config(cfg.replace(soft_nms_sigma=(0.0,)))
        np.testing.assert_allclose(hard(boxes, raw)["detection_scores"].numpy()[0], [0.9, 0.0])


def test_post_processor_clip_window_in_the_window_frame_under_tf_function():
    cfg = PostProcessConfig(num_classes=1, background_column=False, clip_window=(0.0, 0.0, 0.5, 0.5),
                            change_coordinate_frame=True, max_total_detections=2)
    assert PostProcessConfig.from_json(cfg.to_json()) == cfg
    layer = PostProcessor.from_postprocess_config(cfg)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                             tf.TensorSpec([None, None, 1], tf.float32)])
    boxes = np.float32([[[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]]] * 2)
    out = fn(boxes, np.float32([[[0.9], [0.95]]] * 2))
    assert out["detection_boxes"].shape == (2, 2, 4)
    np.testing.assert_allclose(out["detection_boxes"].numpy()[1], [[0.2, 0.2, 0.6, 0.6], [0] * 4],
                               atol=1e-6)
    assert out["num_detections"].numpy().tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- extra outputs


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize("method, params", [
    ("none", {}),
    # box_platt's pre-filter keeps boxes by a per-box floor: the indices must still map back.
    ("box_platt", dict(box_a=(1.0, 1.2, 0.9), box_b=(0.0, -0.3, 0.2), box_c=(1.5, -1.0, 0.5))),
])
def test_post_processor_passes_per_box_outputs_through_for_the_kept_boxes(prefilter, method,
                                                                          params):
    rng = np.random.default_rng(9)
    boxes, raw = make_inputs(9, batch=2, num_boxes=30)
    keypoints = rng.uniform(0, 1, (2, 30, 5, 2)).astype(np.float32)
    cfg = PostProcessConfig(num_classes=K, min_score_thresh=(0.6,), nms_iou=(0.5,),
                            max_total_detections=8, calibration=method,
                            calibration_params=params)
    layer = PostProcessor.from_postprocess_config(cfg, candidate_prefilter=prefilter)
    assert layer.uses_candidate_prefilter is prefilter
    fn = tf.function(lambda b, r, k: layer(b, r, extras={
        "detection_multiclass_scores": r, "detection_keypoints": k}))
    out = fn(boxes, raw, keypoints)
    plain = layer(boxes, raw)
    for key in plain:  # the detections themselves are unchanged
        if key == "detection_scores":
            # (eager and tf.function TF kernels may round a logistic 1 ulp apart)
            np.testing.assert_allclose(out[key].numpy(), plain[key].numpy(), atol=1e-6)
        else:
            np.testing.assert_array_equal(out[key].numpy(), plain[key].numpy())
    assert out["detection_keypoints"].shape == (2, 8, 5, 2)
    for b in range(2):
        n = int(out["num_detections"][b])
        assert n > 0
        for m in range(n):
            # Every raw box is distinct, so the kept box names its input row.
            (i,) = np.flatnonzero(np.all(boxes[b] == out["detection_boxes"][b, m].numpy(), 1))
            np.testing.assert_array_equal(out["detection_keypoints"][b, m], keypoints[b, i])
            np.testing.assert_array_equal(out["detection_multiclass_scores"][b, m], raw[b, i])
        assert not out["detection_keypoints"][b, n:].numpy().any()


@pytest.mark.parametrize("extras, error, message", [
    ({"detection_masks": np.zeros((1, 4, 3, 3))}, ValueError,
     "detection_masks cannot be passed through: an OD API model computes masks"),
    ({"keypoints": np.zeros((1, 4, 2))}, ValueError, "start with 'detection_'"),
    ({"detection_scores": np.zeros((1, 4))}, ValueError, "start with 'detection_'"),
    ([np.zeros((1, 4))], TypeError, "extras: expected a mapping"),
])
def test_post_processor_refuses_masks_and_bad_extra_names(extras, error, message):
    layer = PostProcessor.from_postprocess_config(PostProcessConfig(num_classes=K))
    boxes, raw = make_inputs(1, batch=1, num_boxes=4)
    with pytest.raises(error, match=message):
        layer(boxes, raw, extras=extras)
