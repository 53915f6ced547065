"""Tuner speed: the fast joint search against a brute-force search, and a COCO-val-sized job.

1. Fast vs brute force on a 500-image generated set (80 classes), 5 NMS IoUs x 20 thresholds.
   Fast: post-process once per IoU at the lowest threshold, match once per IoU, one vectorized
   search. Brute force: at every grid point, post-process with that IoU and threshold, run
   pycocotools COCOeval (iouThrs=[match IoU]) and count TP/FP per class from evalImgs, then
   choose per class by the same objective and tie-break. Choices must be identical; target: the
   fast search is >= 50x faster.
2. Scale: 5,000 images x 3,549 raw boxes x 80 classes of generated raw outputs (heavy-tailed
   scores: most boxes score low), streamed in batches through per-class temperature calibration
   and TF combined NMS at 4 IoUs, matched, searched. Targets: < 120 s, < 4 GB peak RSS.

Run: `python benchmarks/tuner_speed.py [--skip-scale] [--skip-brute-force]`. The brute force is
most of the run time (100 COCOeval runs over 500 images x 80 categories, about 2 s each, which is
the cost the fast search avoids); each part can be run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # first traces of the five per-IoU functions are expected

from tfcal.coco.matching import Detections, GroundTruth, match_detections  # noqa: E402
from tfcal.ops import NmsOptions, combined_nms  # noqa: E402
from tfcal.tuning.candidates import collect_candidates  # noqa: E402
from tfcal.tuning.search import MatchedDetections, Objective, joint_search  # noqa: E402

IMAGE_SIZE = 640.0
MATCH_IOU = 0.5


# ----------------------------------------------------------------------------------------------
# Generated raw outputs


class RawGenerator:
    """Generated raw detector outputs with known ground truth, batch by batch.

    Background (box, class) scores come from a heavy-tailed pool (`background_rate` of them
    >= 0.05, default 0.5%: about 1,400 per image at 3,549 x 80);
    each object gets a few anchors with jittered copies of its box (some loose, so NMS IoU
    matters) scoring high in its class, and sometimes a confusable second class. Class
    frequencies are Zipf-like, so some classes are rare.
    """

    def __init__(self, num_images, num_anchors, num_classes, seed, batch_size,
                 background_rate=0.005):
        self.num_images, self.n, self.k = num_images, num_anchors, num_classes
        self.batch = batch_size
        rng = np.random.default_rng(seed)
        self.rng = rng
        size = 2 * batch_size * num_anchors * num_classes
        u = rng.random(size)
        power = np.log(0.05 / 0.6) / np.log1p(-background_rate)  # P(0.6 u^power >= 0.05) = rate
        self.pool = (0.6 * np.exp(power * np.log(np.maximum(u, 1e-300)))).astype(np.float32)
        yx = rng.random((2 * batch_size * num_anchors, 2)) * 0.9
        hw = 0.02 + rng.random((2 * batch_size * num_anchors, 2)) * 0.3
        self.box_pool = np.concatenate([yx, np.minimum(yx + hw, 1.0)], 1).astype(np.float32)
        freq = 1.0 / np.arange(1, num_classes + 1) ** 0.8
        freq = freq[rng.permutation(num_classes)]
        n_obj = np.clip(rng.poisson(6, num_images), 1, 20)
        self.gt_image = np.repeat(np.arange(num_images), n_obj)
        g = self.gt_image.shape[0]
        self.gt_class = rng.choice(num_classes, size=g, p=freq / freq.sum())
        yx = rng.random((g, 2)) * 0.75
        hw = 0.05 + rng.random((g, 2)) * 0.2
        self.gt_box = np.concatenate([yx, yx + hw], 1)
        self.gt_start = np.concatenate([[0], np.cumsum(n_obj)])

    def ground_truth(self) -> GroundTruth:
        y0, x0, y1, x1 = (self.gt_box[:, i] * IMAGE_SIZE for i in range(4))
        bbox = np.stack([x0, y0, x1 - x0, y1 - y0], 1)
        g = bbox.shape[0]
        return GroundTruth(np.arange(self.num_images, dtype=np.int64),
                           np.arange(self.k, dtype=np.int64) + 1, np.arange(1, g + 1),
                           self.gt_image.astype(np.int64), self.gt_class.astype(np.int64) + 1,
                           bbox, bbox[:, 2] * bbox[:, 3], np.zeros(g, bool))

    def batches(self):
        rng = self.rng
        for start in range(0, self.num_images, self.batch):
            ids = np.arange(start, min(start + self.batch, self.num_images))
            b = ids.shape[0]
            m = b * self.n * self.k
            off = int(rng.integers(0, self.pool.shape[0] - m + 1))
            scores = self.pool[off:off + m].reshape(b, self.n, self.k).copy()
            boff = int(rng.integers(0, self.box_pool.shape[0] - b * self.n + 1))
            boxes = self.box_pool[boff:boff + b * self.n].reshape(b, self.n, 4).copy()
            lo, hi = self.gt_start[start], self.gt_start[start + b]
            obj_img = self.gt_image[lo:hi] - start
            obj_cls = self.gt_class[lo:hi]
            obj_box = self.gt_box[lo:hi]
            dup = 6
            o = np.repeat(np.arange(hi - lo), dup)
            anchor = rng.integers(0, self.n, size=o.shape[0])
            hw = (obj_box[o, 2:] - obj_box[o, :2])
            loose = (np.arange(o.shape[0]) % dup) >= 3
            jitter = np.where(loose[:, None], 0.25, 0.06) * hw
            shift = rng.uniform(-1, 1, (o.shape[0], 4)) * np.concatenate([jitter, jitter], 1)
            boxes[obj_img[o], anchor] = np.clip(obj_box[o] + shift, 0, 1).astype(np.float32)
            hit = rng.random(hi - lo) < 0.85  # detected objects
            top = np.where(hit, 0.15 + 0.85 * rng.random(hi - lo) ** 0.6,
                           0.02 * rng.random(hi - lo))
            decay = rng.uniform(0.3, 0.98, o.shape[0])
            s = top[o] * np.where(np.arange(o.shape[0]) % dup == 0, 1.0, decay)
            scores[obj_img[o], anchor, obj_cls[o]] = s.astype(np.float32)
            confuse = rng.random(o.shape[0]) < 0.1
            other = rng.integers(0, self.k, size=o.shape[0])
            scores[obj_img[o][confuse], anchor[confuse], other[confuse]] = (
                s[confuse] * rng.uniform(0.3, 0.9, int(confuse.sum()))).astype(np.float32)
            yield ids, boxes, scores


def matched_from_candidates(cands, gt: GroundTruth, num_classes):
    """Matches each IoU's candidates once; returns `{nms_iou: MatchedDetections}`."""
    out = {}
    for g, c in cands.items():
        y0, x0, y1, x1 = (c.box[:, i].astype(np.float64) * IMAGE_SIZE for i in range(4))
        dets = Detections(c.image_id.astype(np.int64), c.column.astype(np.int64) + 1,
                          np.stack([x0, y0, x1 - x0, y1 - y0], 1), c.score.astype(np.float64))
        m = match_detections(gt, dets, iou_threshold=MATCH_IOU, max_dets=100)
        out[g] = MatchedDetections(m.score.astype(np.float32), m.category_id - 1, m.tp, m.ignored,
                                   m.num_gt)
    return out


