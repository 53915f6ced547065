"""Tests of tfcal.calibration.box_platt: the size feature, the fit against a known truth, the
shrinkage to the class-only fit, and the pre-filter bound (hand-derived)."""

import math

import numpy as np
import pytest

from tfcal import calibration as cal
from tfcal.calibration.box_platt import (AREA_MIN, BOX_SAMPLES_FACTOR, box_size_feature,
                                         box_size_feature_tf)


def _boxes_of_area(area):
    side = np.sqrt(np.asarray(area, np.float64))
    return np.stack([np.zeros_like(side), np.zeros_like(side), side, side], -1)


def test_size_feature_by_hand():
    # s = 1 + log10(clip(area, 1e-4, 1)) / 4: area 1 -> 1, 1e-2 -> 0.5, 1e-4 and below -> 0.
    boxes = _boxes_of_area([1.0, 1e-2, 1e-4, 1e-6])
    np.testing.assert_allclose(box_size_feature(boxes), [1.0, 0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(box_size_feature_tf(boxes.astype(np.float32)).numpy(),
                               [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    # Inverted and oversized boxes stay in [0, 1].
    odd = np.array([[0.5, 0.5, 0.4, 0.9], [-1.0, -1.0, 2.0, 2.0]])
    np.testing.assert_allclose(box_size_feature(odd), [0.0, 1.0])
    assert AREA_MIN == 1e-4


def _simulate(seed, n, truth, classes):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    area = 10 ** rng.uniform(-4.5, 0, n)
    boxes = _boxes_of_area(area)
    s = box_size_feature(boxes)
    c = rng.choice(len(classes), n, p=np.asarray(classes) / np.sum(classes))
    t = np.asarray(truth, np.float64)
    y = (rng.random(n) < 1 / (1 + np.exp(-(t[c, 0] * z + t[c, 1] + t[c, 2] * s)))).astype(int)
    return z, y, c, boxes


def test_fit_recovers_a_known_size_effect():
    # Seeded truth: class 0 gains +2 logits from the smallest to the largest box, class 1
    # loses 1.5; 12,000 detections each (full weight: >= 3 x 30).
    truth = [[0.8, -0.5, 2.0], [1.3, 0.4, -1.5]]
    z, y, c, boxes = _simulate(3, 24000, truth, [1, 1])
    fit = cal.fit_per_class("box_platt", z, y, c, 2, boxes=boxes, min_samples=30)
    got = np.array([fit.box_a, fit.box_b, fit.box_c]).T
    np.testing.assert_allclose(got, truth, atol=0.15)
    assert fit.weights == (1.0, 1.0) and fit.fallback_classes == []


def test_thin_classes_shrink_to_the_class_only_fit():
    # Class 1 has 45 detections: v = 45 / (3 * 30) = 0.5 of its own box fit, the rest the
    # class-only Platt fit with c = 0; class 2 has one label value: exactly the class-only fit.
    z, y, c, boxes = _simulate(4, 6000, [[1.0, 0.0, 2.0]] * 3, [1, 1, 1])
    c[:] = 0
    c[:45] = 1
    c[45:60] = 2
    y[45:60] = 0
    fit = cal.fit_per_class("box_platt", z, y, c, 3, boxes=boxes, min_samples=30)
    base = cal.fit_per_class("platt", z, y, c, 3, min_samples=30)
    own = cal.fit_per_class("box_platt", z[:45], y[:45], np.zeros(45, np.intp), 1,
                            boxes=boxes[:45], min_samples=15)  # 45 >= 3 x 15: its own fit
    v = 45 / (BOX_SAMPLES_FACTOR * 30)
    assert v == 0.5 and fit.weights[1] == pytest.approx(0.5)
    assert fit.box_c[1] == pytest.approx(v * own.box_c[0], rel=1e-6)
    assert fit.box_a[1] == pytest.approx(v * own.box_a[0] + (1 - v) * base.platt_a[1], rel=1e-6)
    assert fit.box_b[1] == pytest.approx(v * own.box_b[0] + (1 - v) * base.platt_b[1], rel=1e-6)
    assert (fit.box_a[2], fit.box_b[2], fit.box_c[2]) == pytest.approx(
        (base.platt_a[2], base.platt_b[2], 0.0))
    assert 1 in fit.fallback_classes and 2 in fit.fallback_classes


def test_box_fit_beats_the_class_only_fit_on_held_out_nll():
    truth = [[0.9, -0.3, 2.5]]
    z, y, c, boxes = _simulate(5, 8000, truth, [1])
    zt, yt, ct, bt = _simulate(6, 8000, truth, [1])
    box = cal.fit_per_class("box_platt", z, y, c, 1, boxes=boxes)
    plain = cal.fit_per_class("platt", z, y, c, 1)

    def nll(q):
        q = np.clip(q.astype(np.float64), 1e-7, 1 - 1e-7)
        return -np.mean(yt * np.log(q) + (1 - yt) * np.log1p(-q))

    assert nll(box.apply(zt, ct, bt)) < nll(plain.apply(zt, ct)) - 0.01


def test_raw_lower_bound_by_hand():
    # a = 2, b = -1, c = 1.5, threshold t = 0.5 (logit 0, lowered by 1e-4 first):
    # z >= (logit(t') - b - max(c, 0)) / a = (logit(0.4999) + 1 - 1.5) / 2; with c = -1.5 the
    # largest box term is 0 (s = 0): (logit(0.4999) + 1) / 2. The sigmoid converter moves the
    # logit bound to a probability and takes 1e-5 off.
    t = 0.5 - 1e-4
    lt = math.log(t / (1 - t))
    for c, expected in ((1.5, (lt + 1 - 1.5) / 2), (-1.5, (lt + 1) / 2)):
        got = cal.raw_score_lower_bounds([0.5], num_classes=1, method="box_platt",
                                         score_converter="identity", box_a=[2.0],
                                         box_b=[-1.0], box_c=[c]).numpy()[0]
        assert got == pytest.approx(expected - 1e-4 * (1 + abs(expected)), abs=1e-6)
    # a = 0: the score does not depend on the raw score: no bound.
    flat = cal.raw_score_lower_bounds([0.5], num_classes=1, method="box_platt", box_a=[0.0],
                                      box_b=[3.0], box_c=[0.0]).numpy()[0]
    assert flat == -np.inf


def test_box_platt_needs_boxes_and_the_others_refuse_them():
    z, y, c, boxes = _simulate(7, 200, [[1.0, 0.0, 0.0]], [1])
    with pytest.raises(ValueError, match="needs the detections' boxes"):
        cal.fit_per_class("box_platt", z, y, c, 1)
    with pytest.raises(ValueError, match="does not use boxes"):
        cal.fit_per_class("platt", z, y, c, 1, boxes=boxes)
    with pytest.raises(ValueError, match="box_a"):
        cal.get("box_platt").check_params({"box_a": [-1.0], "box_b": [0.0], "box_c": [0.0]})


@pytest.mark.slow
def test_tf_map_converts_to_builtin_tflite_ops_and_matches_on_litert():
    # The on-device export needs TFLite builtins only: the map is elementwise (SUB, MAXIMUM,
    # MUL, MINIMUM, LOG, ADD, LOGISTIC), with no searchsorted.
    litert = pytest.importorskip("ai_edge_litert.interpreter",
                                 reason="ai-edge-litert (the TFLite runtime) is not installed")
    import tensorflow as tf

    m = cal.get("box_platt")
    params = m.check_params(dict(box_a=[1.2, 0.8, 1.0], box_b=[0.1, -0.2, 0.3],
                                 box_c=[2.0, -1.5, 0.5]), 3)
    weights = {k: tf.constant(v) for k, v in m.weights(params).items()}
    n = 300

    @tf.function(input_signature=[tf.TensorSpec([n, 4], tf.float32),
                                  tf.TensorSpec([n, 4], tf.float32)])
    def calibrate(boxes, raw):
        return m.calibrate_tf(raw, weights, score_converter="sigmoid", boxes=boxes)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [calibrate.get_concrete_function()], calibrate)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = litert.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    rng = np.random.default_rng(9)
    side = 10 ** rng.uniform(-3, 0, (n, 2))
    boxes = np.concatenate([np.zeros((n, 2)), side], 1).astype(np.float32)
    raw = rng.dirichlet(np.ones(4), n).astype(np.float32)
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], boxes if "boxes" in d["name"] else raw)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, calibrate(boxes, raw).numpy(), atol=1e-6)


