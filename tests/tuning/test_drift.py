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
def job(tmp_path_factory):
    """The tuned job: `(root, config path)`, with the new data sets' annotations beside it."""
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


def _classes(drift: dict) -> dict[str, dict]:
    return {c["name"]: c for c in drift["classes"]}


def test_same_data_is_ok(job, capsys):
    root, config = job
    code, out, err = _drift(capsys, config, root / "instances.json", root / "images")
    assert code == 0, err
    drift = json.loads((root / "run" / "drift.json").read_text())
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
    assert "drift: OK" in out


def test_new_data_from_the_same_source_is_ok(job, capsys, tmp_path):
    root, config = job
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, config, root / "same.json", root / "images",
                            "--out", str(out_path))
    assert code == 0, err
    drift = json.loads(out_path.read_text())
    assert drift["ok"] is True
    assert drift["images"] == 40
    assert _classes(drift)["car"]["precision_new"] == 1.0


def test_drifted_precision_exits_1_and_names_the_class(job, capsys, tmp_path):
    root, config = job
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
    car_failures = [f for f in drift["failures"] if f.startswith("car:")]
    assert len(car_failures) == 1 and "1.000 -> 0.500" in car_failures[0]
    assert not any(f.startswith("person:") for f in drift["failures"])
    assert "DRIFT DETECTED" in out and "car:" in out


def test_precision_tolerance_is_configurable(job, capsys, tmp_path):
    # A tolerance of 0.6 accepts car's fall from 1.0 to 0.5 (and any ECE change up to 1.0).
    root, config = job
    cfg = yaml.safe_load(config.read_text())
    cfg["drift"] = {"precision_tolerance": 0.6, "ece_tolerance": 1.0}
    loose = root / "loose.yaml"
    loose.write_text(yaml.safe_dump(cfg))
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, loose, root / "drifted.json", root / "images",
                            "--out", str(out_path))
    assert code == 0, err
    drift = json.loads(out_path.read_text())
    assert drift["tolerances"]["precision"] == 0.6
    assert _classes(drift)["car"]["status"] == "ok"


def _config_with_run_dir(job, tmp_path, run_dir: Path, **drift) -> Path:
    """The job's config written to `tmp_path`, with absolute paths, `run_dir` as output.dir
    and, if given, the `drift` section."""
    root, config = job
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["raw_outputs"] = str(root / "raw.npz")
    cfg["data"]["annotations"] = str(root / "instances.json")
    cfg["output"]["dir"] = str(run_dir)
    if drift:
        cfg["drift"] = drift
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_missing_postprocess_json_exits_2(job, capsys, tmp_path):
    root, _ = job
    config = _config_with_run_dir(job, tmp_path, tmp_path / "never_tuned")
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tfcal: error: ")
    assert "postprocess.json" in err and "missing" in err
    assert not (tmp_path / "never_tuned" / "drift.json").exists()


def test_corrupt_postprocess_json_exits_2(job, capsys, tmp_path):
    # A damaged postprocess.json is bad input (exit 2, one line naming the file), not an
    # internal error.
    root, _ = job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    ppc = json.loads((run_dir / "postprocess.json").read_text())
    ppc["min_score_thresh"] = [0.7, 1.5, 1.0]
    (run_dir / "postprocess.json").write_text(json.dumps(ppc))
    config = _config_with_run_dir(job, tmp_path, run_dir)
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tfcal: error: ")
    assert "postprocess.json" in err and "min_score_thresh" in err


def test_missing_report_json_exits_2(job, capsys, tmp_path):
    root, _ = job
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir, ignore=shutil.ignore_patterns("drift.json"))
    (run_dir / "report.json").unlink()
    config = _config_with_run_dir(job, tmp_path, run_dir)
    code, out, err = _drift(capsys, config, root / "same.json", root / "images")
    assert code == 2, err
    assert "report.json" in err
    assert not (run_dir / "drift.json").exists()


def test_new_images_without_raw_outputs_exit_2(job, capsys, tmp_path):
    # New images whose raw outputs are not in model.raw_outputs: a clear error naming the npz.
    root, config = job
    coco, _ = ka.build(list(range(5001, 5011)))
    new = tmp_path / "unseen.json"
    new.write_text(json.dumps(coco))
    code, out, err = _drift(capsys, config, new, root / "images")
    assert code == 2, err
    assert "raw.npz" in err and "image_ids" in err


def test_raw_outputs_of_the_new_images_without_images_dir(job, capsys, tmp_path):
    # The new images' outputs in their own npz (not in the tuned config's): --raw-outputs
    # replaces the config's model, and no --images is needed.
    root, config = job
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


def test_raw_outputs_missing_the_new_images_exits_2(job, capsys, tmp_path):
    # The tuning npz holds no rows for these ids: bad input naming the file, no drift.json.
    root, config = job
    _, drift_raw = ka.build(DRIFT_IDS[:5])
    np.savez(tmp_path / "partial.npz", **drift_raw)
    out_path = tmp_path / "drift.json"
    code = main(["drift", str(config), "--annotations", str(root / "drifted.json"),
                 "--raw-outputs", str(tmp_path / "partial.npz"), "--out", str(out_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "partial.npz" in err
    assert not out_path.exists()


def test_saved_model_config_needs_images(job, capsys, tmp_path):
    root, config = job
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


def test_ece_check_alone_fails_on_the_drifted_set(job, capsys, tmp_path):
    # Precision tolerance 1.0 accepts car's drop; with ECE tolerance 0 the confident false
    # positives (0.80, 0.85) raise ECE above the report's, and that alone exits 1.
    root, _ = job
    config = _config_with_run_dir(job, tmp_path, root / "run", precision_tolerance=1.0,
                                  ece_tolerance=0.0)
    out_path = tmp_path / "drift.json"
    code, out, err = _drift(capsys, config, root / "drifted.json", root / "images",
                            "--out", str(out_path))
    assert code == 1, err
    drift = json.loads(out_path.read_text())
    assert drift["ece_new"] > drift["ece_report"]
    assert len(drift["failures"]) == 1 and drift["failures"][0].startswith("ECE rose from")
    # New data from the undrifted source is better calibrated than the drifted set.
    same_path = tmp_path / "same_drift.json"
    _drift(capsys, config, root / "same.json", root / "images", "--out", str(same_path))
    assert json.loads(same_path.read_text())["ece_new"] < drift["ece_new"]


def test_classes_below_min_support_are_reported_not_judged(job, capsys, tmp_path):
    root, _ = job
    config = _config_with_run_dir(job, tmp_path, root / "run", min_support=100000,
                                  ece_tolerance=1.0)
    out_path = tmp_path / "drift.json"
    code, _, err = _drift(capsys, config, root / "drifted.json", root / "images",
                          "--out", str(out_path))
    assert code == 0, err
    drift = json.loads(out_path.read_text())
    assert {c["status"] for c in drift["classes"]} == {"low_support"}
    assert _classes(drift)["car"]["precision_new"] == 0.5  # still measured and reported