# ----------------------------------------------------------------------------------------------
# Brute force


def _keys(name, target, tp, fp, num_gt):
    """(feasible, primary, secondary) of one grid point, as documented in tfcal.tuning.search."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / num_gt if num_gt else 0.0
    if name == "precision_target":
        return tp > 0 and precision >= target, recall, precision
    den = 2.0 * tp + fp + (num_gt - tp)
    return tp > 0, (2.0 * tp / den if den else 0.0), recall  # f1


def brute_force_choose(counts, num_gt, grid, thresholds, name, target, default):
    """Per class: the (nms_iou, threshold) of the best grid point, or None if none is feasible."""
    order = sorted(range(len(grid)), key=lambda i: (abs(grid[i] - default), grid[i]))
    rank = {grid[i]: r for r, i in enumerate(order)}
    choices = []
    for c in range(len(num_gt)):
        best, choice = None, None
        for g in grid:
            for t in thresholds:
                tp, fp = counts[(g, t)]
                ok, p, s = _keys(name, target, int(tp[c]), int(fp[c]), int(num_gt[c]))
                key = (p, s, -rank[g], -t)
                if ok and (best is None or key > best):
                    best, choice = key, (g, t)
        choices.append(choice)
    return choices


def coco_counts(coco_gt, dets_array, num_classes):
    """TP/FP per class and non-ignored GT per class from pycocotools' evalImgs at MATCH_IOU."""
    from pycocotools.cocoeval import COCOeval

    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    ngt = np.zeros(num_classes, np.int64)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets_array) if len(dets_array) else None
        if coco_dt is None:
            return tp, fp, None
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([MATCH_IOU])
        ev.params.maxDets = [100]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
    for e in ev.evalImgs:
        if e is None:
            continue
        c = e["category_id"] - 1
        m, ig = e["dtMatches"][0], e["dtIgnore"][0].astype(bool)
        tp[c] += int(np.sum((m > 0) & ~ig))
        fp[c] += int(np.sum((m == 0) & ~ig))
        ngt[c] += int(np.sum(~np.asarray(e["gtIgnore"], bool)))
    return tp, fp, ngt