def test_per_box_candidate_floor_is_conservative_and_tighter():
    # Every (box, class) whose calibrated score reaches its threshold has a raw score >= its
    # box's floor; boxes at the bins' edges (s = j / 8 exactly) included. The floor of a box is
    # never below the size-free bound (min over classes of raw_lower_bounds).
    import tensorflow as tf

    m = cal.get("box_platt")
    params = m.check_params(dict(box_a=[1.3, 0.7, 2.0], box_b=[-0.2, 0.4, 0.0],
                                 box_c=[2.5, -3.0, 0.0]), 3)
    weights = m.weights(params)
    thresh = np.float32([0.4, 0.3, 0.6])
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.uniform(0, 1, 4000), np.arange(9) / 8])
    boxes = _boxes_of_area(10 ** (4 * (s - 1)))[None].astype(np.float32)
    raw = rng.uniform(0, 1, (1, s.size, 4)).astype(np.float32)
    q = cal.calibrate_scores(raw, method="box_platt", boxes=boxes, **params)
    floor = m.box_candidate_floor_tf(tf.constant(boxes), thresh, weights, num_classes=3).numpy()
    passing = (q >= thresh).any(axis=-1)
    assert passing.sum() > 100
    assert np.all(raw[..., 1:].max(-1)[passing] >= floor[passing])
    flat = m.raw_lower_bounds(thresh, weights, num_classes=3).numpy().min()
    assert np.all(floor >= flat) and floor.max() > flat + 0.05
