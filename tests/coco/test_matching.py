"""Tests for tfcal.coco.matching: equal to pycocotools' evalImgs dtMatches/dtIgnore."""

import json
import time

import numpy as np
import pytest

from tfcal.coco.dataset import load_coco
from tfcal.coco.matching import (Detections, GroundTruth, box_iou_coco, match_detections)

from .cocogen import SHARED, coco_from_dict, make_gt, make_results, reference_matches, write_json

VAL2014 = SHARED / "data" / "coco_val2014_100"


def assert_same_as_pycocotools(gt, results, iou, max_dets, image_ids=None, coco=None):
    rows, matches, ignore = reference_matches(gt, results, iou, max_dets, image_ids)
    got = match_detections(coco if coco is not None else coco_from_dict(gt), results,
                           iou_threshold=iou, max_dets=max_dets, image_ids=image_ids)
    np.testing.assert_array_equal(got.det_index, rows)
    np.testing.assert_array_equal(np.where(got.matched_gt_id < 0, 0, got.matched_gt_id), matches)
    np.testing.assert_array_equal(got.ignored, ignore)
    np.testing.assert_array_equal(got.tp, (matches > 0) & ~ignore)
    return got


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("iou", [0.1, 0.5, 0.75, 0.95])
def test_agrees_with_pycocotools_generated(seed, iou):
    # Crowd regions, score ties (1 decimal), duplicate detections per box, a class without gt,
    # images without detections.
    gt = make_gt(seed, crowd_fraction=0.25)
    results = make_results(gt, seed + 100)
    got = assert_same_as_pycocotools(gt, results, iou, 100)
    assert got.fp.any()
    if iou <= 0.5:
        assert got.tp.any() and got.ignored.any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_dets", [1, 2, 10])
def test_max_dets_truncation(seed, max_dets):
    gt = make_gt(seed, num_images=10, crowd_fraction=0.2)
    results = make_results(gt, seed, per_gt=4, extra=20)
    got = assert_same_as_pycocotools(gt, results, 0.5, max_dets)
    groups = np.stack([got.image_id, got.category_id], 1)
    _, counts = np.unique(groups, axis=0, return_counts=True)
    assert counts.max() <= max_dets
    if max_dets < 10:
        assert counts.max() == max_dets and len(got.tp) < len(results)  # truncation happened


def test_all_scores_tied():
    gt = make_gt(3, crowd_fraction=0.2)
    results = make_results(gt, 3, tie_decimals=0)  # scores are 0.0 or 1.0
    assert_same_as_pycocotools(gt, results, 0.5, 100)
    assert_same_as_pycocotools(gt, results, 0.5, 3)


def test_image_subset():
    gt = make_gt(5, crowd_fraction=0.2)
    results = make_results(gt, 5)
    subset = [img["id"] for img in gt["images"][::3]]
    got = assert_same_as_pycocotools(gt, results, 0.5, 100, image_ids=subset)
    assert set(got.image_id.tolist()) <= set(subset)
    non_crowd = [a for a in gt["annotations"] if a["image_id"] in subset and not a["iscrowd"]]
    assert got.num_gt.sum() == len(non_crowd)


def test_ignore_field_has_no_effect_like_pycocotools():
    # pycocotools overwrites gt["ignore"] with gt["iscrowd"] in _prepare.
    gt = make_gt(6, crowd_fraction=0.0)
    for a in gt["annotations"][::2]:
        a["ignore"] = 1
    got = assert_same_as_pycocotools(gt, make_results(gt, 6), 0.5, 100)
    assert not got.ignored.any()


def test_huge_gt_area_is_ignored_like_pycocotools():
    gt = make_gt(7, crowd_fraction=0.0)
    for a in gt["annotations"][::3]:
        a["area"] = 2e10  # outside areaRng "all" = [0, 1e10]
    got = assert_same_as_pycocotools(gt, make_results(gt, 7), 0.5, 100)
    assert got.ignored.any()


def _hand_gt():
    boxes = [  # (ann id, image id, bbox, iscrowd)
        (1, 1, [0, 0, 10, 10], 0),
        (2, 1, [0, 0, 20, 20], 1),
        (3, 2, [0, 0, 10, 10], 0),
        (4, 2, [0, 0, 10, 10], 0),
        (5, 3, [0, 0, 10, 10], 0),
    ]
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 50}
                       for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": a, "image_id": i, "category_id": 1, "bbox": b,
                             "area": float(b[2] * b[3]), "iscrowd": c} for a, i, b, c in boxes]}


def test_hand_built_known_answer():
    """Derivation, category 1 (IoU 0.5):
    image 1: d0 (0.9) IoU 1 with gt 1 and crowd IoU (inter / det area) 1 with gt 2: the non-crowd
      gt wins -> TP. d1 (0.8) and d2 (0.7) lie inside the crowd box: gt 1 is taken, crowd IoU is
      1 -> both ignored. d3 (0.6) overlaps nothing -> FP.
    image 2: gt 3 and 4 are identical; d4 and d5 tie at 0.5 (input order kept); d4 takes the
      later gt of equal IoU (4), d5 then takes 3 -> both TP.
    image 3: d6 has IoU exactly 100 / 200 = 0.5 -> TP (>=); d7 (height 20.001) just below -> FP.
    category 2 has no gt: d8 -> FP.
    """
    gt = _hand_gt()
    dets = Detections.from_arrays(
        image_id=[1, 1, 1, 1, 2, 2, 3, 3, 1],
        category_id=[1, 1, 1, 1, 1, 1, 1, 1, 2],
        bbox=[[0, 0, 10, 10], [1, 1, 10, 10], [12, 12, 5, 5], [30, 30, 5, 5],
              [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 20.001], [0, 0, 9, 9]],
        score=[0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.45, 0.3])
    got = match_detections(coco_from_dict(gt), dets, iou_threshold=0.5)
    # Output order: category, image, descending score.
    assert got.det_index.tolist() == [0, 1, 2, 3, 4, 5, 7, 6, 8]
    assert got.tp.tolist() == [True, False, False, False, True, True, False, True, False]
    assert got.ignored.tolist() == [False, True, True, False, False, False, False, False, False]
    assert got.fp.tolist() == [False, False, False, True, False, False, True, False, True]
    assert got.matched_gt_id.tolist() == [1, 2, 2, -1, 4, 3, -1, 5, -1]
    assert got.category_ids.tolist() == [1, 2] and got.num_gt.tolist() == [4, 0]
    counts = got.per_category()
    assert counts["tp"].tolist() == [4, 0] and counts["fp"].tolist() == [2, 1]
    assert counts["fn"].tolist() == [0, 0]
    assert_same_as_pycocotools(gt, dets.to_coco_results(), 0.5, 100)