def coco_from_ground_truth(gt: GroundTruth, num_classes):
    from pycocotools.coco import COCO

    ds = {"images": [{"id": int(i), "width": IMAGE_SIZE, "height": IMAGE_SIZE}
                     for i in gt.image_ids],
          "categories": [{"id": int(c), "name": str(c)} for c in gt.category_ids],
          "annotations": [{"id": int(a), "image_id": int(i), "category_id": int(c),
                           "bbox": [float(v) for v in b], "area": float(ar), "iscrowd": 0}
                          for a, i, c, b, ar in zip(gt.ann_id, gt.image_id, gt.category_id,
                                                    gt.bbox, gt.area)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ds
        coco.createIndex()
    return coco


def run_comparison(num_images=500, num_anchors=150, num_classes=80, seed=0):
    # Few background boxes above the lowest threshold, so the brute force (100 COCOeval runs)
    # stays within a few minutes; the scale job below has the dense tail.
    grid = (0.3, 0.4, 0.5, 0.6, 0.7)
    thresholds = np.linspace(0.05, 0.9, 20).astype(np.float32)
    thr_list = [float(t) for t in thresholds]
    gen = RawGenerator(num_images, num_anchors, num_classes, seed, batch_size=num_images,
                       background_rate=0.001)
    gt = gen.ground_truth()
    ids, boxes, scores = next(gen.batches())
    objective = Objective("precision_target", target_precision=0.7)
    default = 0.5

    # Trace TF functions for both sides at the measured shapes first (not timed).
    lowest = float(thresholds[0])
    collect_candidates([(ids, boxes, scores)], None, grid, lowest)
    nms_fns = {g: tf.function(lambda b, s, thr, g=g: combined_nms(
        b, s, NmsOptions(iou_threshold=g, max_detections_per_class=100,
                         max_total_detections=100, label_offset=1),
        score_threshold=thr)) for g in grid}
    for g in grid:
        nms_fns[g](tf.constant(boxes), tf.constant(scores), tf.constant(0.1))

    t0 = time.perf_counter()
    cands = collect_candidates([(ids, boxes, scores)], None, grid, lowest)
    matched = matched_from_candidates(cands, gt, num_classes)
    fast = joint_search(matched, objective, default_nms_iou=default, min_support=1,
                        thresholds=thresholds)
    t_fast = time.perf_counter() - t0

    coco = coco_from_ground_truth(gt, num_classes)
    t0 = time.perf_counter()
    counts = {}
    num_gt = None
    for g in grid:
        for t in thr_list:
            out = nms_fns[g](tf.constant(boxes), tf.constant(scores), tf.constant(t, tf.float32))
            nv = out["num_detections"].numpy().astype(np.int64)
            valid = np.arange(out["detection_scores"].shape[1])[None, :] < nv[:, None]
            b = out["detection_boxes"].numpy()[valid].astype(np.float64) * IMAGE_SIZE
            arr = np.column_stack([np.repeat(ids, nv), b[:, 1], b[:, 0], b[:, 3] - b[:, 1],
                                   b[:, 2] - b[:, 0], out["detection_scores"].numpy()[valid],
                                   out["detection_classes"].numpy()[valid]])
            tp, fp, ngt = coco_counts(coco, arr, num_classes)
            counts[(g, t)] = (tp, fp)
            num_gt = ngt if ngt is not None and num_gt is None else num_gt
    brute = brute_force_choose(counts, num_gt, grid, thr_list, objective.name,
                               objective.target_precision, default)
    t_brute = time.perf_counter() - t0

    same = all(
        (b is None and c.status == "unreachable") or
        (b is not None and c.status == "ok" and (c.nms_iou, c.min_score_thresh) == b)
        for b, c in zip(brute, fast.classes))
    n_ok = sum(c.status == "ok" for c in fast.classes)
    ratio = t_brute / t_fast
    print(f"[search] {num_images} images, {num_classes} classes, {len(grid)} IoUs x "
          f"{len(thresholds)} thresholds: fast {t_fast:.2f} s, brute force {t_brute:.1f} s, "
          f"ratio {ratio:.0f}x (target >= 50x), identical choices: {same} "
          f"({n_ok} classes ok, {num_classes - n_ok} unreachable) -> "
          f"{'PASS' if same and ratio >= 50 else 'FAIL'}")
    return same and ratio >= 50


def run_scale(num_images=5000, num_anchors=3549, num_classes=80, seed=1, batch_size=50):
    grid = (0.4, 0.5, 0.6, 0.7)
    lowest = 0.05
    t0 = time.perf_counter()
    gen = RawGenerator(num_images, num_anchors, num_classes, seed, batch_size)
    gt = gen.ground_truth()
    t_setup = time.perf_counter() - t0
    temperature = np.linspace(0.8, 1.6, num_classes).astype(np.float32)
    # Raw probabilities that can calibrate to >= lowest: p >= sigmoid(T * logit(lowest)).
    floor = 1.0 / (1.0 + np.exp(-temperature * np.log(lowest / (1 - lowest))))
    floor = tf.constant((floor * (1 - 1e-4)).astype(np.float32))
    temp = tf.constant(temperature)

    def calibrate(raw):
        """Per-class temperature on the entries that can reach the lowest threshold (sparse)."""
        idx = tf.where(raw >= floor)
        p = tf.clip_by_value(tf.gather_nd(raw, idx), 1e-7, 1 - 1e-7)
        z = tf.math.log(p) - tf.math.log1p(-p)
        q = tf.sigmoid(z / tf.gather(temp, idx[:, 2]))
        return tf.scatter_nd(idx, q, tf.shape(raw, out_type=tf.int64))

    gen_time = [0.0]

    def timed_batches():
        it = gen.batches()
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            gen_time[0] += time.perf_counter() - t
            yield batch

    t0 = time.perf_counter()
    cands = collect_candidates(timed_batches(), calibrate, grid, lowest)
    t_nms = time.perf_counter() - t0 - gen_time[0]
    t1 = time.perf_counter()
    matched = matched_from_candidates(cands, gt, num_classes)
    t_match = time.perf_counter() - t1
    t1 = time.perf_counter()
    result = joint_search(matched, Objective("precision_target", target_precision=0.8))
    t_search = time.perf_counter() - t1
    total = time.perf_counter() - t0 + t_setup
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    dets = sum(len(c) for c in cands.values())
    statuses = [c.status for c in result.classes]
    print(f"[scale] {num_images} images x {num_anchors} raw boxes x {num_classes} classes, "
          f"{len(grid)} IoUs: generation {gen_time[0] + t_setup:.1f} s, calibration+NMS "
          f"{t_nms:.1f} s, matching {t_match:.1f} s, search {t_search:.2f} s "
          f"({dets} post-NMS detections); total {total:.1f} s (target < 120 s), peak RSS "
          f"{peak_gb:.2f} GB (target < 4 GB); statuses ok {statuses.count('ok')}, unreachable "
          f"{statuses.count('unreachable')}, "
          f"insufficient_data {statuses.count('insufficient_data')}"
          f" -> {'PASS' if total < 120 and peak_gb < 4 else 'FAIL'}")
    return total < 120 and peak_gb < 4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-brute-force", action="store_true")
    args = parser.parse_args(argv)
    ok = True
    if not args.skip_brute_force:
        ok &= run_comparison()
    if not args.skip_scale:
        ok &= run_scale()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
