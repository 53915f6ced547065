"""LaECE_0 / LaACE_0 against hand-derived values and the reference code's values, D-ECE by box
features, and reliability per COCO size bucket."""

from __future__ import annotations

import numpy as np
import pytest

from tests.coco.cocogen import make_gt, make_results, write_json
from tfcal.coco.dataset import load_coco
from tfcal.coco.localization import match_with_iou
from tfcal.localization_metrics import (DetectionMatches, box_detection_ece, localization_errors,
                                        reliability_by_size, size_bucket)


def _hand_fixture(tmp_path):
    """Two 100x100 images.

    Image 1: category 1 ground truths A = [0, 0, 10, 10], B = [50, 50, 10, 10]; category 2 ground
    truth [0, 0, 20, 20]. Image 2: one crowd region of category 1, [20, 20, 30, 30].
    """
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
                     {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"},
                         {"id": 3, "name": "three"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
               "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100,
               "iscrowd": 0},
              {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "area": 400,
               "iscrowd": 0},
              {"id": 4, "image_id": 2, "category_id": 1, "bbox": [20, 20, 30, 30], "area": 900,
               "iscrowd": 1}]}
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 5], "score": 0.9},    # d1
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.82},  # d2
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.81},  # d3
        {"image_id": 1, "category_id": 1, "bbox": [80, 80, 5, 5], "score": 0.3},   # d4
        {"image_id": 2, "category_id": 1, "bbox": [25, 25, 10, 10], "score": 0.5},  # d5
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.6},   # d6
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20], "score": 0.7},   # d7
    ]
    return load_coco(write_json(tmp_path / "gt.json", gt)), dets


def _errors(m):
    return localization_errors(m.matches, m.num_gt_by_category)


def test_match_at_iou_zero_records_ious_and_the_tau_zero_quirks(tmp_path):
    ds, dets = _hand_fixture(tmp_path)
    m = match_with_iou(ds, dets)
    by_row = {int(r): i for i, r in enumerate(m.det_index)}
    # Greedy by score, tau = 0: d1 takes A (IoU 50/100); d2 finds A taken and takes B at IoU 0
    # (a candidate is kept unless its IoU is *below* tau); d3 and d4 find no free ground truth:
    # false positives; d5 meets only the crowd region: ignored; d6 matches exactly.
    expect = {0: (True, False, 0.5), 1: (True, False, 0.0), 2: (False, True, 0.0),
              3: (False, True, 0.0), 4: (False, False, 0.0), 5: (True, False, 1.0),
              6: (False, True, 0.0)}
    for row, (tp, fp, iou) in expect.items():
        i = by_row[row]
        assert (m.tp[i], m.fp[i], m.iou[i]) == (tp, fp, pytest.approx(iou)), row
    assert m.ignored[by_row[4]]
    assert dict(zip(m.category_ids.tolist(), m.num_gt.tolist())) == {1: 2, 2: 1, 3: 0}


def test_laece_and_laace_hand_derived(tmp_path):
    ds, dets = _hand_fixture(tmp_path)
    e = _errors(match_with_iou(ds, dets))
    # Category 1, 25 bins of width 0.04; the ignored d5 is left out of LaECE:
    #   bin (0.88, 0.92]: d1, accuracy 0.5 / 1, score 0.9: |0.5 - 0.9| = 0.4, weight 1/4
    #   bin (0.80, 0.84]: d2 (TP, IoU 0), d3 (FP): accuracy 0, mean score 0.815, weight 2/4
    #   bin (0.28, 0.32]: d4 (FP): |0 - 0.3| = 0.3, weight 1/4
    #   LaECE_1 = 0.1 + 0.4075 + 0.075 = 0.5825
    # LaACE_1 averages |iou - score| over every evaluated detection, d5 included:
    #   (0.4 + 0.82 + 0.81 + 0.3 + 0.5) / 5 = 0.566
    # Category 2: d6, IoU 1 at score 0.6: LaECE_2 = LaACE_2 = 0.4.
    # Category 3 has no ground truth: it takes no part. Means over categories 1 and 2.
    assert e.per_class_la_ece == pytest.approx({1: 0.5825, 2: 0.4})
    assert e.per_class_la_ace == pytest.approx({1: 0.566, 2: 0.4})
    assert e.la_ece == pytest.approx((0.5825 + 0.4) / 2)
    assert e.la_ace == pytest.approx((0.566 + 0.4) / 2)


# Golden values from the reference implementation (fiveai/detection_calibration at commit
# bf59c92, CalibrationCOCO(gt, gt, "bbox", 25, 0.0, is_ace, False, 100): evaluate,
# prepare_input, compute_single_errors, accumulate_errors), run on these generated fixtures
# (make_gt(seed, num_images=15, crowd_fraction=0.15), make_results(gt, seed + 100,
# tie_decimals=3)); the per-class values agreed to 1e-12 as well. The reference gives the
# hand-derived values of test_laece_and_laace_hand_derived too (0.49125, 0.483).
REFERENCE = {0: (0.44663545355421735, 0.4746416634037013),
             3: (0.41592571881362594, 0.4369781590263072),
             5: (0.37717327406191486, 0.3926841397679796)}


