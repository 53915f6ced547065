"""`tfcal export CONFIG`: the command on a tuned run's postprocess.json (tune itself is tested in
tests/tuning and the demo end to end)."""

from __future__ import annotations

import yaml

from tfcal.cli import main


def _job(tmp_path, detector, postprocess_config):
    run = tmp_path / "run"
    postprocess_config.save(run / "postprocess.json")
    cfg = {"model": {"saved_model": str(detector)},
           "data": {"annotations": "unused.json"},
           "output": {"dir": "run"},
           "export": {"dir": "export", "model_name": "det", "verify": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_export_versions_and_postprocess_only_model(tmp_path, image_detector,
                                                     postprocess_config, capsys):
    config = _job(tmp_path, image_detector, postprocess_config)
    assert main(["export", str(config)]) == 0
    assert (tmp_path / "export" / "det" / "1" / "saved_model.pb").is_file()
    # --postprocess-only takes raw boxes and scores: its own model, never a version of det.
    assert main(["export", str(config), "--postprocess-only"]) == 0
    assert (tmp_path / "export" / "det_postprocess" / "1" / "saved_model.pb").is_file()
    assert not (tmp_path / "export" / "det" / "2").exists()
    models = (tmp_path / "export" / "models.config").read_text()
    assert "/models/det" in models and "/models/det_postprocess" in models
    # An existing version is never overwritten without the flag: exit 2, one line, untouched.
    before = (tmp_path / "export" / "det" / "1" / "saved_model.pb").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", str(config), "--version", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "export.version (or --version)" in err and "--overwrite" in err
    assert (tmp_path / "export" / "det" / "1" / "saved_model.pb").stat().st_mtime_ns == before
    assert main(["export", str(config), "--version", "1", "--overwrite"]) == 0
    assert main(["export", str(config)]) == 0
    assert (tmp_path / "export" / "det" / "2").is_dir()
