"""Property test: the fast joint search picks exactly what a brute-force search picks.

Brute force, at every grid point (NMS IoU, threshold): post-process the raw outputs with the
real op (`tfcal.ops.combined_nms` at that IoU and threshold, `score >= threshold`), evaluate with
pycocotools COCOeval at iouThrs=[0.5] and count TP/FP per class from evalImgs
(`dtMatches`/`dtIgnore`) and the ground truth from `gtIgnore`; then choose per class by the
documented objective keys and tie-break with a plain Python loop. Fast: post-process once per IoU
at the lowest threshold (`collect_candidates`), match once (`match_detections`), `joint_search`
restricted to the same thresholds. Generated sets: 20 images, 3 classes, jittered duplicate raw
boxes (so NMS IoU matters), neighbouring objects, and crowd regions (ignored detections).
"""

import contextlib
import io

import numpy as np
import pytest

from tfcal.coco.matching import Detections, ground_truth, match_detections
from tfcal.tuning.candidates import collect_candidates
from tfcal.tuning.search import MatchedDetections, Objective, joint_search

pytestmark = pytest.mark.slow  # TF tracing and 24 COCOeval runs per seed: a few seconds

GRID = (0.3, 0.5, 0.7)
THRESHOLDS = [float(t) for t in np.linspace(0.1, 0.85, 8).astype(np.float32)]
SIZE = 100.0
NUM_CLASSES = 3


