"""Tests of `tfcal drift` (tfcal.tuning.drift) through the CLI, after tuning the known-answer job.

`tfcal drift` reads the raw outputs of the new images from the tuned config's
`model.raw_outputs`, so the job's npz holds the rows of every data set used here: the tune set
(image ids 1..60), a new set from the same construction (ids 2001..2040) and a drifted new set
(ids 1001..1040) in which car's two background false positives score 0.80 and 0.85, above car's
deployed threshold 0.70. Expected per image on the drifted set: car TP 2, FP 2 (precision 0.5,
down from 1.0 in the tuning report), person unchanged (TP 12, FP 1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import known_answer as ka
from tfcal.cli import main
from tfcal.config import load_config
from tfcal.tuning.pipeline import run_tune

TUNE_IDS = list(range(1, 61))
DRIFT_IDS = list(range(1001, 1041))
SAME_IDS = list(range(2001, 2041))
DRIFTED_CAR_FP = (0.80, 0.85)


@pytest.fixture(scope="module")
def tuned_job(tmp_path_factory):
    """The tuned known-answer job: `(root, config path)`, with the new data sets' annotations
    beside it."""
    root = tmp_path_factory.mktemp("drift")
    coco, raw = ka.build(TUNE_IDS)
    drift_coco, drift_raw = ka.build(DRIFT_IDS, car_fp_scores=DRIFTED_CAR_FP)
    same_coco, same_raw = ka.build(SAME_IDS)
    path = ka.write_job(root, coco=coco, raw=ka.merge_raw(raw, drift_raw, same_raw),
                        config=ka.default_config(output={"plots": False}))
    (root / "drifted.json").write_text(json.dumps(drift_coco))
    (root / "same.json").write_text(json.dumps(same_coco))
    (root / "images").mkdir()  # drift requires --images; raw outputs need no image files
    run_tune(load_config(path), export=False)
    return root, path


def _drift(capsys, config: Path, annotations: Path, images: Path, *extra: str):
    code = main(["drift", str(config), "--annotations", str(annotations),
                 "--images", str(images), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _newest(folder: Path) -> dict:
    return json.loads(sorted(folder.glob("drift-*.json"))[-1].read_text())


def _classes(drift: dict) -> dict[str, dict]:
    return {c["name"]: c for c in drift["classes"]}


def test_same_data_is_ok(tuned_job, capsys):
    root, config = tuned_job
    code, out, err = _drift(capsys, config, root / "instances.json", root / "images")
    assert code == 0, err
    drift = _newest(root / "run" / "drift")
    assert drift["ok"] is True and drift["failures"] == []
    assert drift["images"] == 60
    classes = _classes(drift)
    # flag is disabled in the tuned post-processing: not judged.
    assert set(classes) == {"car", "person"}
    assert (classes["car"]["tp"], classes["car"]["fp"], classes["car"]["fn"]) == (120, 0, 0)
    assert (classes["person"]["tp"], classes["person"]["fp"], classes["person"]["fn"]) == (
        720, 60, 60)
    assert classes["car"]["precision_new"] == classes["car"]["precision_report"] == 1.0
    assert all(c["status"] == "ok" for c in classes.values())
    assert drift["ece_new"] is not None and drift["ece_report"] is not None
    # The same images: LaECE_0 and LaACE_0 as in the tuning report's holdout (a subset).
    assert drift["localization"]["la_ece_0_new"] is not None
    assert drift["localization"]["la_ece_0_report"] is not None
    assert "drift: OK" in out and "LaECE_0: " in out


def test_new_data_from_the_same_source_is_ok(tuned_job, capsys, tmp_path):
    root, config = tuned_job
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, config, root / "same.json", root / "images",
                            "--out", str(out_path))
    assert code == 0, err
    drift = json.loads(out_path.read_text())
    assert drift["ok"] is True
    assert drift["images"] == 40
    assert _classes(drift)["car"]["precision_new"] == 1.0


def test_drifted_precision_exits_1_and_names_the_class(tuned_job, capsys, tmp_path):
    root, config = tuned_job
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, config, root / "drifted.json", root / "images",
                            "--out", str(out_path))
    assert code == 1, err
    drift = json.loads(out_path.read_text())
    assert drift["ok"] is False
    classes = _classes(drift)
    car = classes["car"]
    assert car["status"] == "drift"
    assert (car["tp"], car["fp"]) == (80, 80)
    assert car["precision_new"] == 0.5 and car["precision_report"] == 1.0
    assert classes["person"]["status"] == "ok"
    # Below both its target (0.9) and its holdout counts (18 TP, 0 FP in the report).
    car_failures = [f for f in drift["failures"] if f.startswith("car:")]
    assert len(car_failures) == 2
    assert "below its target 0.9" in car_failures[0]
    assert "1.000 -> 0.500" in car_failures[1] and "Fisher" in car_failures[1]
    assert not any(f.startswith("person:") for f in drift["failures"])
    assert "DRIFT DETECTED" in out and "car:" in out


def test_precision_tolerance_is_configurable(tuned_job, capsys, tmp_path):
    # A tolerance of 0.6 accepts car's fall from 1.0 to 0.5 against the report (and any ECE
    # change up to 1.0); its precision 0.5 is still significantly below the 0.9 target.
    root, config = tuned_job
    cfg = yaml.safe_load(config.read_text())
    cfg["drift"] = {"precision_tolerance": 0.6, "ece_tolerance": 1.0}
    loose = root / "loose.yaml"
    loose.write_text(yaml.safe_dump(cfg))
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, loose, root / "drifted.json", root / "images",
                            "--out", str(out_path))
    assert code == 1, err
    drift = json.loads(out_path.read_text())
    assert drift["tolerances"]["precision"] == 0.6
    assert [f for f in drift["failures"] if "->" in f] == []
    assert [f.split(":")[0] for f in drift["failures"]] == ["car"]


def _config_with_run_dir(tuned_job, tmp_path, run_dir: Path, **drift) -> Path:
    """The job's config written to `tmp_path`, with absolute paths, `run_dir` as output.dir
    and, if given, the `drift` section."""
    root, config = tuned_job
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["raw_outputs"] = str(root / "raw.npz")
    cfg["data"]["annotations"] = str(root / "instances.json")
    cfg["output"]["dir"] = str(run_dir)
    if drift:
        cfg["drift"] = drift
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_missing_postprocess_json_exits_2(tuned_job, capsys, tmp_path):
    root, _ = tuned_job
    config = _config_with_run_dir(tuned_job, tmp_path, tmp_path / "never_tuned")
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tfcal: error: ")
    assert "postprocess.json" in err and "missing" in err
    assert not (tmp_path / "never_tuned").exists()


def test_corrupt_postprocess_json_exits_2(tuned_job, capsys, tmp_path):
    # A damaged postprocess.json is bad input (exit 2, one line naming the file), not an
    # internal error.
    root, _ = tuned_job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    ppc = json.loads((run_dir / "postprocess.json").read_text())
    ppc["min_score_thresh"] = [0.7, 1.5, 1.0]
    (run_dir / "postprocess.json").write_text(json.dumps(ppc))
    config = _config_with_run_dir(tuned_job, tmp_path, run_dir)
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tfcal: error: ")
    assert "postprocess.json" in err and "min_score_thresh" in err


def test_missing_report_json_exits_2(tuned_job, capsys, tmp_path):
    root, _ = tuned_job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir, ignore=shutil.ignore_patterns("drift"))
    (run_dir / "report.json").unlink()
    config = _config_with_run_dir(tuned_job, tmp_path, run_dir)
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert "report.json" in err
    assert not (run_dir / "drift").exists()


def test_new_images_without_raw_outputs_exit_2(tuned_job, capsys, tmp_path):
    # New images whose raw outputs are not in model.raw_outputs: a clear error naming the npz.
    root, config = tuned_job
    coco, _ = ka.build(list(range(5001, 5011)))
    new = tmp_path / "unseen.json"
    new.write_text(json.dumps(coco))
    code, out, err = _drift(capsys, config, new, root / "images")
    assert code == 2, err
    assert "raw.npz" in err and "image_ids" in err


def test_raw_outputs_of_the_new_images_without_images_dir(tuned_job, capsys, tmp_path):
    # The new images' outputs in their own npz (not in the tuned config's): --raw-outputs
    # replaces the config's model, and no --images is needed.
    root, config = tuned_job
    _, drift_raw = ka.build(DRIFT_IDS, car_fp_scores=DRIFTED_CAR_FP)
    np.savez(tmp_path / "new_raw.npz", **drift_raw)
    out_path = tmp_path / "drift.json"
    code = main(["drift", str(config), "--annotations", str(root / "drifted.json"),
                 "--raw-outputs", str(tmp_path / "new_raw.npz"), "--out", str(out_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    drift = json.loads(out_path.read_text())
    car = _classes(drift)["car"]
    assert (car["status"], car["tp"], car["fp"]) == ("drift", 80, 80)
    assert drift["raw_outputs"].startswith("raw_outputs:")


def test_raw_outputs_missing_the_new_images_exits_2(tuned_job, capsys, tmp_path):
    # The tuning npz holds no rows for these ids: bad input naming the file, no drift.json.
    root, config = tuned_job
    _, drift_raw = ka.build(DRIFT_IDS[:5])
    np.savez(tmp_path / "partial.npz", **drift_raw)
    out_path = tmp_path / "drift.json"
    code = main(["drift", str(config), "--annotations", str(root / "drifted.json"),
                 "--raw-outputs", str(tmp_path / "partial.npz"), "--out", str(out_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "partial.npz" in err
    assert not out_path.exists()


def test_drift_checks_the_boxes_of_the_new_outputs(tuned_job, capsys, tmp_path):
    # Centre-size boxes of the new images, read as corners: most are inverted; refused in one
    # line naming model.box_format before any drift file is written.
    root, config = tuned_job
    _, drift_raw = ka.build(DRIFT_IDS, car_fp_scores=DRIFTED_CAR_FP)
    y0, x0, y1, x1 = np.moveaxis(drift_raw["boxes"], -1, 0)
    drift_raw["boxes"] = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
    np.savez(tmp_path / "cxcywh.npz", **drift_raw)
    out_path = tmp_path / "drift.json"
    code = main(["drift", str(config), "--annotations", str(root / "drifted.json"),
                 "--raw-outputs", str(tmp_path / "cxcywh.npz"), "--out", str(out_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "cxcywh.npz: boxes:" in err and "set model.box_format" in err
    assert not out_path.exists()


def test_saved_model_config_needs_images(tuned_job, capsys, tmp_path):
    root, config = tuned_job
    cfg = yaml.safe_load(config.read_text())
    cfg["model"].pop("raw_outputs")
    cfg["model"]["saved_model"] = str(tmp_path / "detector")
    cfg["data"]["annotations"] = str(root / "instances.json")
    cfg["output"]["dir"] = str(root / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["drift", str(path), "--annotations", str(root / "drifted.json"),
                 "--out", str(tmp_path / "drift.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "--images" in err


def test_calibration_checks_alone_fail_on_the_drifted_set(tuned_job, capsys, tmp_path):
    # min_support above any count leaves every class unjudged; with ECE tolerance 0 the
    # confident false positives (0.80, 0.85) raise ECE, LaECE_0 and LaACE_0 above the
    # report's (false positives count IoU 0), and that alone exits 1.
    root, _ = tuned_job
    config = _config_with_run_dir(tuned_job, tmp_path, root / "run", min_support=100000,
                                  ece_tolerance=0.0)
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, config, root / "drifted.json", root / "images",
                            "--out", str(out_path))
    assert code == 1, err
    drift = json.loads(out_path.read_text())
    assert drift["ece_new"] > drift["ece_report"]
    loc = drift["localization"]
    assert loc["la_ece_0_new"] > loc["la_ece_0_report"]
    assert loc["la_ace_0_new"] > loc["la_ace_0_report"]
    assert [f.split(" rose from")[0] for f in drift["failures"]] == ["ECE", "LaECE_0",
                                                                      "LaACE_0"]
    # New data from the undrifted source is better calibrated than the drifted set.
    same_path = tmp_path / "same_drift.json"
    _drift(capsys, config, root / "same.json", root / "images", "--out", str(same_path))
    same = json.loads(same_path.read_text())
    assert same["ece_new"] < drift["ece_new"]
    assert same["localization"]["la_ece_0_new"] < loc["la_ece_0_new"]


def test_classes_below_min_support_are_reported_not_judged(tuned_job, capsys, tmp_path):
    root, _ = tuned_job
    config = _config_with_run_dir(tuned_job, tmp_path, root / "run", min_support=100000,
                                  ece_tolerance=1.0)
    out_path = tmp_path / "drift.json"
    code, _, err = _drift(capsys, config, root / "drifted.json", root / "images",
                          "--out", str(out_path))
    assert code == 0, err
    drift = json.loads(out_path.read_text())
    assert {c["status"] for c in drift["classes"]} == {"low_support"}
    assert _classes(drift)["car"]["precision_new"] == 0.5  # still measured and reported


# --- one new file per run -------------------------------------------------------------------


@pytest.mark.slow
def test_each_run_writes_a_new_file_and_never_replaces_one(tuned_job, capsys, tmp_path):
    root, _ = tuned_job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir, ignore=shutil.ignore_patterns("drift"))
    config = _config_with_run_dir(tuned_job, tmp_path, run_dir)
    for _ in range(3):
        code, out, err = _drift(capsys, config, root / "same.json", root / "images")
        assert code == 0, err
    files = sorted((run_dir / "drift").glob("drift-*.json"))
    assert len(files) == 3  # same second: drift-<UTC>.json, then -2, -3
    first = files[0].read_bytes()
    # --out naming an existing file is refused before any work, and the file is untouched.
    code, out, err = _drift(capsys, config, root / "same.json", root / "images",
                            "--out", str(files[0]))
    assert code == 2 and err.count("\n") == 0, err
    assert str(files[0]) in err and "never replaced" in err
    assert files[0].read_bytes() == first
    # --out naming a folder: a new file inside it.
    (tmp_path / "results").mkdir()
    code, out, err = _drift(capsys, config, root / "same.json", root / "images",
                            "--out", str(tmp_path / "results"))
    assert code == 0, err
    assert len(list((tmp_path / "results").glob("drift-*.json"))) == 1


# --- the detector must be the tuned one ----------------------------------------------------


def test_outputs_of_another_model_are_refused_not_called_drift(tuned_job, capsys, tmp_path):
    # The run was tuned on a model with fingerprint "a" * 64; the new raw outputs (a cache
    # folder) say they come from model "b" * 64. Comparing them would report a huge "drift"
    # (ECE 0.096 -> 0.997 in the fault corpus); the right answer is: not the tuned model.
    from tfcal.raw import RawOutputs, save_cache

    root, _ = tuned_job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir, ignore=shutil.ignore_patterns("drift"))
    ppc_path = (run_dir / "postprocess.json").resolve()
    ppc = json.loads(ppc_path.read_text())
    ppc["metadata"]["model_fingerprint"] = "a" * 64
    ppc_path.write_text(json.dumps(ppc))
    coco, raw = ka.build(DRIFT_IDS, car_fp_scores=DRIFTED_CAR_FP)
    ids = np.array(DRIFT_IDS)
    sizes = np.array([im["height"] for im in coco["images"]]), \
        np.array([im["width"] for im in coco["images"]])
    cache = save_cache(tmp_path / "other_model", RawOutputs(
        ids, raw["boxes"], raw["scores"], *sizes, fingerprint="f" * 64,
        model_fingerprint="b" * 64, data_fingerprint="d" * 64))
    config = _config_with_run_dir(tuned_job, tmp_path, run_dir)
    code = main(["drift", str(config), "--annotations", str(root / "drifted.json"),
                 "--raw-outputs", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "model fingerprint bbbbbbbbbbbbbbbb" in err and "differs from the one tuned" in err
    assert "metadata.model_fingerprint aaaaaaaaaaaaaaaa" in err and "postprocess.json" in err
    assert not (run_dir / "drift").exists()


# --- the statistics ------------------------------------------------------------------------

from tfcal.tuning import drift as drift_lib  # noqa: E402


def test_binomial_p_value_by_hand():
    # P(X <= 7 | n=10, p=0.9) = 1 - P(8) - P(9) - P(10)
    #   = 1 - 45 * 0.9**8 * 0.1**2 - 10 * 0.9**9 * 0.1 - 0.9**10
    #   = 1 - 0.1937102445 - 0.387420489 - 0.3486784401 = 0.0701908264
    assert drift_lib.binomial_p_below(7, 10, 0.9) == pytest.approx(0.0701908264, abs=1e-10)
    # A class at 0.900 (9 of 10) against a 0.8 target (the YOLOv8n trial's false alarm):
    # P(X <= 9 | 10, 0.8) = 1 - 0.8**10 = 0.8926258176: nowhere near significant.
    assert drift_lib.binomial_p_below(9, 10, 0.8) == pytest.approx(0.8926258176, abs=1e-10)


def test_fisher_p_value_by_hand():
    # Table [[1, 3], [3, 1]]: rows and columns sum to 4, N = 8. Under H0 the top-left count is
    # hypergeometric, P(x) = C(4, x) * C(4, 4 - x) / C(8, 4) = C(4, x)**2 / 70, so
    # P(X <= 1) = (1 + 16) / 70 = 0.242857...
    assert drift_lib.fisher_p_below(1, 3, 3, 1) == pytest.approx(17 / 70, abs=1e-12)
    # [[0, 4], [4, 0]]: P(X <= 0) = 1 / 70.
    assert drift_lib.fisher_p_below(0, 4, 4, 0) == pytest.approx(1 / 70, abs=1e-12)


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 with m = 3: 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; 1 * 0.04 = 0.04,
    # raised to the running maximum 0.06. Returned in the input order.
    assert drift_lib.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert drift_lib.holm([]) == []


def _cls(name, tp, fp, tp_report, fp_report, target=0.9):
    return {"name": name, "tp": tp, "fp": fp, "tp_report": tp_report, "fp_report": fp_report,
            "target": target}


def test_support_is_required_on_both_sides():
    classes = [
        _cls("few_new", 5, 4, 100, 0),          # 9 new detections < 10: not judged at all
        _cls("few_reference", 40, 60, 2, 1),    # target test only (3 reference detections)
        _cls("yolo_like", 9, 1, 3, 0, 0.8),     # 0.900 vs 0.8 target, 3-detection reference
    ]
    failures = drift_lib.judge_classes(classes, significance=0.05, min_support=10,
                                       precision_tolerance=0.05)
    few_new, few_ref, yolo = classes
    assert few_new["status"] == "low_support" and few_new["p_target"] is None
    assert few_ref["p_reference"] is None and few_ref["p_target"] < 1e-20
    assert few_ref["status"] == "drift"
    assert yolo["status"] == "ok" and yolo["p_reference"] is None
    assert [f.split(":")[0] for f in failures] == ["few_reference"]


@pytest.mark.slow
def test_false_alarm_rate_when_nothing_drifted():
    # 2,000 seeded simulated drift checks of 10 classes each, where nothing drifted: every
    # class's new and reference counts come from the same true precision, which equals its
    # target (the hardest case for the target test). Holm keeps the chance of any false
    # alarm in a check at most the 0.05 level (observed well below it: the exact tests are
    # conservative with discrete counts); judging each test alone would alarm far more often.
    rng = np.random.default_rng(20240601)
    trials, alarms, alarms_uncorrected = 2000, 0, 0
    for _ in range(trials):
        precision = rng.uniform(0.8, 0.97, 10)
        n_new = rng.integers(20, 200, 10)
        n_ref = rng.integers(20, 200, 10)
        tp_new = rng.binomial(n_new, precision)
        tp_ref = rng.binomial(n_ref, precision)
        classes = [_cls(f"c{k}", int(tp_new[k]), int(n_new[k] - tp_new[k]), int(tp_ref[k]),
                        int(n_ref[k] - tp_ref[k]), float(precision[k])) for k in range(10)]
        plain = [dict(c) for c in classes]
        alarms += bool(drift_lib.judge_classes(classes, significance=0.05, min_support=10,
                                               precision_tolerance=0.0))
        alarms_uncorrected += bool(drift_lib.judge_classes(
            plain, significance=0.05, min_support=10, precision_tolerance=0.0,
            multiple_testing="none"))
    rate, rate_plain = alarms / trials, alarms_uncorrected / trials
    print(f"false-alarm rate: Holm {rate:.4f}, uncorrected {rate_plain:.4f}")
    sigma = (0.05 * 0.95 / trials) ** 0.5
    assert rate <= 0.05 + 3 * sigma, rate
    assert rate_plain > 3 * rate and rate_plain > 0.2, (rate, rate_plain)
