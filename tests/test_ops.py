"""Tests of tfcal.ops: calibration maps, class thresholds, and NMS against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfcal import ops

# ----------------------------------------------------------------------------- NumPy reference


def np_iou(a, b):
    """IoU of two `[ymin, xmin, ymax, xmax]` boxes (corners in either order), 0 for empty union."""
    a = np.concatenate([np.minimum(a[:2], a[2:]), np.maximum(a[:2], a[2:])])
    b = np.concatenate([np.minimum(b[:2], b[2:]), np.maximum(b[:2], b[2:])])
    ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_nms(boxes, scores, iou_threshold):
    """Greedy NMS (torchvision style): highest score first, ties by lower index; drop IoU > thr."""
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        if all(np_iou(boxes[i], boxes[j]) <= iou_threshold for j in keep):
            keep.append(i)
    return keep


def np_combined_nms(boxes, scores, iou, max_per_class, max_total, score_threshold=0.0):
    """Per-class greedy NMS for one image -> sorted list of (score, column, box)."""
    num_classes = scores.shape[1]
    iou = np.broadcast_to(iou, [num_classes])
    dets = []
    for k in range(num_classes):
        cand = np.flatnonzero((scores[:, k] >= score_threshold) & (scores[:, k] > 0))
        class_boxes = boxes[:, k] if boxes.ndim == 3 else boxes
        kept = [cand[i] for i in np_nms(class_boxes[cand], scores[cand, k], iou[k])]
        dets += [(scores[i, k], k, class_boxes[i]) for i in kept[:max_per_class]]
    dets.sort(key=lambda d: -d[0])
    return dets[:max_total]


def as_sorted_rows(out, b):
    """Valid rows of image `b` as an array sorted by (score desc, class, box) for comparison."""
    n = int(out["num_detections"][b])
    rows = np.concatenate([out["detection_scores"][b, :n, None],
                           out["detection_classes"][b, :n, None],
                           out["detection_boxes"][b, :n]], axis=1)
    return rows[np.lexsort(rows.T[::-1])][::-1] if n else rows


def ref_rows(dets, label_offset=1):
    rows = np.array([[s, k + label_offset, *box] for s, k, box in dets], np.float32).reshape(-1, 6)
    return rows[np.lexsort(rows.T[::-1])][::-1] if len(rows) else rows


def boxes_near_threshold(rng, num_pairs, iou_threshold, delta=0.02):
    """Pairs of equal-size boxes whose IoU is `iou_threshold +- delta` (alternating), shuffled.

    Two w x h boxes shifted horizontally by d overlap with IoU (w - d) / (w + d), so
    d = w (1 - iou) / (1 + iou).
    """
    boxes = []
    for i in range(num_pairs):
        target = iou_threshold + (delta if i % 2 else -delta)
        y, x = rng.uniform(0, 0.7, size=2)
        h, w = rng.uniform(0.1, 0.3, size=2)
        d = w * (1 - target) / (1 + target)
        boxes += [[y, x, y + h, x + w], [y, x + d, y + h, x + w + d]]
    return np.asarray(boxes, np.float32)[rng.permutation(2 * num_pairs)]


_CALL_ARGS = ("score_threshold", "min_score_thresh", "class_ids", "return_indices")


def nms(boxes, scores, **kw):
    """`ops.combined_nms` with the `NmsOptions` fields and the call arguments as keywords."""
    call = {k: kw.pop(k) for k in _CALL_ARGS if k in kw}
    return ops.combined_nms(boxes, scores, ops.NmsOptions(**kw), **call)


def run_nms(boxes, scores, **kw):
    out = nms(tf.constant(boxes, tf.float32), tf.constant(scores, tf.float32), **kw)
    return {k: v.numpy() for k, v in out.items()}


# ----------------------------------------------------------------------------- NMS vs reference


# `sparse`: most boxes have no score above the threshold, so combined_nms drops them before NMS.
@pytest.mark.parametrize("seed, sparse", [(0, False), (1, False), (2, True), (3, True)])
def test_combined_nms_matches_numpy_reference_near_iou_threshold(seed, sparse):
    rng = np.random.default_rng(seed)
    iou = 0.5
    boxes = np.stack([boxes_near_threshold(rng, 12, iou) for _ in range(2)])  # [2, 24, 4]
    scores = rng.uniform(0, 1, size=(2, 24, 3)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.3] = 0.0
    if sparse:
        scores[rng.uniform(size=(2, 24)) < 0.7] = 0.1
    out = run_nms(boxes, scores, iou_threshold=iou, max_detections_per_class=10,
                  max_total_detections=20, score_threshold=0.2)
    for b in range(2):
        ref = np_combined_nms(boxes[b], scores[b], iou, 10, 20, score_threshold=0.2)
        np.testing.assert_allclose(as_sorted_rows(out, b), ref_rows(ref), atol=1e-6)
        assert np.all(np.diff(out["detection_scores"][b]) <= 0), "rows sorted by score"


@pytest.mark.parametrize("seed, sparse", [(0, False), (1, True), (2, True)])
def test_per_class_iou_and_per_class_boxes_match_reference(seed, sparse):
    rng = np.random.default_rng(seed)
    ious = [0.3, 0.5, 0.5, 0.7]  # three groups, one of them non-contiguous in value order
    boxes = np.stack([boxes_near_threshold(rng, 8, 0.5, delta=0.2) for _ in range(4)], axis=1)
    boxes = boxes[None]  # [1, 16, 4 classes, 4]: per-class boxes
    scores = rng.uniform(0, 1, size=(1, 16, 4)).astype(np.float32)
    scores[..., 1] = np.where(scores[..., 1] > 0.5, scores[..., 1], 0.0)
    scores[..., 2] = 0.0  # an empty class inside a group
    if sparse:
        scores[:, rng.uniform(size=16) < 0.6] = 0.0
    out = run_nms(boxes, scores, iou_threshold=ious, max_detections_per_class=5,
                  max_total_detections=12)
    ref = np_combined_nms(boxes[0], scores[0], np.asarray(ious), 5, 12)
    np.testing.assert_allclose(as_sorted_rows(out, 0), ref_rows(ref), atol=1e-6)


def test_per_class_iou_equals_running_each_class_alone():
    rng = np.random.default_rng(7)
    ious = [0.4, 0.6, 0.4, 0.8, 0.6]
    boxes = np.stack([boxes_near_threshold(rng, 10, 0.6, delta=0.25) for _ in range(3)])
    scores = rng.uniform(0, 1, size=(3, 20, 5)).astype(np.float32)
    kw = dict(max_detections_per_class=6, max_total_detections=15)
    out = run_nms(boxes, scores, iou_threshold=ious, **kw)
    alone = [run_nms(boxes, scores[:, :, k:k + 1], iou_threshold=ious[k], label_offset=k + 1,
                     **kw) for k in range(5)]
    for b in range(3):
        rows = np.concatenate([as_sorted_rows(a, b) for a in alone])
        rows = rows[np.argsort(-rows[:, 0], kind="stable")][:15]
        rows = rows[np.lexsort(rows.T[::-1])][::-1]
        np.testing.assert_allclose(as_sorted_rows(out, b), rows, atol=1e-6)


def test_class_thresholds_before_nms_equal_filtering_after_hard_nms():
    rng = np.random.default_rng(3)
    boxes = np.stack([boxes_near_threshold(rng, 10, 0.5, delta=0.1) for _ in range(2)])
    scores = rng.uniform(0, 1, size=(2, 20, 4)).astype(np.float32)
    thresh = np.array([0.2, 0.5, 0.7, 0.9], np.float32)
    kw = dict(iou_threshold=0.5, max_detections_per_class=20, max_total_detections=80)
    before = run_nms(boxes, ops.apply_class_thresholds(scores, thresh).numpy(), **kw)
    after = run_nms(boxes, scores, **kw)
    for b in range(2):
        rows = as_sorted_rows(after, b)
        keep = rows[:, 0] >= thresh[rows[:, 1].astype(int) - 1]
        np.testing.assert_array_equal(as_sorted_rows(before, b), rows[keep])


# ----------------------------------------------------------------------------- NMS golden + edges


def test_combined_nms_golden_values():
    # A = [0,0,1,1] (0.9); C = A shifted 0.1 right: IoU(A,C) = 0.9 / 1.1 = 0.818 > 0.5 -> C is
    # suppressed in class 0. B = A shifted 0.5 right: IoU(A,B) = 0.5 / 1.5 = 1/3 <= 0.5 -> kept.
    # Class 1 only scores C (0.4): nothing suppresses it (NMS is per class).
    boxes = np.array([[[0, 0, 1, 1], [0, 0.5, 1, 1.5], [0, 0.1, 1, 1.1]]], np.float32)
    scores = np.array([[[0.9, 0.0], [0.6, 0.0], [0.8, 0.4]]], np.float32)
    out = run_nms(boxes, scores, iou_threshold=0.5, max_detections_per_class=10,
                  max_total_detections=5)
    np.testing.assert_allclose(out["detection_scores"], [[0.9, 0.6, 0.4, 0.0, 0.0]])
    np.testing.assert_array_equal(out["detection_classes"], [[1, 1, 2, 0, 0]])
    np.testing.assert_allclose(out["detection_boxes"][0, :3], boxes[0, [0, 1, 2]])
    np.testing.assert_array_equal(out["detection_boxes"][0, 3:], 0.0)
    np.testing.assert_array_equal(out["num_detections"], [3.0])
    assert all(v.dtype == np.float32 for v in out.values())


def test_iou_equal_to_threshold_keeps_both():
    # IoU([0,0,1,1], [0,0,1,0.5]) = 0.5 exactly; suppression needs IoU > threshold.
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 0.5]]], np.float32)
    scores = np.array([[[0.9], [0.8]]], np.float32)
    assert run_nms(boxes, scores, iou_threshold=0.5)["num_detections"][0] == 2
    assert run_nms(boxes, scores, iou_threshold=0.49)["num_detections"][0] == 1


def test_score_threshold_equality_and_zero_scores():
    boxes = np.array([[[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]], np.float32)
    below = np.nextafter(np.float32(0.3), np.float32(0))
    scores = np.array([[[0.3], [below], [0.0]]], np.float32)
    out = run_nms(boxes, scores, score_threshold=0.3)
    # 0.3 >= 0.3 is kept; the float32 just below 0.3 is not.
    np.testing.assert_array_equal(out["detection_scores"][0, :2], np.float32([0.3, 0.0]))
    # Threshold 0: every positive score is kept, an exact 0.0 never is (0.0 means no detection).
    out = run_nms(boxes, scores, score_threshold=0.0)
    assert out["num_detections"][0] == 2
    out = run_nms(boxes, np.ones_like(scores), score_threshold=1.0)
    assert out["num_detections"][0] == 3  # 1.0 >= 1.0


def test_strict_score_threshold_is_predecessor_or_zero():
    t = ops.strict_score_threshold(0.3).numpy()
    assert t == np.nextafter(np.float32(0.3), np.float32(0)) and t < np.float32(0.3)
    assert ops.strict_score_threshold(0.0).numpy() == 0.0
    assert ops.strict_score_threshold(1e-39).numpy() == 0.0  # subnormal predecessor -> 0


@pytest.mark.parametrize("iou, agnostic", [(0.5, False), ([0.5, 0.6, 0.5], False), (0.5, True)])
def test_no_box_passes_gives_all_zero_output(iou, agnostic):
    boxes = np.random.default_rng(0).uniform(0, 1, (2, 6, 4)).astype(np.float32)
    out = run_nms(boxes, np.full((2, 6, 3), 0.1, np.float32), score_threshold=0.5,
                  max_total_detections=4, iou_threshold=iou, class_agnostic=agnostic)
    np.testing.assert_array_equal(out["num_detections"], [0, 0])
    for key in ("detection_boxes", "detection_scores", "detection_classes"):
        np.testing.assert_array_equal(out[key], 0.0)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("boxes_shape, scores_shape", [
    ([0, 0, 0, 4], [0, 0, 0]),  # an empty batch with no classes
    ([0, 0, 4], [0, 0, 0]),
    ([2, 5, 4], [2, 5, 0]),  # images and boxes, no class column
    ([2, 0, 1, 4], [2, 0, 3]),  # no boxes
])
def test_empty_inputs_give_empty_outputs_like_tf_combined_nms(boxes_shape, scores_shape,
                                                              agnostic):
    # tf.image.combined_non_max_suppression returns [batch, max_total, ...] zeros for these.
    fn = tf.function(lambda b, s: nms(b, s, max_total_detections=7,
                                                   class_agnostic=agnostic))
    out = {k: v.numpy() for k, v in fn(tf.zeros(boxes_shape), tf.zeros(scores_shape)).items()}
    batch = scores_shape[0]
    ref = tf.image.combined_non_max_suppression(
        tf.zeros(boxes_shape if len(boxes_shape) == 4 else boxes_shape[:2] + [1, 4]),
        tf.zeros(scores_shape), 5, 7)
    assert out["detection_boxes"].shape == tuple(ref.nmsed_boxes.shape) == (batch, 7, 4)
    assert out["detection_scores"].shape == out["detection_classes"].shape == (batch, 7)
    assert out["num_detections"].shape == (batch,)
    for key, value in out.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, 0.0, err_msg=key)


def test_all_equal_scores_lower_index_wins():
    # Boxes 0 and 1 coincide, as do 2 and 3; equal scores -> the lower index survives each pair.
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]], np.float32)
    boxes[0, 1] += 0.01  # tell the boxes apart in the output
    boxes[0, 3] += 0.01
    out = run_nms(boxes, np.full((1, 4, 1), 0.5, np.float32), iou_threshold=0.5)
    assert out["num_detections"][0] == 2
    kept = {tuple(b) for b in out["detection_boxes"][0, :2].round(3)}
    assert kept == {(0, 0, 1, 1), (2, 2, 3, 3)}


def test_zero_area_boxes_never_suppress():
    # A zero-area box has IoU 0 with everything (empty intersection), so all survive.
    boxes = np.array([[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0, 0, 1, 1]]], np.float32)
    scores = np.array([[[0.9], [0.8], [0.7]]], np.float32)
    out = run_nms(boxes, scores, iou_threshold=0.1)
    assert out["num_detections"][0] == 3


def test_boxes_outside_unit_square_and_clipping():
    boxes = np.array([[[-0.5, -0.2, 0.5, 0.6], [0.8, 0.9, 1.7, 1.3]]], np.float32)
    scores = np.array([[[0.9], [0.8]]], np.float32)
    raw = run_nms(boxes, scores, max_total_detections=2)
    np.testing.assert_allclose(raw["detection_boxes"][0], boxes[0])
    clipped = run_nms(boxes, scores, max_total_detections=2, clip_boxes=True)
    np.testing.assert_allclose(clipped["detection_boxes"][0], np.clip(boxes[0], 0, 1))


def test_batch_with_different_counts_per_image_is_zero_padded():
    boxes = np.tile(np.array([[0, 0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]],
                             np.float32), (3, 1, 1))
    scores = np.zeros((3, 3, 2), np.float32)
    scores[0] = [[0.9, 0], [0.8, 0], [0, 0.7]]  # 3 detections
    scores[2, 1, 1] = 0.6  # 1 detection; image 1 has none
    out = run_nms(boxes, scores, iou_threshold=[0.5, 0.7], max_total_detections=4)
    np.testing.assert_array_equal(out["num_detections"], [3, 0, 1])
    np.testing.assert_allclose(out["detection_scores"],
                               [[0.9, 0.8, 0.7, 0], [0, 0, 0, 0], [0.6, 0, 0, 0]])
    np.testing.assert_array_equal(out["detection_classes"],
                                  [[1, 1, 2, 0], [0, 0, 0, 0], [2, 0, 0, 0]])
    np.testing.assert_array_equal(out["detection_boxes"][1], 0.0)
    np.testing.assert_array_equal(out["detection_boxes"][2, 1:], 0.0)


def test_per_class_iou_merge_respects_max_total_detections():
    # 3 IoU groups x 4 separated boxes each; only the best 5 of the 12 survive the merge.
    boxes = np.array([[[i, i, i + 0.5, i + 0.5] for i in range(4)]], np.float32)
    scores = np.array([[[0.91, 0.52, 0.13], [0.84, 0.45, 0.36], [0.77, 0.68, 0.29],
                        [0.1, 0.2, 0.95]]], np.float32)
    out = run_nms(boxes, scores, iou_threshold=[0.3, 0.5, 0.7], max_total_detections=5)
    np.testing.assert_allclose(out["detection_scores"][0], [0.95, 0.91, 0.84, 0.77, 0.68])
    np.testing.assert_array_equal(out["detection_classes"][0], [3, 1, 1, 1, 2])
    assert out["num_detections"][0] == 5


def test_max_detections_per_class_and_label_offset():
    boxes = np.array([[[i, i, i + 0.5, i + 0.5] for i in range(5)]], np.float32)
    scores = np.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.5, 0.45]]],
                      np.float32)
    out = run_nms(boxes, scores, max_detections_per_class=2, max_total_detections=6,
                  label_offset=0)
    np.testing.assert_allclose(out["detection_scores"][0, :4], [0.9, 0.8, 0.45, 0.4])
    np.testing.assert_array_equal(out["detection_classes"][0, :4], [0, 0, 1, 1])


def test_class_agnostic_nms_uses_best_class_per_box():
    # Box 1 overlaps box 0 (IoU 0.818) and loses to it across classes in agnostic mode.
    boxes = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [3, 3, 4, 4]]], np.float32)
    scores = np.array([[[0.9, 0.1], [0.2, 0.8], [0.3, 0.6]]], np.float32)
    out = run_nms(boxes, scores, iou_threshold=0.5, class_agnostic=True, max_total_detections=4)
    np.testing.assert_allclose(out["detection_scores"][0], [0.9, 0.6, 0, 0])
    np.testing.assert_array_equal(out["detection_classes"][0], [1, 2, 0, 0])
    per_class = run_nms(boxes, scores, iou_threshold=0.5, max_total_detections=4)
    assert per_class["num_detections"][0] == 4  # per class nothing is suppressed


def test_combined_nms_rejects_bad_arguments():
    boxes = tf.zeros([1, 3, 4])
    scores = tf.zeros([1, 3, 2])
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(boxes, scores, iou_threshold=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(boxes, scores, iou_threshold=1.5)
    with pytest.raises(ValueError, match="class_agnostic"):
        nms(boxes, scores, iou_threshold=[0.5, 0.6], class_agnostic=True)
    with pytest.raises(ValueError, match="max_total_detections"):
        nms(boxes, scores, max_total_detections=0)
    with pytest.raises(ValueError, match="boxes"):
        nms(tf.zeros([1, 3, 3]), scores)
    # One NMS over all classes has no per-class cap: a cap that would bind is refused.
    with pytest.raises(ValueError, match="max_detections_per_class: class_agnostic NMS has no"):
        nms(boxes, scores, class_agnostic=True, max_detections_per_class=5)
    with pytest.raises(TypeError, match="options: expected an NmsOptions"):
        ops.combined_nms(boxes, scores, {"iou_threshold": 0.5})


def test_only_boxes_with_a_candidate_reach_the_nms_op():
    # 1 of 500 boxes has a score above the threshold: the op sees 1 box (the compacted batch).
    scores = np.zeros((2, 500, 3), np.float32)
    scores[0, 321, 2] = 0.9
    boxes = np.tile(np.float32([0, 0, 1, 1]), (2, 500, 1))
    fn = tf.function(lambda b, s: nms(b, s, score_threshold=0.5,
                                                   max_total_detections=3))
    out = fn(boxes, scores)
    np.testing.assert_array_equal(out["num_detections"], [1, 0])
    np.testing.assert_array_equal(out["detection_classes"][0], [3, 0, 0])
    kept, _ = ops.select_passing_boxes(boxes, scores, tf.reduce_max(scores, -1) > 0.5)
    assert kept.shape == (2, 1, 4)


def test_box_iou_matches_reference():
    rng = np.random.default_rng(5)
    a = rng.uniform(-0.2, 1.2, (6, 4)).astype(np.float32)
    b = rng.uniform(-0.2, 1.2, (5, 4)).astype(np.float32)
    ref = np.array([[np_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(ops.box_iou(a, b).numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------- score spaces and knots


def test_scores_to_logits_is_finite_at_the_ends():
    p = np.array([0.0, 1.0, 0.5], np.float32)
    z = ops.scores_to_logits(p, "sigmoid").numpy()
    # logit(1e-7) = -16.118; 1 - 1e-7 rounds to 0.99999988 in float32, logit 15.942.
    np.testing.assert_allclose(z, [-16.118095, 15.942385, 0.0], rtol=1e-6)
    assert np.all(np.isfinite(ops.scores_to_logits(p, "softmax").numpy()))
    with pytest.raises(ValueError, match="score_converter"):
        ops.scores_to_logits(p, "tanh")


def test_pad_knots_rejects_bad_rows():
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.pad_knots([[0.5, 0.5]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.pad_knots([[0.1, 0.5]], [[0.3, 0.2]])
    with pytest.raises(ValueError, match=r"knots_y\[0\]: expected 2 values"):
        ops.pad_knots([[0.1, 0.5]], [[0.3]])


# ----------------------------------------------------------------------------- thresholds


def test_apply_class_thresholds_keeps_equality_and_zeroes_disabled():
    scores = np.array([[[0.3, 0.5, 0.9], [0.29999998, 0.0, 0.1]]], np.float32)
    out = ops.apply_class_thresholds(scores, [0.3, 0.0, 0.5], [True, True, False]).numpy()
    # 0.3 >= 0.3 kept; 0.29999998 < 0.3 dropped; threshold 0 keeps 0.0 (it is 0 either way);
    # class 2 disabled.
    np.testing.assert_array_equal(out, np.float32([[[0.3, 0.5, 0.0], [0.0, 0.0, 0.0]]]))


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_per_class_cap_adapts_to_candidates_without_changing_detections(threshold):
    # combined_nms caps the op's per-class output at the largest per-class candidate count (the
    # op's cost grows with that cap). Image 0 has 30 disjoint class-0 boxes above the threshold
    # (the cap of 25 binds); image 1 has 2 (the adaptive cap, 2, is below 25). Same output as
    # the reference in both, and the static output shape keeps max_total_detections rows.
    rng = np.random.default_rng(7)
    n = 40
    boxes = np.stack([[[i, 0, i + 0.5, 0.5] for i in range(n)]] * 2).astype(np.float32)
    scores = np.zeros((2, n, 3), np.float32)
    scores[0, :30, 0] = rng.uniform(0.6, 1.0, 30)
    scores[1, :2, 1] = [0.9, 0.7]
    scores[1, 5, 2] = 0.5  # exactly at the 0.5 threshold: kept
    fn = tf.function(lambda b, s: nms(
        b, s, iou_threshold=0.5, max_detections_per_class=25, max_total_detections=40,
        score_threshold=threshold), input_signature=[
            tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None, 3], tf.float32)])
    assert fn.get_concrete_function().structured_outputs["detection_scores"].shape.as_list() == [
        None, 40]
    out = {k: v.numpy() for k, v in fn(boxes, scores).items()}
    for b in range(2):
        ref = np_combined_nms(boxes[b], scores[b], 0.5, 25, 40, threshold)
        np.testing.assert_allclose(as_sorted_rows(out, b), ref_rows(ref), atol=1e-6)
    assert out["num_detections"].tolist() == [25, 3]


def test_many_candidates_take_every_column_and_match_the_reference():
    # Over SKIP_EMPTY_CLASSES_MAX_BOXES candidates, every column goes to the op (an empty one
    # too); the detections are still the reference's.
    rng = np.random.default_rng(19)
    n = ops.SKIP_EMPTY_CLASSES_MAX_BOXES + 40
    boxes = boxes_near_threshold(rng, n // 2, 0.5)[None]  # [1, n, 4]
    scores = rng.uniform(0.3, 1.0, size=(1, n, 3)).astype(np.float32)
    scores[..., 1] = 0.0  # an empty class among many candidates
    out = run_nms(boxes, scores, iou_threshold=[0.5, 0.6, 0.4], max_detections_per_class=8,
                  max_total_detections=12, score_threshold=0.25)
    ref = np_combined_nms(boxes[0], scores[0], np.array([0.5, 0.6, 0.4]), 8, 12, 0.25)
    np.testing.assert_allclose(as_sorted_rows(out, 0), ref_rows(ref), atol=1e-6)


# ----------------------------------------------------------------------------- soft-NMS


def np_soft_nms(boxes, scores, sigma, score_threshold=0.0, max_out=None):
    """Gaussian soft-NMS reference (Bodla et al. 2017, as TF's NonMaxSuppressionV5 runs it):
    pick the highest current score (ties: lower index), then multiply every remaining score by
    exp(-0.5 iou^2 / sigma) (TF ignores the IoU threshold in soft mode); drop scores <=
    threshold. Returns [(box index, decayed score)] in selection order."""
    current = scores.astype(np.float64).copy()
    alive = current > score_threshold
    picked = []
    while alive.any() and (max_out is None or len(picked) < max_out):
        i = int(np.flatnonzero(alive)[np.argmax(current[alive])])
        picked.append((i, current[i]))
        alive[i] = False
        for j in np.flatnonzero(alive):
            iou = np_iou(boxes[i], boxes[j])
            current[j] *= np.exp(-0.5 * iou * iou / sigma)
            alive[j] = current[j] > score_threshold
    return picked


def test_soft_nms_hand_derived_decayed_scores():
    # Three unit-height boxes of class 0: A = [0, 0, 1, 1] (0.9), B = A shifted 0.1 (0.8),
    # C = A shifted 0.5 (0.7); class 1: C (0.6) and D = [0.5, 0.5, 0.9, 0.9] (0.5).
    # IoU(A, B) = 0.9 / 1.1 = 9/11, IoU(A, C) = 0.5 / 1.5 = 1/3, IoU(B, C) = 0.6 / 1.4 = 3/7,
    # IoU(C, D) = 0.16 / 1 = 0.16. sigma = 0.5, so the decay is exp(-iou^2).
    # Class 0 at IoU 0.9: A 0.9; C 0.7 e^-(1/9) = 0.62645 > B 0.8 e^-(81/121) = 0.40961; then B
    # 0.40961 e^-(9/49) = 0.34087. Class 1: C 0.6; D 0.5 e^-0.0256 = 0.48736.
    # At IoU 0.8 (< IoU(A, B)) and 0.0 nothing changes: TF's op, which the OD API calls, ignores
    # the IoU threshold in soft mode.
    boxes = np.float32([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 0.5, 1, 1.5], [0.5, 0.5, 0.9, 0.9]]])
    scores = np.float32([[[0.9, 0.0], [0.8, 0.0], [0.7, 0.6], [0.0, 0.5]]])
    out = run_nms(boxes, scores, iou_threshold=0.9, soft_nms_sigma=0.5, max_total_detections=6,
                  label_offset=0)
    e = np.exp
    np.testing.assert_allclose(
        out["detection_scores"][0],
        [0.9, 0.7 * e(-1 / 9), 0.6, 0.5 * e(-0.0256), 0.8 * e(-81 / 121) * e(-9 / 49), 0.0],
        rtol=1e-5)
    np.testing.assert_array_equal(out["detection_classes"][0], [0, 0, 1, 1, 0, 0])
    assert out["num_detections"].tolist() == [5.0]
    for iou in (0.8, 0.0):
        again = run_nms(boxes, scores, iou_threshold=iou, soft_nms_sigma=0.5,
                        max_total_detections=6, label_offset=0)
        np.testing.assert_array_equal(again["detection_scores"], out["detection_scores"])
    # Decayed scores are held to the class thresholds: B (0.341) < 0.35, D (0.487) < 0.49.
    out = run_nms(boxes, scores, iou_threshold=0.9, soft_nms_sigma=0.5, max_total_detections=6,
                  label_offset=0, min_score_thresh=[0.35, 0.49])
    np.testing.assert_allclose(out["detection_scores"][0], [0.9, 0.7 * e(-1 / 9), 0.6, 0, 0, 0],
                               rtol=1e-5)


@pytest.mark.parametrize("seed, iou, sigma", [(0, 0.5, 0.5), (1, 0.3, 0.1), (2, 1.0, 0.8)])
def test_soft_nms_matches_numpy_reference_near_iou_threshold(seed, iou, sigma):
    rng = np.random.default_rng(seed)
    boxes = np.stack([boxes_near_threshold(rng, 10, iou if iou < 1 else 0.5) for _ in range(2)])
    scores = rng.uniform(0, 1, size=(2, 20, 3)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.3] = 0.0
    scores[0, 0, 0], scores[1, 1, 2] = 1.0, 0.0  # exactly 1 and exactly 0
    out = run_nms(boxes, scores, iou_threshold=iou, soft_nms_sigma=sigma,
                  max_detections_per_class=6, max_total_detections=15, min_score_thresh=[0.1],
                  label_offset=0)
    for b in range(2):
        dets = []
        for k in range(3):
            picked = np_soft_nms(boxes[b], scores[b, :, k], sigma, max_out=6)
            dets += [(s, k, boxes[b, i]) for i, s in picked if s >= 0.1]
        dets.sort(key=lambda d: -d[0])
        np.testing.assert_allclose(as_sorted_rows(out, b), ref_rows(dets[:15], label_offset=0),
                                   atol=1e-5)


def test_soft_nms_thresholding_the_output_equals_running_at_the_threshold():
    # The tuner relies on it: candidates at a low threshold, cut at t, are the detections at t.
    rng = np.random.default_rng(11)
    boxes = np.stack([boxes_near_threshold(rng, 12, 0.5, delta=0.2) for _ in range(2)])
    scores = rng.uniform(0, 1, size=(2, 24, 3)).astype(np.float32)
    kw = dict(iou_threshold=[0.5, 0.6, 0.5], soft_nms_sigma=0.5, max_detections_per_class=8,
              max_total_detections=40, label_offset=0)
    low = run_nms(boxes, scores, min_score_thresh=[0.01], **kw)
    for t in (0.2, 0.45, 0.7):
        at_t = run_nms(boxes, scores, min_score_thresh=[t], **kw)
        for b in range(2):
            rows = as_sorted_rows(low, b)
            np.testing.assert_allclose(as_sorted_rows(at_t, b), rows[rows[:, 0] >= t], atol=1e-6)


def test_per_class_soft_nms_sigma_equals_running_each_class_alone_and_empty_inputs():
    rng = np.random.default_rng(5)
    boxes = np.stack([boxes_near_threshold(rng, 8, 0.5, delta=0.2) for _ in range(2)])
    scores = rng.uniform(0, 1, size=(2, 16, 3)).astype(np.float32)
    sigmas, ious = [0.0, 0.5, 0.3], [0.5, 0.5, 0.7]
    kw = dict(max_detections_per_class=5, max_total_detections=30)
    out = run_nms(boxes, scores, iou_threshold=ious, soft_nms_sigma=sigmas, **kw)
    alone = [run_nms(boxes, scores[:, :, k:k + 1], iou_threshold=ious[k],
                     soft_nms_sigma=sigmas[k], label_offset=k + 1, **kw) for k in range(3)]
    for b in range(2):
        rows = np.concatenate([as_sorted_rows(a, b) for a in alone])
        rows = rows[np.lexsort(rows.T[::-1])][::-1]
        np.testing.assert_allclose(as_sorted_rows(out, b), rows, atol=1e-6)
    empty = run_nms(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0, 3), np.float32),
                    soft_nms_sigma=0.5, max_total_detections=4)
    assert empty["num_detections"].tolist() == [0.0, 0.0]
    assert not empty["detection_boxes"].any() and empty["detection_boxes"].shape == (2, 4, 4)
    with pytest.raises(ValueError, match="soft_nms_sigma"):
        run_nms(boxes, scores, soft_nms_sigma=-0.1)
    with pytest.raises(ValueError, match="class_agnostic"):
        run_nms(boxes, scores, soft_nms_sigma=[0.0, 0.5, 0.5], class_agnostic=True)


# ----------------------------------------------------------------------------- clip window


def test_clip_window_drops_zero_area_boxes_before_the_total_cut_and_changes_frame():
    # Window [0, 0, 0.5, 0.5]. A = [0.1, 0.1, 0.3, 0.3] (0.9) inside; B = [0.4, 0.4, 0.7, 0.7]
    # (0.8) clipped to [0.4, 0.4, 0.5, 0.5]; C = [0.6, 0.6, 0.9, 0.9] (0.95) and
    # D = [0.0, 0.55, 0.2, 0.8] (0.7) clip to zero area. No pair overlaps above IoU 0.5
    # (IoU(B, C) = 0.01 / 0.17). With max_total 2 the best score, C, is dropped first and the
    # two rows are A and B (the OD API cuts after dropping).
    boxes = np.float32([[[0.1, 0.1, 0.3, 0.3], [0.4, 0.4, 0.7, 0.7], [0.6, 0.6, 0.9, 0.9],
                         [0.0, 0.55, 0.2, 0.8]]])
    scores = np.float32([[[0.9], [0.8], [0.95], [0.7]]])
    window = [0.0, 0.0, 0.5, 0.5]
    kw = dict(max_detections_per_class=4, max_total_detections=2, label_offset=0,
              clip_window=window)
    # Soft-NMS runs on the boxes as given: C, selected first, decays B to
    # 0.8 exp(-(0.01 / 0.17)^2) before C itself is dropped by the window.
    soft_b = 0.8 * np.exp(-(0.01 / 0.17) ** 2)
    for extra, b_score in ((dict(), 0.8), (dict(soft_nms_sigma=0.5), soft_b),
                           (dict(class_agnostic=True, max_detections_per_class=None), 0.8)):
        out = run_nms(boxes, scores, **{**kw, **extra})
        np.testing.assert_allclose(out["detection_boxes"][0],
                                   [[0.1, 0.1, 0.3, 0.3], [0.4, 0.4, 0.5, 0.5]], atol=1e-6)
        np.testing.assert_allclose(out["detection_scores"][0], [0.9, b_score], rtol=1e-5)
        assert out["num_detections"].tolist() == [2.0], extra
    # In the window's frame (h = w = 0.5): (box - 0) / 0.5.
    out = run_nms(boxes, scores, change_coordinate_frame=True, **kw)
    np.testing.assert_allclose(out["detection_boxes"][0],
                               [[0.2, 0.2, 0.6, 0.6], [0.8, 0.8, 1.0, 1.0]], atol=1e-6)
    # A shifted window: [0.1, 0.2, 0.6, 0.7] -> A clips to [0.1, 0.2, 0.3, 0.3] and becomes
    # ((0.1 - 0.1) / 0.5, (0.2 - 0.2) / 0.5, (0.3 - 0.1) / 0.5, (0.3 - 0.2) / 0.5).
    out = run_nms(boxes[:, :1], scores[:, :1], max_total_detections=1, label_offset=0,
                  clip_window=[0.1, 0.2, 0.6, 0.7], change_coordinate_frame=True)
    np.testing.assert_allclose(out["detection_boxes"][0], [[0.0, 0.0, 0.4, 0.2]], atol=1e-6)
    empty = run_nms(np.zeros((1, 0, 4), np.float32), np.zeros((1, 0, 1), np.float32),
                    clip_window=window, max_total_detections=3)
    assert empty["num_detections"].tolist() == [0.0] and empty["detection_boxes"].shape == (1, 3, 4)
    with pytest.raises(ValueError, match="change_coordinate_frame: needs a clip_window"):
        run_nms(boxes, scores, change_coordinate_frame=True)
    with pytest.raises(ValueError, match="clip_window: expected"):
        run_nms(boxes, scores, clip_window=[0.5, 0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------- selection indices


def np_combined_nms_indices(boxes, scores, iou, max_per_class, max_total):
    """`np_combined_nms` with the box index: sorted list of (score, column, index)."""
    num_classes = scores.shape[1]
    iou = np.broadcast_to(iou, [num_classes])
    dets = []
    for k in range(num_classes):
        cand = np.flatnonzero(scores[:, k] > 0)
        kept = [cand[i] for i in np_nms(boxes[cand], scores[cand, k], iou[k])]
        dets += [(scores[i, k], k, i) for i in kept[:max_per_class]]
    dets.sort(key=lambda d: -d[0])
    return dets[:max_total]


@pytest.mark.parametrize("seed, ious", [(0, 0.5), (1, [0.3, 0.5, 0.7]), (2, [0.5, 0.5, 0.6])])
def test_detection_indices_match_the_numpy_reference(seed, ious):
    rng = np.random.default_rng(seed)
    boxes = np.stack([boxes_near_threshold(rng, 10, 0.5) for _ in range(2)])  # [2, 20, 4]
    scores = rng.uniform(0, 1, size=(2, 20, 3)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.4] = 0.0
    scores[0, 3, 1] = 1.0
    out = run_nms(boxes, scores, iou_threshold=ious, max_detections_per_class=5,
                  max_total_detections=12, label_offset=0, return_indices=True, clip_boxes=True)
    for b in range(2):
        ref = np_combined_nms_indices(boxes[b], scores[b], np.asarray(ious), 5, 12)
        n = int(out["num_detections"][b])
        got = sorted(zip(out["detection_scores"][b, :n].tolist(),
                         out["detection_classes"][b, :n].astype(int).tolist(),
                         out["detection_indices"][b, :n].tolist()))
        assert got == sorted((float(s), int(k), int(i)) for s, k, i in ref)
        assert np.all(out["detection_indices"][b, n:] == -1)
        np.testing.assert_array_equal(out["detection_boxes"][b, :n],
                                      np.clip(boxes[b, out["detection_indices"][b, :n]], 0, 1))


def test_detection_indices_with_soft_nms_agnostic_per_class_boxes_and_empty_input():
    rng = np.random.default_rng(4)
    boxes = np.stack([boxes_near_threshold(rng, 8, 0.5) for _ in range(3)], axis=1)[None]
    scores = rng.uniform(0, 1, size=(1, 16, 3)).astype(np.float32)  # per-class boxes [1,16,3,4]
    for kw in (dict(soft_nms_sigma=0.5), dict(class_agnostic=True), dict()):
        out = run_nms(boxes, scores, max_total_detections=10, label_offset=0,
                      return_indices=True, **kw)
        n = int(out["num_detections"][0])
        for m in range(n):
            i, k = out["detection_indices"][0, m], int(out["detection_classes"][0, m])
            np.testing.assert_array_equal(out["detection_boxes"][0, m], boxes[0, i, k])
            assert scores[0, i, k] >= out["detection_scores"][0, m]
    ref = [(k, i) for s, k, i in np_soft_nms_rows(boxes[0], scores[0], 0.5)][:10]
    out = run_nms(boxes, scores, max_total_detections=10, label_offset=0, return_indices=True,
                  soft_nms_sigma=0.5)
    assert list(zip(out["detection_classes"][0].astype(int), out["detection_indices"][0])) == ref
    empty = run_nms(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0, 2), np.float32),
                    max_total_detections=3, return_indices=True)
    assert empty["detection_indices"].tolist() == [[-1] * 3] * 2
    assert ops.gather_detections(np.zeros((2, 0, 5), np.float32),
                                 empty["detection_indices"]).shape == (2, 3, 5)


def np_soft_nms_rows(boxes, scores, sigma):
    """Per-class soft-NMS of per-class boxes `[N, K, 4]`: (score, column, index) by score."""
    rows = []
    for k in range(scores.shape[1]):
        rows += [(s, k, i) for i, s in np_soft_nms(boxes[:, k], scores[:, k], sigma)]
    return sorted(rows, key=lambda r: -r[0])


def test_gather_detections_zeroes_padding_rows():
    values = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    out = ops.gather_detections(values, np.int32([[3, 0, -1], [-1, -1, -1]])).numpy()
    np.testing.assert_array_equal(out, [[[6, 7], [0, 1], [0, 0]], [[0, 0], [0, 0], [0, 0]]])