@pytest.mark.parametrize("seed", sorted(REFERENCE))
def test_laece_matches_the_reference_code(tmp_path, seed):
    gt = make_gt(seed, num_images=15, crowd_fraction=0.15)
    results = make_results(gt, seed + 100, tie_decimals=3)
    e = _errors(match_with_iou(load_coco(write_json(tmp_path / "gt.json", gt)), results))
    assert e.la_ece == pytest.approx(REFERENCE[seed][0], abs=1e-12)
    assert e.la_ace == pytest.approx(REFERENCE[seed][1], abs=1e-12)


def test_laece_bins_include_the_right_edge_and_zero_in_the_first_bin():
    # Scores 0.0 and 0.04 share bin 0 ([0, 0.04]); 0.0400001 is in bin 1. Two TPs of IoU 1:
    # bin 0 accuracy 1, mean score 0.02 -> 0.98 with weight 2/3; bin 1: |1 - 0.0400001|, 1/3.
    s = np.array([0.0, 0.04, 0.0400001])
    e = localization_errors(DetectionMatches([1, 1, 1], s, [True] * 3, [False] * 3, [1.0] * 3),
                            {1: 3})
    assert e.la_ece == pytest.approx(2 / 3 * 0.98 + 1 / 3 * (1 - 0.0400001))


def test_a_perfectly_calibrated_class_drops_out_of_the_mean_as_in_the_reference():
    # Class 1: one TP of IoU 0.7 at score 0.7: error 0, so the mean is over class 2 alone.
    e = localization_errors(DetectionMatches([1, 2], [0.7, 0.5], [True, False], [False, True],
                                             [0.7, 0.0]), {1: 1, 2: 1})
    assert e.per_class_la_ece == pytest.approx({1: 0.0, 2: 0.5})
    assert e.la_ece == pytest.approx(0.5)
    assert localization_errors(DetectionMatches([], [], [], [], []), {1: 1}).la_ece is None


def test_localization_errors_rejects_bad_input():
    with pytest.raises(ValueError, match="score"):
        localization_errors(DetectionMatches([1], [1.5], [True], [False], [1.0]), {1: 1})
    with pytest.raises(ValueError, match="both"):
        localization_errors(DetectionMatches([1], [0.5], [True], [True], [1.0]), {1: 1})


def test_box_dece_sees_a_size_effect_the_score_alone_hides():
    # Small boxes at score 0.5 are all wrong, large ones all right: per score bin the
    # precision is 0.5 = the score (D-ECE 0); split by size each half is off by 0.5.
    small = [0.0, 0.0, 0.1, 0.1]
    large = [0.0, 0.0, 0.9, 0.9]
    boxes = np.array([small] * 10 + [large] * 10)
    scores = np.full(20, 0.5)
    tp = np.array([0] * 10 + [1] * 10)
    d = box_detection_ece(scores, tp, boxes)
    assert d["score"] == pytest.approx(0.0)
    assert d["score_x_size"] == pytest.approx(0.5)
    assert d["score_x_position"] == pytest.approx(0.5)  # centres 0.05 vs 0.45: other bins


def test_size_buckets_and_reliability_by_size():
    assert size_bucket([0, 32 ** 2 - 1, 32 ** 2, 96 ** 2 - 1, 96 ** 2]).tolist() == [
        "small", "small", "medium", "medium", "large"]
    curves = reliability_by_size([0.2, 0.8, 0.9], [0, 1, 1], [10.0, 5000.0, 5000.0])
    assert curves["large"] is None
    assert curves["small"].count.sum() == 1 and curves["small"].ece == pytest.approx(0.2)
    assert curves["medium"].ece == pytest.approx(0.15)


def test_evaluate_file_reports_the_localization_block(tmp_path):
    from tfcal.coco.evaluation import evaluate_detections_file

    ds, dets = _hand_fixture(tmp_path)
    out = evaluate_detections_file(ds.path, write_json(tmp_path / "dt.json", dets))
    loc = out["localization"]
    # The hand-derived values of test_laece_and_laace_hand_derived.
    assert loc["la_ece_0"] == pytest.approx(0.49125)
    assert loc["la_ace_0"] == pytest.approx(0.483)
    # D-ECE at match IoU 0.5, 10 score bins, the ignored d5 (crowd) left out: d1 (IoU 0.5: TP,
    # 0.9), d2 (FP at 0.5: A is taken, B has IoU 0), d3 (TP on B, 0.81), d4 (FP, 0.3), d6 (TP,
    # 0.6), d7 (FP, 0.7; category 3 has no ground truth).
    # Bins: [0.9, 1.0]: d1 |1 - 0.9| = 0.1; [0.8, 0.9): d2, d3 |0.5 - 0.815| = 0.315 (x2);
    # [0.7, 0.8): d7 0.7; [0.6, 0.7): d6 0.4; [0.3, 0.4): d4 0.3. Sum / 6:
    assert loc["d_ece_score"] == pytest.approx((0.1 + 2 * 0.315 + 0.7 + 0.4 + 0.3) / 6)
