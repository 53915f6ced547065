"""Per-class boxes `[I, N, K, 4]` (a box per class column, as Faster R-CNN heads give) through
tuning, and softmax heads (a background column) end to end.

- The tuner's candidates (`collect_candidates`, the search's input) equal the exported
  `PostProcessor`'s detections class by class on a small per-class-box case, and both equal a
  15-line NumPy greedy NMS that uses each class's own boxes.
- The known-answer job with per-class boxes, where every class that does not score a box gets
  a decoy box elsewhere in the image, tunes to the known answer: each class is matched and
  suppressed with its own boxes (a decoy used by mistake would change every count).
- The known-answer job as softmax probabilities (background column = 1 - class score) tunes
  to the same answer as the sigmoid one; with temperature scaling it runs end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

import known_answer as ka
from box_reference import iou as box_iou
from tfcal import TfcalError
from tfcal.config import Config
from tfcal.postprocess import PostProcessConfig
from tfcal.raw import RawOutputs
from tfcal.tuning.candidates import collect_candidates
from tfcal.tuning.detections import _calibrate_fn, postprocess_images


def _reference_nms(boxes_k, scores_k, iou, thresh):
    """Greedy NMS of one class on one image: `[(score, box)]` kept, by descending score."""
    order = np.argsort(-scores_k, kind="stable")
    kept = []
    for n in order:
        s = scores_k[n]
        if s < thresh or s <= 0:
            break
        if all(box_iou(boxes_k[n], b) <= iou for _, b in kept):
            kept.append((s, boxes_k[n]))
    return kept


def _case(seed):
    """3 images, 12 boxes, 3 classes: per-class boxes jittered around 4 centres (many
    overlaps near the IoU threshold), sigmoid probabilities with a background column."""
    rng = np.random.default_rng(seed)
    b, n, k = 3, 12, 3
    centre = rng.uniform(0.2, 0.6, (b, 4, 1, 1, 2))[:, rng.integers(0, 4, n)][:, :, 0]
    centre = np.broadcast_to(centre, (b, n, k, 2)) + rng.normal(0, 0.03, (b, n, k, 2))
    size = rng.uniform(0.15, 0.3, (b, n, k, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1).astype(np.float32)
    scores = rng.uniform(0, 1, (b, n, 1 + k)).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuner_candidates_equal_the_exported_post_processor_per_class(seed):
    boxes, scores = _case(seed)
    b, n, k, _ = boxes.shape
    iou, thresh = 0.5, 0.3
    cand = collect_candidates([(np.arange(b), boxes, scores)], _calibrate_fn(Config(), None),
                              [iou], thresh)[iou]
    ppc = PostProcessConfig(num_classes=k, min_score_thresh=(thresh,), nms_iou=(iou,),
                            label_offset=0)
    raw = RawOutputs(np.arange(b), boxes, scores, np.full(b, 100), np.full(b, 100))
    served = postprocess_images(ppc, raw, np.arange(b))
    for img in range(b):
        for c in range(k):
            ref = _reference_nms(boxes[img, :, c], scores[img, :, 1 + c], iou, thresh)
            want = sorted((round(float(s), 6), tuple(np.round(bx, 6))) for s, bx in ref)
            for image, column, score, box in (
                    (cand.image_id, cand.column, cand.score, cand.box),
                    (served.image_index, served.column, served.score, served.boxes)):
                m = (image == img) & (column == c)
                got = sorted((round(float(s), 6), tuple(np.round(bx, 6)))
                             for s, bx in zip(score[m], box[m]))
                assert got == want, (img, c)
    assert len(cand) > 10  # the case is not trivial


@pytest.mark.parametrize("seed", [3, 4])
def test_per_class_thresholds_and_ious_agree_with_the_post_processor(seed):
    # The search applies class k's threshold to the candidates of class k's IoU; the served
    # graph applies both in one call. Same detections, class by class (no cap binds).
    boxes, scores = _case(seed)
    b, _, k, _ = boxes.shape
    thresholds, ious = (0.3, 0.5, 0.7), (0.4, 0.6, 0.4)
    cands = collect_candidates([(np.arange(b), boxes, scores)], _calibrate_fn(Config(), None),
                               sorted(set(ious)), min(thresholds))
    ppc = PostProcessConfig(num_classes=k, min_score_thresh=thresholds, nms_iou=ious,
                            label_offset=0)
    raw = RawOutputs(np.arange(b), boxes, scores, np.full(b, 100), np.full(b, 100))
    served = postprocess_images(ppc, raw, np.arange(b))
    for c in range(k):
        cand = cands[ious[c]]
        m = (cand.column == c) & (cand.score >= thresholds[c])
        want = sorted(zip(cand.image_id[m].tolist(), np.round(cand.score[m], 6).tolist()))
        s_m = served.column == c
        got = sorted(zip(served.image_index[s_m].tolist(),
                         np.round(served.score[s_m], 6).tolist()))
        assert got == want, c
        np.testing.assert_allclose(np.sort(served.boxes[s_m], axis=0),
                                   np.sort(cand.box[m], axis=0))


def _per_class(raw, seed=0):
    """`raw` with boxes `[I, N, K, 4]`: the class that scores a box keeps it; every other
    class gets a decoy box in another cell of the grid (no overlap with any object)."""
    boxes, scores = raw["boxes"], raw["scores"]
    i, n, _ = boxes.shape
    k = scores.shape[-1] - 1
    decoy = np.array([0.9, 0.9, 0.98, 0.98], np.float32)
    out = np.broadcast_to(decoy, (i, n, k, 4)).copy()
    owner = scores[..., 1:].argmax(-1)
    ii, nn = np.indices((i, n))
    out[ii, nn, owner] = boxes
    return dict(raw, boxes=out)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    _, raw = ka.build(list(range(1, 61)))
    return raw, ka.tune(tmp_path_factory.mktemp("shared_boxes"), raw=raw)


def _same_choice(a, b):
    for key in ("min_score_thresh", "nms_iou", "class_enabled"):
        assert a[key] == b[key], key


def test_per_class_boxes_tune_to_the_known_answer(tmp_path, known):
    raw, shared = known
    counts = shared.holdout_counts()
    per_class = _per_class(raw)
    assert per_class["boxes"].shape == (60, ka.NUM_RAW_BOXES, 3, 4)
    got = ka.tune(tmp_path, raw=per_class)
    _same_choice(got.postprocess, shared.postprocess)
    assert got.holdout_counts() == counts
    assert counts["car"] == (2 * 18, 0, 0) and counts["person"] == (12 * 18, 18, 18)


def test_per_class_boxes_for_the_background_column_are_refused(tmp_path, known):
    raw, _ = known
    k = raw["scores"].shape[-1]  # 4 columns: one box too many with a background column
    bad = dict(raw, boxes=np.repeat(raw["boxes"][:, :, None], k, axis=2))
    with pytest.raises(TfcalError, match=r"raw.npz: boxes: per-class boxes \[60, 26, 4, 4\] "
                                         r"need one box per class column \(3 with "
                                         r"model.background_column: true\), got 4"):
        ka.tune(tmp_path, raw=bad)


def _softmax(raw):
    scores = raw["scores"].copy()
    scores[..., 0] = 1.0 - scores[..., 1:].sum(-1)  # one class per box: rows sum to 1
    return dict(raw, scores=scores)


def test_softmax_head_tunes_to_the_same_answer(tmp_path, known):
    raw, shared = known
    got = ka.tune(tmp_path / "none", raw=_softmax(raw), model={"score_converter": "softmax"})
    assert got.postprocess["score_converter"] == "softmax"
    _same_choice(got.postprocess, shared.postprocess)
    assert got.holdout_counts() == shared.holdout_counts()


def test_softmax_head_with_platt_runs_end_to_end(tmp_path, known):
    raw, _ = known
    got = ka.tune(tmp_path / "platt", raw=_softmax(raw), model={"score_converter": "softmax"},
                  calibration={"method": "platt", "per_class": False})
    got_ppc = got.postprocess
    assert got_ppc["calibration"] == "platt"
    assert all(np.isfinite(got_ppc["platt_a"])) and all(np.isfinite(got_ppc["platt_b"]))
    assert got.holdout_counts()["car"][0] > 0
    # Temperature is refused for softmax heads, in one line naming the key.
    with pytest.raises(TfcalError, match=r"calibration.method: temperature with score_converter "
                                         r"softmax is not tuned per detection"):
        ka.tune(tmp_path / "temperature", raw=_softmax(raw), model={"score_converter": "softmax"},
                calibration={"method": "temperature"})
