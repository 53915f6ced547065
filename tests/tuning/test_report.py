"""Tests of tfcal.tuning.report: report.md rendering of a hand-made report, load_report errors, and
`tfcal report RUN_DIR` re-rendering (hand-made report and a real tuning run)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.cli import main
from tfcal.tuning.report import STAT_KEYS, load_report, render_markdown, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUIRED_KEYS = ("classes", "summary", "target", "split", "calibration", "provenance")


def _holdout(tp, fp, fn, precision, lower, upper, recall, meets):
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "precision_lower": lower,
            "precision_upper": upper, "recall": recall, "meets_target": meets}


def minimal_report(*, curves: bool = False) -> dict:
    """A hand-made report.json content: three classes (ok with a temperature, ok with Platt
    parameters missing the target on the holdout, unreachable and disabled), one subgroup."""
    stats_before = {k: 0.5 for k in STAT_KEYS}
    stats_after = {k: 0.4 for k in STAT_KEYS}
    stats_before["AP_large"] = stats_after["AP_large"] = -1.0
    report = {
        "tfcal_version": "0.1.0",
        "target": {"objective": "precision_target", "target_precision": 0.9,
                   "target_recall": 0.9, "confidence": None, "match_iou": 0.5,
                   "nms_iou_grid": [0.4, 0.5, 0.6], "default_nms_iou": 0.5},
        "split": {"mode": "holdout", "tune_images": 42, "holdout_images": 18,
                  "holdout_fraction": 0.3, "seed": 0},
        "calibration": {"method": "temperature", "per_class": True, "min_samples": 30,
                        "fallback_classes": []},
        "holdout_confidence": 0.95,
        "classes": [
            {"category_id": 1, "name": "car", "column": 0, "status": "ok", "enabled": True,
             "threshold": 0.7, "nms_iou": 0.5, "calibration": {"temperature": 1.25},
             "holdout": _holdout(36, 0, 0, 1.0, 0.90261, 1.0, 1.0, True)},
            {"category_id": 2, "name": "person", "column": 1, "status": "ok", "enabled": True,
             "threshold": 0.75, "nms_iou": 0.6, "calibration": {"temperature": 0.8},
             "holdout": _holdout(8, 2, 4, 0.8, 0.44390, 0.97479, 8 / 12, False)},
            {"category_id": 3, "name": "flag", "column": 2, "status": "unreachable",
             "enabled": False, "threshold": 1.0, "nms_iou": 0.5, "calibration": {},
             "holdout": _holdout(0, 0, 18, None, None, None, 0.0, None)},
        ],
        "summary": {
            "coco_stats_before": stats_before, "coco_stats_after": stats_after,
            "ece_before": 0.1234, "ece_after": 0.0456, "ece_min_score": 0.05,
            "ece_all_detections_before": 0.0321, "ece_all_detections_after": 0.0123,
            "brier_before": 0.2, "brier_after": 0.1,
            "holdout": _holdout(44, 2, 22, 44 / 46, 0.85, 0.99, 44 / 66, None),
        },
        "subgroups": [
            {"field": "camera", "value": "front", "images": 6, "tp": 84, "fp": 6, "fn": 12,
             "precision": 84 / 90, "precision_lower": 0.86052, "precision_upper": 0.97514,
             "recall": 0.875, "ece": 0.16145, "below_target": False},
            {"field": "camera", "value": "rear", "images": 12, "tp": 10, "fp": 5, "fn": 2,
             "precision": 10 / 15, "precision_lower": 0.38380, "precision_upper": 0.88176,
             "recall": 10 / 12, "ece": None, "below_target": True},
        ],
        "notes": ["1 class could not reach the target on the tune split: flag"],
        "provenance": {"config_sha256": "c" * 64, "model_fingerprint": "m" * 64,
                       "data_fingerprint": "d" * 64,
                       "versions": {"tfcal": "0.1.0", "numpy": "2.0"}},
    }
    if curves:
        rng = np.random.default_rng(0)
        conf = rng.uniform(0, 1, 200)
        label = (rng.uniform(0, 1, 200) < conf).astype(int)
        report["curves"] = {
            "reliability": {"confidence_before": np.sqrt(conf).tolist(),
                            "label_before": label.tolist(),
                            "confidence_after": conf[conf >= 0.05].tolist(),
                            "label_after": label[conf >= 0.05].tolist(),
                            "num_bins": 10},
            "classes": [{"category_id": 1, "name": "car", "nms_iou": 0.5,
                         "threshold": [0.95, 0.9, 0.8, 0.7, 0.5],
                         "precision": [1.0, 1.0, 1.0, 1.0, 0.8],
                         "recall": [0.1, 0.3, 0.6, 1.0, 1.0],
                         "chosen": {"threshold": 0.7, "precision": 1.0, "recall": 1.0}}],
            "iou_grid": {"nms_iou": [0.4, 0.5, 0.6],
                         "classes reaching the target (fraction)": [2 / 3, 2 / 3, 1 / 3],
                         "mean best recall (feasible classes)": [0.9, 0.95, None]},
        }
    return report


# ---------------------------------------------------------------------------------------------
# render_markdown


def test_markdown_class_rows():
    md = render_markdown(minimal_report())
    # Values: threshold 3 digits, IoU 2, Clopper-Pearson interval 3, "never emitted" when
    # disabled, "–" for missing values.
    # A report without guarantee blocks (an older one) shows "–" in those columns.
    assert ("| 1 | car | ok | – | 0.700 | 0.50 | T=1.25 | 36 | 0 | 0 | 1.000 | [0.903, 1.000] | "
            "1.000 | yes | – |") in md
    assert ("| 2 | person | ok | – | 0.750 | 0.60 | T=0.8 | 8 | 2 | 4 | 0.800 | "
            "[0.444, 0.975] | 0.667 | **no** | – |") in md
    assert ("| 3 | flag | unreachable | – | never emitted | 0.50 | – | 0 | 0 | 18 | – | – | "
            "0.000 | – | – |") in md


@pytest.mark.parametrize("method, entry, text", [
    ("platt", {"a": 0.8, "b": -0.1}, "a=0.8, b=-0.1"),
    ("isotonic", {"knots": 7}, "isotonic, 7 knots"),
    ("none", {}, "–"),
])
def test_markdown_calibration_text_is_the_methods_own(method, entry, text):
    report = minimal_report()
    report["calibration"]["method"] = method
    for c in report["classes"]:
        if c.get("calibration"):
            c["calibration"] = entry
    assert f"| 0.750 | 0.60 | {text} | 8 |" in render_markdown(report)


def test_markdown_guarantee_and_baseline_sections():
    report = minimal_report()
    report["classes"][0]["guarantee"] = {"kind": "certified", "test_level": 0.05,
                                         "p_value": 0.01, "boxes_to_certify": None}
    report["classes"][2]["guarantee"] = {"kind": "none", "test_level": 0.05, "p_value": None,
                                         "boxes_to_certify": 120}
    report["classes"][2]["guarantee"]["boxes_available"] = 40
    report["classes"][1]["holdout"]["clearly_below"] = True
    report["summary"]["guarantee"] = {"classes": {"certified": 1, "none": 1, "estimate": 1},
                                      "statement": "With probability >= 95% ..."}
    report["summary"]["baseline"] = {
        "description": "one min_score_thresh", "thresholds": [0.55, None], "nms_iou": 0.5,
        "holdout": {"tp": 30, "fp": 5, "fn": 20, "precision": 30 / 35, "recall": 0.6},
        "emitted_classes": 3, "clearly_below_classes": 1, "tfcal_emitted_classes": 2,
        "tfcal_clearly_below_classes": 0,
        "same_precision": {"precision_to_match": 0.9, "threshold": 0.6, "precision": 0.91,
                           "recall": 0.55}}
    md = render_markdown(report)
    assert "## What is guaranteed\n\nWith probability >= 95% ..." in md
    assert "Classes by guarantee: 1 certified, 1 estimate, 1 none." in md
    assert "| 1 | car | ok | certified | 0.700 |" in md
    assert "| 3 | flag | unreachable | none | never emitted |" in md and "| ~120 (has 40) |" in md
    assert "**clearly below**" in md
    assert "(threshold 0.550, unreachable, NMS IoU 0.5)" in md
    assert "| global raw threshold | 0.857 | 0.600 | 30 | 5 | 3 | 1 |" in md
    assert "reaches recall 0.550 (threshold 0.600)" in md


def test_markdown_coco_subgroup_and_summary_rows():
    md = render_markdown(minimal_report())
    for key in STAT_KEYS:
        if key == "AP_large":
            assert "| AP_large | -1.000 | -1.000 |" in md
        else:
            assert f"| {key} | 0.500 | 0.400 |" in md
    assert ("| camera | front | 6 | 84 | 6 | 12 | 0.933 | [0.861, 0.975] | 0.875 | 0.161 | no |"
            in md)
    assert ("| camera | rear | 12 | 10 | 5 | 2 | 0.667 | [0.384, 0.882] | 0.833 | – | **yes** |"
            in md)
    assert "- Target: precision_target (precision >= 0.9, point estimate: not guaranteed); match IoU 0.5" in md
    assert "- Images: 42 tune (calibration and search), 18 holdout" in md
    assert "0.123 before, 0.046 after calibration" in md
    assert "(all detections: 0.032 -> 0.012)" in md
    assert "TP 44, FP 2, FN 22; precision 0.957, recall 0.667." in md
    assert "- 1 class could not reach the target on the tune split: flag" in md
    assert f"- config sha256 `{'c' * 64}`" in md
    assert "- versions: tfcal 0.1.0, numpy 2.0" in md
    assert "95% two-sided" in md


def test_markdown_confidence_target_and_plot_links():
    report = minimal_report()
    report["target"]["confidence"] = 0.95
    report["plots"] = {"Reliability diagram": "plots/reliability.png"}
    md = render_markdown(report)
    assert "precision_target (precision >= 0.9, certified at 95%, budget per_class)" in md
    assert "- [Reliability diagram](plots/reliability.png)" in md


def test_markdown_without_subgroups_or_notes():
    report = minimal_report()
    report["subgroups"] = []
    report["notes"] = []
    md = render_markdown(report)
    assert "## Subgroups" not in md
    assert "## Notes" not in md
    assert "| 1 | car | ok |" in md


# ---------------------------------------------------------------------------------------------
# load_report


def test_load_report_reads_a_file_or_its_directory(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(minimal_report()))
    assert load_report(tmp_path / "report.json") == minimal_report()
    assert load_report(tmp_path) == minimal_report()


def test_load_report_missing_file(tmp_path):
    with pytest.raises(TfcalError, match="cannot read report") as info:
        load_report(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)
    with pytest.raises(TfcalError) as info:
        load_report(tmp_path)  # a directory without report.json
    assert str(tmp_path / "report.json") in str(info.value)


def test_load_report_invalid_json(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"classes": [],\n "summary": }')
    with pytest.raises(TfcalError, match=r"not valid JSON \(line 2\)") as info:
        load_report(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_report_not_an_object(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("[1, 2]")
    with pytest.raises(TfcalError, match="must be a JSON object, got list") as info:
        load_report(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_load_report_missing_key(tmp_path, key):
    report = minimal_report()
    del report[key]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    with pytest.raises(TfcalError, match=f"{key}: missing") as info:
        load_report(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# tfcal report


def _pngs(plots_dir: Path) -> list[str]:
    names = sorted(p.name for p in plots_dir.iterdir())
    for name in names:
        assert (plots_dir / name).read_bytes().startswith(PNG_SIGNATURE), name
    return names


def test_cli_report_renders_markdown_and_plots(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(minimal_report(curves=True)))
    assert main(["report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | car | ok | – | 0.700 |" in md
    assert _pngs(tmp_path / "plots") == ["iou_tradeoff.png", "pr_threshold_1.png",
                                         "reliability.png"]
    written = json.loads((tmp_path / "report.json").read_text())
    assert set(written["plots"].values()) == {"plots/reliability.png", "plots/pr_threshold_1.png",
                                              "plots/iou_tradeoff.png"}
    for rel in written["plots"].values():
        assert f"]({rel})" in md
    # The record itself is unchanged apart from the plot index.
    written.pop("plots")
    assert written == json.loads(json.dumps(minimal_report(curves=True)))


def test_cli_report_accepts_the_json_path(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(minimal_report()))
    assert main(["report", str(path)]) == 0
    assert (tmp_path / "report.md").exists()
    assert not (tmp_path / "plots").exists()  # no curves, no plots


def test_render_report_replaces_stale_plots(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(minimal_report(curves=True)))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "pr_threshold_99.png").write_bytes(PNG_SIGNATURE)
    assert render_report(tmp_path) == tmp_path / "report.md"
    assert "pr_threshold_99.png" not in _pngs(tmp_path / "plots")


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"classes": []})])
def test_cli_report_bad_input_exits_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfcal: error: ") and err.count("\n") == 0, err
    assert str(tmp_path / "report.json") in err
    assert not (tmp_path / "report.md").exists()


def test_cli_report_malformed_curves_exit_2(tmp_path, capsys):
    # report.json is user-facing input to `tfcal report`: a curves block missing a key (e.g. a
    # hand-edited file, or one from before the reliability data had per-side labels) is bad
    # input (exit 2, one line naming the file), not an internal error (exit 3).
    report = minimal_report(curves=True)
    rd = report["curves"]["reliability"]
    rd["label"] = rd.pop("label_before")
    del rd["label_after"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfcal: error: ") and err.count("\n") == 0, err
    assert str(tmp_path / "report.json") in err


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["curves"]["classes"][0].pop("recall"), "curves.classes[0].recall"),
    (lambda r: r["curves"]["reliability"].update(label_after=[1]), "curves.reliability"),
    (lambda r: r["curves"].update(iou_grid=[0.5]), "curves.iou_grid"),
    (lambda r: r["classes"][0].pop("name"), "classes[0].name: missing"),
    # A class without its held-out block: the field is named, not a KeyError.
    (lambda r: r["classes"][1].pop("holdout"), "classes[1].holdout: missing"),
    (lambda r: r["classes"][0]["holdout"].pop("fp"), "classes[0].holdout.fp: missing"),
    (lambda r: r["classes"][2].update(holdout=[0, 0]), "classes[2].holdout: must be an object"),
    (lambda r: r["summary"].pop("holdout"), "summary.holdout: missing"),
    (lambda r: r["target"].pop("match_iou"), "target.match_iou: missing"),
    (lambda r: r["provenance"].pop("versions"), "provenance.versions: missing"),
    (lambda r: r["subgroups"][1].pop("ece"), "subgroups[1].ece: missing"),
    (lambda r: r.pop("holdout_confidence"), "holdout_confidence: missing"),
])
def test_cli_report_malformed_fields_exit_2_naming_them(tmp_path, capsys, edit, field):
    report = minimal_report(curves=True)
    edit(report)
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tfcal: error: {tmp_path / 'report.json'}: ") and "\n" not in err, err
    assert field in err, err
    assert not (tmp_path / "report.md").exists()


def test_cli_report_rerenders_a_tuning_run(tmp_path, capsys):
    import known_answer as ka
    from tfcal.config import load_config
    from tfcal.tuning.pipeline import run_tune

    config = ka.write_job(tmp_path)
    run_dir = run_tune(load_config(config), export=False).run_dir
    md = (run_dir / "report.md").read_text()
    record = json.loads((run_dir / "report.json").read_text())
    plots = _pngs(run_dir / "plots")
    (run_dir / "report.md").resolve().unlink()  # the files live in the current generation
    shutil.rmtree((run_dir / "plots").resolve())
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == md
    assert json.loads((run_dir / "report.json").read_text()) == record
    assert _pngs(run_dir / "plots") == plots
    for name in ka.NAMES:
        assert f"| {name} |" in md


def test_minimal_report_is_not_mutated_by_rendering():
    report = minimal_report(curves=True)
    before = copy.deepcopy(report)
    render_markdown(report)
    assert report == before


def test_markdown_pooled_group_line():
    report = minimal_report()
    report["target"]["on_unreachable"] = "pool"
    report["summary"]["guarantee"] = {
        "classes": {"certified": 1, "pooled": 2}, "statement": "With probability >= 95% ...",
        "group": {"classes": 2, "guarantee": "certified", "threshold": 0.72, "nms_iou": 0.5,
                  "test_level": 0.05, "p_value": 0.02,
                  "holdout": {"tp": 86, "fp": 13, "fn": 1224, "precision": 86 / 99,
                              "precision_lower": 0.786, "precision_upper": 0.928,
                              "recall": 86 / 1310}}}
    md = render_markdown(report)
    assert ("Pooled group (2 members, 2 emitted at its threshold, certified): threshold 0.720, "
            "NMS IoU 0.5; holdout precision 0.869 [0.786, 0.928], recall 0.066.") in md
    assert "every class not shown below the target is in one group with one certified" in md
    report["summary"]["guarantee"]["group"].update(guarantee="none", threshold=None,
                                                   nms_iou=None, holdout=None, classes=0)
    assert ("Pooled group (0 members, 0 emitted at its threshold, none): not certified: "
            "disabled.") in render_markdown(report)


def test_comparison_verdict_reads_recall_at_the_same_precision():
    from tfcal.tuning.holdout import comparison

    def verdict(recall, global_recall, tp=10):
        return comparison({"precision": 0.939, "recall": recall, "tp": tp},
                          {"same_precision": {"recall": global_recall}})

    c = verdict(0.768, 0.761)
    assert c["verdict"] == "wins"
    assert c["line"] == ("tfcal beats one global threshold: recall 0.768 vs 0.761 at the same "
                         "held-out precision 0.939")
    assert verdict(0.7, 0.761)["verdict"] == "loses"
    assert verdict(0.7612, 0.7608)["verdict"] == "ties"  # equal to 3 decimals
    assert verdict(0.5, None)["verdict"] == "wins"  # no global threshold reaches 0.939
    assert verdict(0.0, 0.5, tp=0)["verdict"] is None


def test_markdown_leads_with_the_verdict():
    report = minimal_report()
    report["summary"]["comparison"] = {"line": "tfcal trails one global threshold: recall 0.100 "
                                               "vs 0.200 at the same held-out precision 0.900"}
    md = render_markdown(report).splitlines()
    assert md[2] == ("**tfcal trails one global threshold: recall 0.100 vs 0.200 at the same "
                     "held-out precision 0.900.**")
