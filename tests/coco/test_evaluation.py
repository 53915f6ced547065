"""Tests for tfcal.coco.evaluation: COCOeval stats, per-class counts, detections-file checks."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.coco.dataset import load_coco
from tfcal.coco.evaluation import (STAT_KEYS, coco_stats, evaluate_detections_file,
                                   load_detections)
from tfcal.coco.matching import Detections

from .cocogen import SHARED, coco_from_dict, make_gt, make_results, reference_matches, write_json

VAL2014 = SHARED / "data" / "coco_val2014_100"


def _direct_cocoeval(gt, results):
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_from_dict(gt)
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.fixture
def generated(tmp_path):
    gt = make_gt(11, crowd_fraction=0.2)
    results = make_results(gt, 11, tie_decimals=3)
    return gt, results, load_coco(write_json(tmp_path / "instances.json", gt))


def test_stats_equal_cocoeval_and_are_silent(generated, capsys):
    gt, results, ds = generated
    before = copy.deepcopy(results)
    stats = coco_stats(ds, results)
    assert capsys.readouterr().out == ""
    assert list(stats) == list(STAT_KEYS)
    assert [stats[k] for k in STAT_KEYS] == _direct_cocoeval(gt, results).tolist()
    assert results == before  # loadRes mutates its input; we give it a copy
    # Same numbers from arrays and from a pycocotools COCO.
    dets = Detections.from_coco_results(results)
    assert coco_stats(ds.coco, dets) == stats
    arr = np.array([[r["image_id"], *r["bbox"], r["score"], r["category_id"]] for r in results])
    assert coco_stats(ds, arr) == stats


def test_stats_without_detections(generated):
    _, _, ds = generated
    stats = coco_stats(ds, [])
    assert set(stats) == set(STAT_KEYS)
    assert all(v <= 0.0 for v in stats.values())


def test_evaluate_file_per_class(generated, tmp_path):
    gt, results, _ = generated
    ann = write_json(tmp_path / "instances.json", gt)
    det = write_json(tmp_path / "dets.json", results)
    out = evaluate_detections_file(ann, det, match_iou=0.5)
    json.dumps(out, allow_nan=False)  # JSON-able
    assert out["coco_stats"]["AP"] == _direct_cocoeval(gt, results)[0]
    # Per-class counts from pycocotools' own dtMatches/dtIgnore at IoU 0.5, maxDets 100.
    rows, matches, ignore = reference_matches(gt, results, 0.5, 100)
    cats = np.array([results[r]["category_id"] for r in rows])
    for entry, cat in zip(out["per_class"], gt["categories"]):
        assert entry["category_id"] == cat["id"] and entry["name"] == cat["name"]
        in_cat = cats == cat["id"]
        tp = int(((matches > 0) & ~ignore & in_cat).sum())
        fp = int(((matches == 0) & ~ignore & in_cat).sum())
        n_gt = sum(1 for a in gt["annotations"] if a["category_id"] == cat["id"]
                   and not a["iscrowd"])
        assert (entry["tp"], entry["fp"], entry["fn"]) == (tp, fp, n_gt - tp)
        assert entry["precision"] == (tp / (tp + fp) if tp + fp else None)
        assert entry["recall"] == (tp / n_gt if n_gt else None)


@pytest.mark.slow
def test_reproduces_published_val2014_stats():
    if not VAL2014.is_dir():
        pytest.skip(f"shared COCO fixture not present at {VAL2014}")
    expected = json.loads((VAL2014 / "expected_bbox_stats.json").read_text())
    out = evaluate_detections_file(VAL2014 / "instances_val2014_100.json",
                                   VAL2014 / "instances_val2014_fakebbox100_results.json")
    assert expected["keys"] == list(STAT_KEYS)
    assert [out["coco_stats"][k] for k in STAT_KEYS] == expected["bbox"]  # exactly
    assert sum(c["tp"] for c in out["per_class"]) > 0


GOOD = {"image_id": 100, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}
BAD_DETS = [
    ("empty", [], r"\(top level\): no detections"),
    ("not a list", {"a": 1}, r"\(top level\): must be a list"),
    ("nan score", [dict(GOOD, score=float("nan"))], r"\[0\]\.score: must be a finite number"),
    ("inf score", [GOOD, dict(GOOD, score=float("inf"))], r"\[1\]\.score: must be a finite"),
    ("zero width", [dict(GOOD, bbox=[1, 2, 0, 4])], r"\[0\]\.bbox: width must be > 0, got 0"),
    ("nan box", [dict(GOOD, bbox=[float("nan"), 2, 3, 4])],
     r"\[0\]\.bbox: x must be a finite number, got nan"),
    ("short box", [dict(GOOD, bbox=[1, 2, 3])], r"\[0\]\.bbox: must be a list"),
    ("unknown image", [dict(GOOD, image_id=5)], r"\[0\]\.image_id: unknown image id"),
    ("unknown category", [dict(GOOD, category_id=3)], r"\[0\]\.category_id: unknown category"),
    ("missing score", [{k: v for k, v in GOOD.items() if k != "score"}],
     r"\[0\]\.score: missing key"),
]


@pytest.mark.parametrize("name,dets,message", BAD_DETS, ids=[b[0] for b in BAD_DETS])
def test_bad_detections_file(generated, tmp_path, name, dets, message):
    _, _, ds = generated
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(TfcalError, match=message) as err:
        load_detections(path, ds)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_bad_detections_json(generated, tmp_path):
    _, _, ds = generated
    path = tmp_path / "dets.json"
    path.write_text("[{")
    with pytest.raises(TfcalError, match="invalid JSON"):
        load_detections(path, ds)
    with pytest.raises(TfcalError, match="match_iou"):
        evaluate_detections_file(ds.path, path, match_iou=2.0)
