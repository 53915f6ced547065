"""Tests of tfcal.tuning.pipeline end to end on the known-answer job (tests/tuning/known_answer.py).

Every expected number below comes from the construction documented in known_answer.py: the
chosen thresholds and NMS IoUs, the holdout TP/FP/FN (per-image counts times the number of
holdout images), the subgroup counts and the COCO recall stats.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import known_answer as ka
from tfcal import TfcalWarning
from tfcal.cli import main
from tfcal.config import load_config
from tfcal.tuning.pipeline import run_tune
from tfcal.tuning.search import GROUP_SHARE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _by_name(report) -> dict[str, dict]:
    return {c["name"]: c for c in report["classes"]}


def _check_choice(report, ppc, expected: dict[str, ka.Point]):
    """Checks postprocess.json and report.json classes against the expected points."""
    holdout = report["split"]["holdout_images"]
    # Certified runs count the tune block on the certify part of the tune images.
    tune = report["split"].get("certify_images", report["split"]["tune_images"])
    classes = _by_name(report)
    assert set(classes) == set(ka.NAMES)
    for name, point in expected.items():
        c = classes[name]
        col = c["column"]
        assert col == ka.NAMES.index(name)
        what = f"{name}: {c}"
        assert ppc["min_score_thresh"][col] == ka.expected_threshold(point.threshold), what
        assert ppc["nms_iou"][col] == point.nms_iou, what
        assert ppc["class_enabled"][col] is point.enabled, what
        assert c["status"] == point.status, what
        assert c["enabled"] is point.enabled, what
        assert c["threshold"] == ka.expected_threshold(point.threshold), what
        assert c["nms_iou"] == point.nms_iou, what
        h = c["holdout"]
        assert (h["tp"], h["fp"], h["fn"]) == (point.tp * holdout, point.fp * holdout,
                                               point.fn * holdout), what
        t = c["tune"]
        assert (t["tp"], t["fp"], t["fn"]) == (point.tp * tune, point.fp * tune,
                                               point.fn * tune), what
        assert t["num_gt"] == ka.GT_PER_IMAGE[name] * tune


# ---------------------------------------------------------------------------------------------
# The default job: precision >= 0.9, calibration none, on_unreachable disable.


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return ka.tune(tmp_path_factory.mktemp("base"))


def test_split_sizes(base):
    report, *_ = base
    assert report["split"]["tune_images"] + report["split"]["holdout_images"] == 60
    assert report["split"]["holdout_images"] == 18  # round(0.3 * 60); every image has every class
    assert report["split"]["mode"] == "holdout"


def test_postprocess_json_has_the_known_answer(base):
    report, ppc, *_ = base
    _check_choice(report, ppc, ka.EXPECTED["precision_target"])
    assert ppc["num_classes"] == 3
    assert ppc["calibration"] == "none"
    assert ppc["class_ids"] == [1, 2, 3]
    assert ppc["label_offset"] == 1
    # car t = 0.70 (float32), person 0.75, flag disabled (threshold 1.0 at the default IoU).
    assert ppc["min_score_thresh"] == [float(np.float32(0.70)), 0.75, 1.0]
    assert ppc["nms_iou"] == [0.5, 0.6, 0.5]
    assert ppc["class_enabled"] == [True, True, False]


def test_report_classes_holdout_blocks(base):
    report, *_ = base
    classes = _by_name(report)
    car, person, flag = classes["car"]["holdout"], classes["person"]["holdout"], \
        classes["flag"]["holdout"]
    assert car["precision"] == 1.0 and car["recall"] == 1.0
    assert person["precision"] == pytest.approx(12 / 13) and person["recall"] == pytest.approx(
        12 / 13)
    for h in (car, person):
        assert 0.0 <= h["precision_lower"] <= h["precision"] <= h["precision_upper"] <= 1.0
        assert h["meets_target"] is True
    # The disabled class emits nothing: no precision, its objects are misses.
    assert flag["precision"] is None and flag["precision_lower"] is None
    assert flag["recall"] == 0.0
    assert flag["meets_target"] is None
    assert classes["flag"]["objective"] == "precision_target"
    assert [c["category_id"] for c in report["classes"]] == [1, 2, 3]


def test_report_summary(base):
    report, *_ = base
    s = report["summary"]
    h = report["split"]["holdout_images"]
    for key in ("coco_stats_before", "coco_stats_after"):
        assert set(s[key]) == set(ka.STAT_KEYS)
        for stat, v in s[key].items():
            assert isinstance(v, float) and (v == -1.0 or 0.0 <= v <= 1.0), (key, stat, v)
        # Every box is 20 x 20 = 400 px^2 < 32^2: all objects are small.
        assert s[key]["AP_medium"] == s[key]["AP_large"] == -1.0
        assert s[key]["AP_small"] == pytest.approx(s[key]["AP"])
    # Recall stats by hand. Boxes are exact (IoU 1), so recall is the same at every COCO IoU.
    # Before (no threshold, NMS 0.5 everywhere): car 2/2, person 12/13 (the 0.87 of the crowded
    # pair is suppressed), flag 1/1. After: car 2/2, person 12/13 (t = 0.75, NMS 0.6), flag off.
    # AR_1 (top detection per image and class): car 1/2, person 1/13 (0.96), flag 0 (0.90 FP).
    # AR_10: car 1; person 9 TPs among the 10 best (0.95 is a FP; before, 0.87 is gone, so the
    # 10th is the second 0.80; after, 0.87 is in and the second 0.80 drops out); flag 1 / 0.
    before, after = s["coco_stats_before"], s["coco_stats_after"]
    assert before["AR_100"] == pytest.approx((1 + 12 / 13 + 1) / 3, abs=1e-9)
    assert after["AR_100"] == pytest.approx((1 + 12 / 13 + 0) / 3, abs=1e-9)
    assert before["AR_1"] == after["AR_1"] == pytest.approx((0.5 + 1 / 13 + 0) / 3, abs=1e-9)
    assert before["AR_10"] == pytest.approx((1 + 9 / 13 + 1) / 3, abs=1e-9)
    assert after["AR_10"] == pytest.approx((1 + 9 / 13 + 0) / 3, abs=1e-9)
    # Calibration none: the same probabilities before and after.
    assert s["ece_before"] == pytest.approx(s["ece_after"])
    assert 0.0 <= s["ece_before"] <= 1.0
    # Holdout totals: enabled classes' TP/FP (car 2 + person 12, person 1), every class's FN
    # (person 1 + flag 1) per image.
    assert (s["holdout"]["tp"], s["holdout"]["fp"], s["holdout"]["fn"]) == (14 * h, h, 2 * h)
    assert s["calibration_samples"] > 0


def test_report_subgroups(base):
    report, *_ = base
    groups = {g["value"]: g for g in report["subgroups"]}
    assert set(groups) == {"front", "rear"}
    assert all(g["field"] == "camera" for g in report["subgroups"])
    assert sum(g["images"] for g in groups.values()) == report["split"]["holdout_images"]
    for g in groups.values():
        n = g["images"]
        assert n > 0
        # Per image: TP car 2 + person 12, FP person 1, FN person 1 + flag 1 (disabled).
        assert (g["tp"], g["fp"], g["fn"]) == (14 * n, n, 2 * n), g
        assert g["precision"] == pytest.approx(14 / 15)
        assert g["recall"] == pytest.approx(14 / 16)
        assert g["below_target"] is False
        assert g["ece"] is not None


def test_subgroup_below_target_is_flagged(tmp_path):
    # Global target 0.95, person kept at 0.9 by an override: the choices stay those of the base
    # job (car precision 1 >= 0.95), so each subgroup's precision is 14/15 = 0.933 < 0.95.
    report, *_ = ka.tune(tmp_path, tuning={"target_precision": 0.95,
                                            "classes": {"person": {"target_precision": 0.9}}},
                          output={"plots": False})
    assert report["subgroups"]
    for g in report["subgroups"]:
        assert g["precision"] == pytest.approx(14 / 15)
        assert g["below_target"] is True, g


def test_provenance(base):
    report, ppc, run_dir, config_path = base
    p = report["provenance"]
    assert {"config_sha256", "model_fingerprint", "data_fingerprint", "versions"} <= set(p)
    assert p["config_sha256"] == hashlib.sha256(config_path.read_bytes()).hexdigest()
    assert len(p["data_fingerprint"]) == 64
    assert {"tfcal", "tensorflow", "numpy", "pycocotools", "python"} <= set(p["versions"])
    meta = dict(ppc["metadata"])
    meta.pop("report_summary")
    assert meta == p
    assert ppc["metadata"]["report_summary"]["classes"] == {"1": "ok", "2": "ok",
                                                           "3": "unreachable"}


def test_report_files(base):
    report, ppc, run_dir, _ = base
    md = (run_dir / "report.md").read_text()
    for name, c in _by_name(report).items():
        row = f"| {c['category_id']} | {name} | {c['status']} |"
        assert row in md, row
    assert "never emitted" in md  # the disabled flag class
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["classes"] == report["classes"]
    plots = on_disk["plots"]
    # Plotted: the reliability diagram (also by box size), the IoU trade-off and the enabled
    # classes with ground truth (car, person; the disabled flag is not plotted).
    expected = {"plots/reliability.png", "plots/reliability_by_size.png",
                "plots/iou_tradeoff.png", "plots/pr_threshold_1.png", "plots/pr_threshold_2.png"}
    assert set(plots.values()) == expected
    for rel in expected:
        data = (run_dir / rel).read_bytes()
        assert data.startswith(PNG_SIGNATURE), rel
        assert len(data) > 1000, rel
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(
        Path(r).name for r in expected)


# ---------------------------------------------------------------------------------------------
# The split: holdout images never influence the choice.


def _holdout_rows(report, num_images=60):
    from tfcal.tuning.split import split_images

    ids = np.arange(1, num_images + 1)
    _, holdout = split_images(ids, np.ones((num_images, 3), bool), holdout_fraction=0.3, seed=0)
    assert len(holdout) == report["split"]["holdout_images"]
    return np.asarray(holdout) - 1  # image id i + 1 is row i


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, base):
    """The base job with the holdout images' scores changed so that, were they used, every
    choice would move: car background FPs at 0.99 (car would need t > 0.99), person's 0.95 FP
    at 0.05 (person would reach recall 1 at t = 0.70: 13/14 >= 0.9), flag FPs at 0.01 (flag would
    be reachable at t = 0.40)."""
    report = base[0]
    rows = _holdout_rows(report)
    _, raw = ka.build(list(range(1, 61)))
    raw = copy.deepcopy(raw)
    for r in rows:
        for n, (cat, cell, shifted, score) in enumerate(ka.image_content(int(r))[1]):
            if cat == 1 and cell in (2, 3):
                raw["scores"][r, n, cat] = 0.99
            elif cat == 2 and score == 0.95:
                raw["scores"][r, n, cat] = 0.05
            elif cat == 3 and score != ka.FLAG_TP_SCORE:
                raw["scores"][r, n, cat] = 0.01
    return ka.tune(tmp_path_factory.mktemp("perturbed"), raw=raw), rows


def test_holdout_scores_do_not_change_the_choice(base, perturbed):
    (report, ppc, *_), rows = perturbed
    for key in ("min_score_thresh", "nms_iou", "class_enabled"):
        assert ppc[key] == base[1][key], key
    for c, b in zip(report["classes"], base[0]["classes"]):
        assert c["tune"] == b["tune"]
    # ... but they are what the holdout report measures: car FPs 2 per image, person none.
    h = len(rows)
    classes = _by_name(report)
    assert (classes["car"]["holdout"]["tp"], classes["car"]["holdout"]["fp"]) == (2 * h, 2 * h)
    assert (classes["person"]["holdout"]["tp"], classes["person"]["holdout"]["fp"]) == (12 * h, 0)
    assert classes["car"]["holdout"]["meets_target"] is False
    assert any("car" in n and "the target on the holdout" in n for n in report["notes"])


def test_provenance_identifies_the_raw_outputs(base, perturbed):
    # Two runs on different raw outputs (same config text and images) must not share the same
    # provenance: otherwise report.json cannot tell which detector outputs it measured.
    (report, *_), _ = perturbed
    fields = ("config_sha256", "model_fingerprint", "data_fingerprint")
    assert tuple(report["provenance"][f] for f in fields) != tuple(
        base[0]["provenance"][f] for f in fields)


# ---------------------------------------------------------------------------------------------
# Calibration, policies, overrides and objectives.


def _sigmoid_t(p: float, t: float) -> float:
    z = math.log(p / (1.0 - p))
    return 1.0 / (1.0 + math.exp(-z / t))


def _check_monotone_calibration(report, ppc, base):
    """A per-class temperature is monotone, so the same detections are chosen: the thresholds are
    the calibrated 0.70 (car) and 0.75 (person), at the same IoUs, with the same counts."""
    classes = _by_name(report)
    base_classes = _by_name(base[0])
    assert ppc["calibration"] == "temperature"
    assert len(ppc["temperature"]) == 3
    for name, raw_thresh in (("car", 0.70), ("person", 0.75)):
        c = classes[name]
        t = c["temperature"]
        assert t == pytest.approx(ppc["temperature"][c["column"]])
        assert c["calibration"] == {"temperature": t}
        assert c["threshold"] == pytest.approx(_sigmoid_t(raw_thresh, t), abs=1e-6)
        assert ppc["min_score_thresh"][c["column"]] == c["threshold"]
        assert c["nms_iou"] == base_classes[name]["nms_iou"]
        assert c["holdout"] == base_classes[name]["holdout"]
        assert c["tune"] == base_classes[name]["tune"]
    assert classes["flag"]["status"] == "unreachable" and classes["flag"]["enabled"] is False
    assert report["calibration"]["method"] == "temperature"


def test_pooled_temperature_keeps_the_choice(tmp_path, base):
    report, ppc, *_ = ka.tune(tmp_path, calibration={"method": "temperature", "per_class": False},
                               output={"plots": False})
    _check_monotone_calibration(report, ppc, base)
    temps = {c["temperature"] for c in report["classes"]}
    assert len(temps) == 1 and 0.05 < temps.pop() < 20.0
    # The raw scores are over-confident overall (e.g. flag FPs at 0.9): one temperature > 1
    # lowers the ECE of the holdout detections.
    s = report["summary"]
    assert s["ece_after"] < s["ece_before"]
    assert report["classes"][0]["temperature"] > 1.0


def test_per_class_temperature_warns_on_separable_classes(tmp_path, base):
    # car's calibration sample is separable (TPs >= 0.70 > FPs) and flag's is anti-ordered
    # (FPs above the TP): their own temperatures stop at the bounds (0.05, 20), so they take
    # the pooled fit instead, with a warning naming them.
    with pytest.warns(TfcalWarning,
                      match=r"stopped at a bound .*classes \[car \(id 1\), flag \(id 3\)\]"):
        report, ppc, *_ = ka.tune(tmp_path, calibration={"method": "temperature"},
                                   output={"plots": False})
    _check_monotone_calibration(report, ppc, base)
    classes = _by_name(report)
    pooled = report["calibration"]["pooled"]["temperature"]
    assert 0.05 < pooled < 20.0
    assert classes["car"]["temperature"] == pytest.approx(pooled)
    assert classes["flag"]["temperature"] == pytest.approx(pooled)
    assert 0.05 < classes["person"]["temperature"] < 20.0
    assert classes["person"]["temperature"] != pytest.approx(pooled)
    assert set(report["calibration"]["fallback_classes"]) >= {1, 3}


def test_best_effort_policy(tmp_path):
    report, ppc, *_ = ka.tune(tmp_path, tuning={"on_unreachable": "best_effort"},
                               output={"plots": False})
    _check_choice(report, ppc, ka.EXPECTED["best_effort"])
    flag = _by_name(report)["flag"]
    assert flag["holdout"]["precision"] == pytest.approx(1 / 3)
    assert flag["holdout"]["meets_target"] is False
    assert ppc["class_enabled"] == [True, True, True]


def test_error_policy_exits_2_with_one_line(tmp_path, capsys):
    path = ka.write_job(tmp_path, config=ka.default_config(tuning={"on_unreachable": "error"}))
    code = main(["tune", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0, err
    assert err.startswith("tfcal: error: ")
    assert "unreachable" in err
    assert not (tmp_path / "run").exists()
    # The user names classes by category name or id; the message must say which class.
    assert "flag" in err, err


def test_error_policy_per_class_override_only_hits_that_class(tmp_path):
    # on_unreachable error for car only (reachable): the run succeeds, flag stays disabled.
    report, ppc, *_ = ka.tune(tmp_path, tuning={"classes": {"car": {"on_unreachable": "error"}}},
                               output={"plots": False})
    _check_choice(report, ppc, ka.EXPECTED["precision_target"])


def test_class_overrides_by_name_and_id(tmp_path):
    report, ppc, *_ = ka.tune(
        tmp_path, tuning={"classes": {"person": {"target_precision": 0.95},
                                      3: {"target_precision": 0.3}}},
        output={"plots": False})
    _check_choice(report, ppc, ka.EXPECTED["overrides"])
    # meets_target uses each class's own target.
    classes = _by_name(report)
    assert classes["flag"]["holdout"]["meets_target"] is True
    assert classes["person"]["holdout"]["meets_target"] is True


def test_unknown_class_override_is_bad_input(tmp_path, capsys):
    path = ka.write_job(tmp_path, config=ka.default_config(
        tuning={"classes": {"truck": {"target_precision": 0.8}}}))
    code = main(["tune", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "tuning.classes.truck" in err and str(path) in err
    assert not (tmp_path / "run").exists()


OBJECTIVE_CASES = {
    "certified": {"objective": "precision_target", "confidence": 0.95},
    "recall_target": {"objective": "recall_target", "target_recall": 1.0},
    "f1": {"objective": "f1"},
    "cost_fp3_fn1": {"objective": "cost", "c_fp": 3.0, "c_fn": 1.0},
    "cost_fp1_fn4": {"objective": "cost", "c_fp": 1.0, "c_fn": 4.0},
}


@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_objectives(tmp_path, case):
    report, ppc, *_ = ka.tune(tmp_path, tuning=OBJECTIVE_CASES[case], output={"plots": False})
    _check_choice(report, ppc, ka.EXPECTED[case])
    assert all(c["objective"] == OBJECTIVE_CASES[case]["objective"] for c in report["classes"])
    assert report["target"]["objective"] == OBJECTIVE_CASES[case]["objective"]


def test_kfold_evaluates_every_image_out_of_fold(tmp_path):
    # Every fold's tune part holds whole images of identical per-class counts, so each fold
    # chooses the known answer, and the out-of-fold counts are the per-image counts times 60.
    report, ppc, *_ = ka.tune(tmp_path, data={"kfold": 3}, output={"plots": False})
    assert report["split"]["mode"] == "kfold" and report["split"]["k"] == 3
    assert report["split"]["holdout_images"] == report["split"]["tune_images"] == 60
    _check_choice(report, ppc, ka.EXPECTED["precision_target"])
    assert sum(g["images"] for g in report["subgroups"]) == 60


def test_rerun_is_deterministic(tmp_path, base):
    report, ppc, *_ = ka.tune(tmp_path)
    assert ppc["min_score_thresh"] == base[1]["min_score_thresh"]
    assert report["classes"] == base[0]["classes"]
    assert report["summary"] == base[0]["summary"]


def test_score_columns_without_a_category_are_never_emitted(tmp_path):
    # Drop the flag category (column 2) from the annotations: that column can no longer be
    # evaluated, so the tuned post-processing disables it and the report says so.
    coco, raw = ka.build(list(range(1, 61)))
    coco["categories"] = [c for c in coco["categories"] if c["id"] != 3]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != 3]
    path = ka.write_job(tmp_path, coco=coco, raw=raw,
                        config=ka.default_config(output={"plots": False}))
    result = run_tune(load_config(path), export=False)
    ppc = json.loads(result.postprocess_path.read_text())
    assert ppc["class_enabled"][2] is False
    assert ppc["class_enabled"][:2] == [True, True]
    assert {c["name"] for c in result.report["classes"]} == {"car", "person"}
    assert any("1 score column maps to no category" in n for n in result.report["notes"])


def test_tune_hands_serving_a_detector_description(tmp_path):
    from tfcal.handoff import DetectorDescription

    _, ppc, run_dir, _ = ka.tune(tmp_path)
    d = DetectorDescription.load(run_dir / "detector.json")
    assert d.saved_model is None  # tuned from precomputed raw outputs
    assert list(d.category_ids) == ppc["class_ids"] == [1, 2, 3]
    assert d.model_fingerprint == ppc["metadata"]["model_fingerprint"]
    assert (d.label_offset, d.score_converter, d.background_column) == (1, "sigmoid", True)


def test_pooled_scope_fits_the_calibration_on_the_learn_part_only(tmp_path):
    """With `scope: pooled` and a certified target the calibration orders the classes for the
    pooled test, so it is fitted on the learn part of the tune images (never the certify
    part); per class it keeps every tune image."""
    from tfcal.tuning.calibrate import fit_calibration
    from tfcal.tuning.prepare import prepare
    from tfcal.tuning.tune import learn_split

    report, ppc, _, path = ka.tune(tmp_path, calibration={"method": "platt", "per_class": False},
                                    tuning={"scope": "pooled", "confidence": 0.95},
                                    output={"plots": False})
    assert report["calibration"]["fitted_on"] == "learn"
    cfg = load_config(path)
    prep = prepare(cfg)
    ids = prep.dataset.image_ids.tolist()
    tune_idx = np.sort([ids.index(i) for i in report["split"]["tune_image_ids"]])
    learn_idx, cert_idx = learn_split(cfg, prep, tune_idx)
    assert sorted(ids[i] for i in learn_idx) == sorted(report["split"]["learn_image_ids"])
    on_learn = fit_calibration(cfg, prep, learn_idx)
    on_tune = fit_calibration(cfg, prep, tune_idx)
    assert ppc["platt_a"] == pytest.approx(list(on_learn.platt_a))
    assert ppc["platt_b"] == pytest.approx(list(on_learn.platt_b))
    assert list(on_tune.platt_a) != pytest.approx(list(on_learn.platt_a))
    per_class, *_ = ka.tune(tmp_path / "per_class",
                             calibration={"method": "platt", "per_class": False},
                             tuning={"confidence": 0.95}, output={"plots": False})
    assert per_class["calibration"]["fitted_on"] == "tune"


def test_export_of_precomputed_raw_outputs_lands_at_the_postprocess_model(tmp_path):
    # Raw outputs have no detector to bake in: the model takes raw boxes and scores, so it is
    # <model_name>_postprocess (as `--postprocess-only`), never a version of <model_name>.
    path = ka.write_job(tmp_path, config=ka.default_config(
        export={"enabled": True, "dir": "export", "model_name": "det", "verify": False}))
    run_tune(load_config(path), export=True)
    assert (tmp_path / "export" / "det_postprocess" / "1" / "saved_model.pb").is_file()
    assert not (tmp_path / "export" / "det").exists()


def test_pool_policy_fits_on_the_learn_part_and_reports_the_group(tmp_path):
    """`on_unreachable: pool` compares the group's classes by calibrated score, so the
    calibration is fitted on the learn part. Target 0.8 (at 0.9 the top of this job's pooled
    curve, with person's 0.95 and flag's 0.90 false positives in every image, is too close to
    the target for the group's share of the level). Every class is a member of the group
    (flag's top detection is a false positive, but one detection cannot show a class below the
    target: the 95% upper bound of 0 in 1 is 0.95). The group is certified first, so the alone
    tests run at the whole 0.05: car and person certify alone and keep their own points; flag
    (precision 1/3) is emitted at the group's certified threshold. Without pooling flag is
    disabled."""
    tuning = {"confidence": 0.95, "target_precision": 0.8}
    calibration = {"method": "platt", "per_class": False}
    report, ppc, run_dir, _ = ka.tune(tmp_path, calibration=calibration,
                                       tuning={**tuning, "on_unreachable": "pool"},
                                    output={"plots": False})
    assert report["calibration"]["fitted_on"] == "learn"
    assert report["target"]["on_unreachable"] == "pool"
    g = report["summary"]["guarantee"]
    assert "Every class the learn images do not show below the target" in g["statement"]
    assert g["classes"] == {"certified": 2, "pooled": 1}
    group = g["group"]
    assert (group["members"], group["classes"], group["guarantee"]) == (3, 1, "certified")
    assert group["p_value"] <= group["test_level"] == pytest.approx(0.05 * GROUP_SHARE)
    classes = _by_name(report)
    for name in ("car", "person"):
        assert classes[name]["guarantee"]["kind"] == "certified"
        assert classes[name]["guarantee"]["test_level"] == pytest.approx(0.05)
    flag = classes["flag"]
    assert (flag["status"], flag["guarantee"]["kind"], flag["enabled"]) == ("pooled", "pooled",
                                                                            True)
    assert ppc["min_score_thresh"][flag["column"]] == flag["threshold"] == group["threshold"]
    assert ppc["nms_iou"][flag["column"]] == flag["nms_iou"] == group["nms_iou"]
    for key in ("tp", "fp", "fn"):
        assert group["holdout"][key] == flag["holdout"][key]
    assert ("Pooled group (3 members, 1 emitted at its threshold, certified): threshold"
            in (run_dir / "report.md").read_text())
    plain, plain_ppc, *_ = ka.tune(tmp_path / "plain", calibration=calibration,
                                    tuning={**tuning, "on_unreachable": "disable"},
                                 output={"plots": False})
    assert plain_ppc["class_enabled"][flag["column"]] is False
    assert "group" not in plain["summary"]["guarantee"]


def test_report_localization_block(base):
    report, *_ = base
    loc = report["summary"]["localization"]
    # Calibration none: the same scores before and after, so the same numbers.
    assert loc["before"] == loc["after"]
    side = loc["before"]
    assert 0.0 < side["la_ece_0"] < 1.0 and 0.0 < side["la_ace_0"] < 1.0
    assert {c["name"] for c in side["classes"]} <= set(ka.NAMES)
    # Every box is 20 x 20 px: only the small bucket has detections.
    assert side["reliability_by_size"]["medium"] is None
    assert side["reliability_by_size"]["large"] is None
    assert side["reliability_by_size"]["small"]["ece"] == pytest.approx(
        report["summary"]["ece_before"])
    # One size bucket, so the score x size D-ECE is the score-only one (10 bins, like the ECE).
    assert side["d_ece"]["score_x_size"] == pytest.approx(side["d_ece"]["score"])
    assert side["d_ece"]["score"] == pytest.approx(report["summary"]["ece_before"])


def test_box_platt_is_fitted_on_the_learn_part_and_served_with_the_boxes(tmp_path):
    """box_platt reorders a class's own detections (the threshold moves with the box size), so
    with a certified per-class target it is fitted on the learn part only; the deployed
    post-processing reads the boxes (the known-answer boxes are all 20 x 20 px, so the size
    feature is one constant and the fit is the class-only fit plus a shift)."""
    from tfcal.layers import PostProcessor
    from tfcal.postprocess import PostProcessConfig
    from tfcal.tuning.calibrate import fit_calibration
    from tfcal.tuning.prepare import prepare
    from tfcal.tuning.tune import learn_split

    # flag's learn detections are anti-ordered: its class-only Platt slope is clamped to 0
    # (and its box fit, whose slope is negative too, is not used).
    with pytest.warns(TfcalWarning, match=r"clamped to a = 0 .*flag"):
        report, ppc, run_dir, path = ka.tune(tmp_path, calibration={"method": "box_platt"},
                                             tuning={"confidence": 0.95},
                                             output={"plots": False})
    assert report["calibration"]["fitted_on"] == "learn"
    assert set(report["classes"][0]["calibration"]) == {"a", "b", "c"}
    cfg = load_config(path)
    prep = prepare(cfg)
    ids = prep.dataset.image_ids.tolist()
    tune_idx = np.sort([ids.index(i) for i in report["split"]["tune_image_ids"]])
    learn_idx, _ = learn_split(cfg, prep, tune_idx)
    with pytest.warns(TfcalWarning, match="flag"):
        on_learn = fit_calibration(cfg, prep, learn_idx)
    for name in ("box_a", "box_b", "box_c"):
        assert ppc[name] == pytest.approx(list(getattr(on_learn, name)))
    # The served graph calibrates with the boxes: a larger box changes the score.
    layer = PostProcessor(PostProcessConfig.from_dict(ppc).replace(min_score_thresh=(0.0,)))
    raw = np.zeros((1, 2, prep.num_classes + 1), np.float32)
    raw[:, :, 1] = 0.8
    boxes = np.float32([[[0.0, 0.0, 0.05, 0.05], [0.0, 0.0, 0.9, 0.9]]])
    scores = layer.score_calibration(raw, boxes).numpy()[0, :, 0]
    assert (scores[1] > scores[0]) == (ppc["box_c"][0] > 0)
    assert "LaECE_0" in (run_dir / "report.md").read_text()