def test_no_ground_truth_at_all():
    gt = _hand_gt()
    gt["annotations"] = []
    dets = Detections.from_arrays([1, 2], [1, 2], [[0, 0, 5, 5], [1, 1, 5, 5]],
                                  np.float32([0.5, 0.25]))
    got = match_detections(coco_from_dict(gt), dets)
    assert got.fp.tolist() == [True, True] and got.num_gt.tolist() == [0, 0]
    assert got.score.dtype == np.float64


def test_box_iou_matches_hand_values():
    det = np.array([[0.0, 0.0, 10.0, 10.0]])
    gt = np.array([[5.0, 0.0, 10.0, 10.0], [20.0, 20.0, 5.0, 5.0], [0.0, 0.0, 20.0, 20.0]])
    iou = box_iou_coco(det[:, None], gt[None], np.array([False, False, True]))
    np.testing.assert_allclose(iou, [[50 / 150, 0.0, 1.0]])


def test_empty_and_errors():
    gt = _hand_gt()
    coco = coco_from_dict(gt)
    empty = match_detections(coco, [])
    assert len(empty.tp) == 0 and empty.num_gt.tolist() == [4, 0]
    with pytest.raises(ValueError, match="unknown image ids"):
        match_detections(coco, Detections.from_arrays([9], [1], [[0, 0, 1, 1]], [0.5]))
    with pytest.raises(ValueError, match="unknown category ids"):
        match_detections(coco, Detections.from_arrays([1], [7], [[0, 0, 1, 1]], [0.5]))
    with pytest.raises(ValueError, match="finite"):
        match_detections(coco, Detections.from_arrays([1], [1], [[0, 0, 1, 1]], [np.nan]))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_detections(coco, [], iou_threshold=1.5)


def test_dataset_and_array_inputs_agree(tmp_path):
    gt = make_gt(9, crowd_fraction=0.2)
    results = make_results(gt, 9)
    ds = load_coco(write_json(tmp_path / "instances.json", gt))
    a = match_detections(ds, results)
    arr = np.array([[r["image_id"], *r["bbox"], r["score"], r["category_id"]] for r in results])
    b = match_detections(coco_from_dict(gt), arr)
    for field in ("det_index", "tp", "ignored", "matched_gt_id", "num_gt"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("iou,max_dets", [(0.5, 100), (0.75, 100), (0.5, 10), (0.3, 1)])
def test_agrees_with_pycocotools_on_val2014_100(iou, max_dets):
    if not VAL2014.is_dir():
        pytest.skip(f"shared COCO fixture not present at {VAL2014}")
    gt = json.loads((VAL2014 / "instances_val2014_100.json").read_text())
    results = json.loads((VAL2014 / "instances_val2014_fakebbox100_results.json").read_text())
    got = assert_same_as_pycocotools(gt, results, iou, max_dets)
    assert got.tp.sum() > 100


def _coco_sized_job(seed, num_images=5000, num_classes=80, gt_per_image=7, dets_per_image=100):
    rng = np.random.default_rng(seed)
    n_gt = num_images * gt_per_image
    img = np.repeat(np.arange(num_images), gt_per_image)
    cat = rng.integers(1, num_classes + 1, n_gt)
    wh = rng.uniform(10, 200, (n_gt, 2))
    gbox = np.concatenate([rng.uniform(0, 400, (n_gt, 2)), wh], 1)
    gt = GroundTruth(np.arange(num_images), np.arange(1, num_classes + 1),
                     np.arange(1, n_gt + 1), img, cat, gbox, wh[:, 0] * wh[:, 1],
                     rng.random(n_gt) < 0.02)
    n = num_images * dets_per_image
    dimg = np.repeat(np.arange(num_images), dets_per_image)
    src = dimg * gt_per_image + rng.integers(0, gt_per_image, n)
    near = rng.random(n) < 0.5
    box = np.where(near[:, None], gbox[src] + rng.normal(0, 8, (n, 4)),
                   np.concatenate([rng.uniform(0, 400, (n, 2)), rng.uniform(10, 200, (n, 2))], 1))
    box[:, 2:] = np.maximum(box[:, 2:], 1.0)
    dets = Detections(dimg, np.where(near, cat[src], rng.integers(1, num_classes + 1, n)), box,
                      rng.random(n).astype(np.float32).astype(np.float64))
    return gt, dets


@pytest.mark.slow
def test_speed_coco_sized_job():
    gt, dets = _coco_sized_job(0)
    start = time.perf_counter()
    got = match_detections(gt, dets, iou_threshold=0.5)
    elapsed = time.perf_counter() - start
    assert len(got.tp) == len(dets) and got.tp.sum() > 0
    assert elapsed < 10.0, f"matching 5000 images x 80 classes took {elapsed:.1f} s"