def generate(seed, num_images=20, num_anchors=24):
    """Raw outputs (normalized yxyx boxes, per-class probabilities) and a COCO GT dict."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((num_images, num_anchors, 4), np.float32)
    scores = (rng.random((num_images, num_anchors, NUM_CLASSES)) * 0.35).astype(np.float32)
    anns = []
    for i in range(num_images):
        yx = rng.random((num_anchors, 2)) * 0.8
        boxes[i] = np.concatenate([yx, yx + 0.05 + rng.random((num_anchors, 2)) * 0.15], 1)
        n_obj = int(rng.integers(1, 4))
        objs = []
        for o in range(n_obj):
            y, x = rng.random(2) * 0.6
            h, w = 0.15 + rng.random(2) * 0.2
            objs.append((np.array([y, x, y + h, x + w]), int(rng.integers(NUM_CLASSES))))
            if rng.random() < 0.4:  # a same-class neighbour overlapping it (IoU ~ 0.3-0.6)
                dy, dx = (rng.random(2) * 0.4 + 0.15) * np.array([h, w])
                objs.append((np.array([y + dy, x + dx, y + dy + h, x + dx + w]), objs[-1][1]))
        a = 0
        for box, c in objs:
            s0 = 0.3 + 0.7 * rng.random()
            for d in range(4):  # 2 tight and 2 loose duplicates
                j = (0.04 if d < 2 else 0.2) * (box[2:] - box[:2])
                boxes[i, a] = np.clip(box + rng.uniform(-1, 1, 4) * np.concatenate([j, j]), 0, 1)
                scores[i, a, c] = s0 * (1.0 if d == 0 else rng.uniform(0.4, 0.99))
                a += 1
            bb = box * SIZE
            anns.append({"image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                         "bbox": [bb[1], bb[0], bb[3] - bb[1], bb[2] - bb[0]]})
        if rng.random() < 0.3:  # a crowd region over a random anchor's area
            j = int(rng.integers(a, num_anchors))
            bb = boxes[i, j].astype(np.float64) * SIZE
            anns.append({"image_id": i + 1, "category_id": int(rng.integers(NUM_CLASSES)) + 1,
                         "iscrowd": 1, "bbox": [bb[1], bb[0], bb[3] - bb[1], bb[2] - bb[0]]})
    for k, ann in enumerate(anns):
        ann["id"] = k + 1
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
        ann["bbox"] = [float(v) for v in ann["bbox"]]
    dataset = {"images": [{"id": i + 1, "width": SIZE, "height": SIZE} for i in range(num_images)],
               "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(NUM_CLASSES)],
               "annotations": anns}
    return np.arange(1, num_images + 1), boxes, scores, dataset


def _coco(dataset):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _to_xywh(yxyx):
    b = yxyx.astype(np.float64) * SIZE
    return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], 1)


def brute_force_counts(ids, boxes, scores, coco):
    """{(iou, threshold): (tp [K], fp [K])} and num_gt [K], from COCOeval at every grid point."""
    from pycocotools.cocoeval import COCOeval

    from tfcal.ops import NmsOptions, combined_nms

    counts, num_gt = {}, None
    for g in GRID:
        for t in THRESHOLDS:
            out = combined_nms(boxes, scores, NmsOptions(
                iou_threshold=g, max_detections_per_class=100, max_total_detections=100,
                label_offset=1), score_threshold=t)
            nv = out["num_detections"].numpy().astype(np.int64)
            valid = np.arange(out["detection_scores"].shape[1])[None, :] < nv[:, None]
            tp = np.zeros(NUM_CLASSES, np.int64)
            fp = np.zeros(NUM_CLASSES, np.int64)
            if nv.sum():
                arr = np.column_stack([np.repeat(ids, nv),
                                       _to_xywh(out["detection_boxes"].numpy()[valid]),
                                       out["detection_scores"].numpy()[valid],
                                       out["detection_classes"].numpy()[valid]])
                with contextlib.redirect_stdout(io.StringIO()):
                    ev = COCOeval(coco, coco.loadRes(arr), "bbox")
                    ev.params.iouThrs = np.array([0.5])
                    ev.params.maxDets = [100]
                    ev.params.areaRng = [[0, 1e10]]
                    ev.params.areaRngLbl = ["all"]
                    ev.evaluate()
                ngt = np.zeros(NUM_CLASSES, np.int64)
                for e in ev.evalImgs:
                    if e is None:
                        continue
                    c = e["category_id"] - 1
                    m, ig = e["dtMatches"][0], e["dtIgnore"][0].astype(bool)
                    tp[c] += int(np.sum((m > 0) & ~ig))
                    fp[c] += int(np.sum((m == 0) & ~ig))
                    ngt[c] += int(np.sum(~np.asarray(e["gtIgnore"], bool)))
                num_gt = ngt if num_gt is None else num_gt
            counts[(g, t)] = (tp, fp)
    return counts, num_gt


def _certified_points(counts, num_gt, obj):
    """{(g, t): bool [K]}: the certified grid points, each class's curve at each IoU run
    through `tfcal.certification` on its own (level (1 - confidence) / G per curve)."""
    from tfcal import certification

    out = {key: np.zeros(NUM_CLASSES, bool) for key in counts}
    level = (1.0 - obj.confidence) / len(GRID)
    for g in GRID:
        ts = sorted({t for (gg, t) in counts if gg == g}, reverse=True)
        for c in range(NUM_CLASSES):
            tp = np.array([counts[(g, t)][0][c] for t in ts])
            fp = np.array([counts[(g, t)][1][c] for t in ts])
            if obj.name == "precision_target":
                ok, _ = certification.certify_precision(tp, tp + fp, obj.target_precision, level)
            else:
                ok, _ = certification.certify_recall(tp, int(num_gt[c]), obj.target_recall, level)
            for t, o in zip(ts, ok):
                out[(g, t)][c] = o
    return out


def brute_force_choose(counts, num_gt, obj, default):
    """Per class: (iou, threshold, tp, fp) of the best feasible grid point, or None."""
    rank = {g: r for r, g in enumerate(sorted(GRID, key=lambda g: (abs(g - default), g)))}
    certified = _certified_points(counts, num_gt, obj) if obj.certified else None
    out = []
    for c in range(NUM_CLASSES):
        best, choice = None, None
        n = int(num_gt[c])
        for (g, t), (tps, fps) in counts.items():
            tp, fp = int(tps[c]), int(fps[c])
            if tp == 0:  # a feasible point has at least one TP
                continue
            prec, rec = tp / (tp + fp), tp / n
            if obj.name == "precision_target":
                ok = certified[(g, t)][c] if certified else prec >= obj.target_precision
                key = (rec, prec)
            elif obj.name == "recall_target":
                ok = certified[(g, t)][c] if certified else rec >= obj.target_recall
                key = (prec, rec)
            elif obj.name == "f1":
                ok, key = True, (2.0 * tp / (2.0 * tp + fp + (n - tp)), rec)
            elif obj.name == "fbeta":
                b2 = obj.beta * obj.beta
                ok, key = True, ((1.0 + b2) * tp / ((1.0 + b2) * tp + b2 * (n - tp) + fp), rec)
            else:
                ok, key = True, (-(obj.c_fp * fp + obj.c_fn * (n - tp)), rec)
            key = key + (-rank[g], -t)
            if ok and (best is None or key > best):
                best, choice = key, (g, t, tp, fp)
        out.append(choice)
    return out


@pytest.fixture(scope="module", params=[0, 1, 2])
def case(request):
    ids, boxes, scores, dataset = generate(request.param)
    coco = _coco(dataset)
    counts, num_gt = brute_force_counts(ids, boxes, scores, coco)
    cands = collect_candidates([(ids, boxes, scores)], None, GRID, min(THRESHOLDS))
    gt = ground_truth(coco)
    matched = {}
    for g, c in cands.items():
        dets = Detections(c.image_id, c.column.astype(np.int64) + 1, _to_xywh(c.box),
                          c.score.astype(np.float64))
        m = match_detections(gt, dets, iou_threshold=0.5, max_dets=100)
        matched[g] = MatchedDetections(m.score.astype(np.float32), m.category_id - 1, m.tp,
                                       m.ignored, m.num_gt)
    return counts, num_gt, matched


OBJECTIVES = [
    Objective("precision_target", target_precision=0.6),
    Objective("precision_target", target_precision=0.85),
    Objective("precision_target", target_precision=0.5, confidence=0.8),
    Objective("recall_target", target_recall=0.5),
    Objective("recall_target", target_recall=0.3, confidence=0.8),
    Objective("f1"),
    Objective("fbeta", beta=2.0),
    Objective("cost", c_fp=1.0, c_fn=2.5),
]


@pytest.mark.parametrize("obj", OBJECTIVES,
                         ids=lambda o: f"{o.name}-{o.target_precision}-{o.confidence}")
@pytest.mark.parametrize("default", [0.5, 0.7])
def test_fast_search_equals_brute_force(case, obj, default):
    counts, num_gt, matched = case
    np.testing.assert_array_equal(matched[GRID[0]].num_gt, num_gt)
    fast = joint_search(matched, obj, default_nms_iou=default, min_support=1, thresholds=THRESHOLDS)
    want = brute_force_choose(counts, num_gt, obj, default)
    got = [None if c.status != "ok" else (c.nms_iou, c.min_score_thresh, c.tp, c.fp)
           for c in fast.classes]
    assert got == want
    assert any(w is not None for w in want)
    # The curves agree with the brute-force counts at every grid point.
    for gi, g in enumerate(GRID):
        cv = fast.curves[gi]
        for c in range(NUM_CLASSES):
            s = slice(cv.offsets[c], cv.offsets[c + 1])
            for t, tp, fp in zip(cv.threshold[s], cv.tp[s], cv.fp[s]):
                assert (tp, fp) == (counts[(g, float(t))][0][c], counts[(g, float(t))][1][c])


def test_collect_candidates_threshold_semantics_and_batching():
    ids, boxes, scores, _ = generate(5, num_images=6)
    t = float(np.float32(0.2))
    scores[0, 0, 0] = t  # kept: score >= lowest_threshold
    scores[0, 1, 1] = np.nextafter(np.float32(t), np.float32(0))  # dropped
    boxes[0, 1] = [0.9, 0.9, 0.95, 0.95]  # far from everything: only the threshold decides
    boxes[0, 0] = [0.0, 0.9, 0.05, 0.95]
    whole = collect_candidates([(ids, boxes, scores)], None, GRID, t)
    parts = collect_candidates([(ids[:2], boxes[:2], scores[:2]), (ids[2:], boxes[2:], scores[2:])],
                               None, GRID, t)
    for g in GRID:
        a, b = whole[g], parts[g]
        np.testing.assert_array_equal(a.image_id, b.image_id)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.box, b.box)
        assert a.score.min() >= np.float32(t)
        first = (a.image_id == ids[0])
        assert np.any(first & (a.column == 0) & (a.score == np.float32(t)))
        assert not np.any(first & (a.column == 1) & (a.score < np.float32(t)))
    # Looser NMS keeps at least as many detections.
    assert len(whole[0.3]) <= len(whole[0.5]) <= len(whole[0.7])
    with pytest.raises(ValueError, match="iou_grid"):
        collect_candidates([], None, (), t)
    with pytest.raises(ValueError, match="batch shapes"):
        collect_candidates([(ids[:2], boxes[:3], scores[:2])], None, GRID, t)
