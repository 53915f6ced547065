"""End to end on a real detector: the whole tuning job with the NanoDet OD API export on 50 real
COCO val2017 images, from `../shared` beside the repository (skipped when it is absent).

The detector runs once (about 10 s to load plus 0.2 s per image on 2 cores); the checks are
sanity bounds, not golden values: 80 categories reported, the model's own AP50 in the range
measured with pycocotools (0.455 with its own post-processing on all 50 images), calibration
lowering the holdout ECE, and well-formed per-class choices.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import yaml

from tfcal import TfcalWarning

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "nanodet_odapi"
DATA = SHARED / "data" / "coco_val2017_tiny"
STATUSES = {"ok", "unreachable", "insufficient_data", "disabled"}
STAT_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "saved_model.pb").exists()
                       or not (DATA / "instances_val2017.json").exists(),
                       reason=f"real model and data not found under {SHARED} "
                              "(models/nanodet_odapi, data/coco_val2017_tiny)"),
]


@pytest.fixture(scope="module")
def nanodet_run(tmp_path_factory):
    from tfcal.config import load_config
    from tfcal.tuning.pipeline import run_tune

    root = tmp_path_factory.mktemp("nanodet")
    cfg = {
        "model": {"saved_model": str(MODEL), "score_converter": "sigmoid",
                  "background_column": True, "label_offset": 1,
                  "cache_dir": str(root / "cache")},
        "data": {"annotations": str(DATA / "instances_val2017.json"),
                 "images": str(DATA / "images"), "holdout_fraction": 0.3, "seed": 0},
        "calibration": {"method": "temperature"},
        "tuning": {"target_precision": 0.9, "on_unreachable": "disable"},
        "output": {"dir": str(root / "run")},
        "export": {"enabled": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # On 35 real tune images some classes' few detections are separable, so their temperature
    # stops at a bound, with a TfcalWarning; that is the only warning expected here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TfcalWarning)
        result = run_tune(load_config(path), export=False)
    unexpected = [str(w.message) for w in caught if issubclass(w.category, TfcalWarning)
                  and "temperature stopped at a bound" not in str(w.message)]
    assert not unexpected, unexpected
    return result, json.loads(result.postprocess_path.read_text())


def test_report_covers_the_80_categories(nanodet_run):
    result, ppc = nanodet_run
    report = result.report
    assert len(report["classes"]) == 80
    assert len({c["category_id"] for c in report["classes"]}) == 80
    # 90 score columns (ids 1..90, OD API label map), 80 of them used by the annotations.
    assert ppc["num_classes"] == 90
    assert report["split"]["tune_images"] + report["split"]["holdout_images"] == 50


def test_coco_stats_and_calibration(nanodet_run):
    s = nanodet_run[0].report["summary"]
    for key in ("coco_stats_before", "coco_stats_after"):
        assert set(s[key]) == set(STAT_KEYS)
    assert s["coco_stats_before"]["AP50"] > 0.3
    assert 0.0 <= s["ece_after"] < s["ece_before"]


def test_class_choices_are_well_formed(nanodet_run):
    result, ppc = nanodet_run
    report = result.report
    grid = report["target"]["nms_iou_grid"]
    for c in report["classes"]:
        assert c["status"] in STATUSES, c["status"]
        col = c["column"]
        assert ppc["class_enabled"][col] is c["enabled"]
        if c["enabled"]:
            assert 0.0 <= c["threshold"] <= 1.0, c
            assert c["nms_iou"] in grid, c
            assert ppc["min_score_thresh"][col] == c["threshold"]
            assert ppc["nms_iou"][col] == c["nms_iou"]
            assert math.isfinite(c["temperature"]) and c["temperature"] > 0
        h = c["holdout"]
        assert min(h["tp"], h["fp"], h["fn"]) >= 0
    # On 31 tune images no class has the detections to certify precision 0.9 (29 true
    # positives without a false one are the least that can): the pooled fallback is emitted,
    # marked as carrying no promise, and each certifiable-looking class gets a box estimate.
    assert any(c["enabled"] for c in report["classes"])
    for c in report["classes"]:
        g = c["guarantee"]
        assert g["kind"] in {"certified", "none"}, c
        if g["kind"] == "certified":
            assert c["status"] == "ok" and g["p_value"] <= g["test_level"], c
        elif c["status"] == "insufficient_data" and c["enabled"]:
            assert g["kind"] == "none"
    assert "With probability >= 95%" in report["summary"]["guarantee"]["statement"]
    assert (result.run_dir / "report.md").exists()
    assert (result.run_dir / "plots" / "reliability.png").exists()
