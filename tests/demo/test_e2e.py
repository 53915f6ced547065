"""The README's main job, end to end: `tfcal demo` on a small generated set (slow: ~30 s)."""

import json

import pytest

from tfcal.cli import main


@pytest.mark.slow
def test_tfcal_demo_runs_the_whole_job(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-images", "120"]) == 0
    summary = capsys.readouterr().out
    assert "report:" in summary and "export:" in summary

    report = json.loads((out / "run" / "report.json").read_text())
    s = report["summary"]
    # The bundled detector is miscalibrated on purpose; calibration must fix most of it.
    assert s["ece_before"] >= 0.05
    assert s["ece_after"] < s["ece_before"] / 2
    assert {c["name"] for c in report["classes"]} == {"circle", "square", "triangle", "cross",
                                                      "ring"}
    assert {g["field"] for g in report["subgroups"]} == {"lighting", "camera"}
    for name in ("report.md", "postprocess.json", "plots/reliability.png",
                 "plots/iou_tradeoff.png"):
        assert (out / "run" / name).is_file(), name

    version = out / "export" / "demo_detector" / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert (out / "export" / "models.config").is_file()
    assert not [p for p in (out / "export" / "demo_detector").iterdir() if p.name.startswith(".")]
