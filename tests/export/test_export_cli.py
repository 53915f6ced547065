"""`tfcal export CONFIG`: the command on a tuned run's postprocess.json (tune itself is tested in
tests/tuning and the demo end to end)."""

from __future__ import annotations

import yaml

from .odapi_test_model import export_job
from tfcal.cli import main


_job = export_job  # the shared tuned-run fixture of the export tests


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


def test_export_reads_only_the_two_handoff_records(tmp_path, image_detector, postprocess_config):
    # The tuning config's model and data sections point nowhere: the export reads the
    # detector description beside postprocess.json, and never the data set.
    from tfcal.handoff import DetectorDescription

    config = _job(tmp_path, image_detector, postprocess_config)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["saved_model"] = str(tmp_path / "moved")
    cfg["data"] = {"annotations": str(tmp_path / "gone.json"), "images": str(tmp_path / "gone")}
    config.write_text(yaml.safe_dump(cfg))
    DetectorDescription(saved_model=image_detector, category_ids=(1, 2, 3)).save(
        tmp_path / "run" / "detector.json")
    assert main(["export", str(config)]) == 0
    assert (tmp_path / "export" / "det" / "1" / "saved_model.pb").is_file()


def test_a_description_of_other_categories_is_refused(tmp_path, image_detector,
                                                      postprocess_config, capsys):
    from tfcal.handoff import DetectorDescription

    ppc = postprocess_config.replace(class_ids=(1, 2, 3))
    config = _job(tmp_path, image_detector, ppc)
    DetectorDescription(saved_model=image_detector, category_ids=(1, 2, 4)).save(
        tmp_path / "run" / "detector.json")
    assert main(["export", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "class_ids: [1, 2, 3] are not the detector description's category_ids [1, 2, 4]" \
        in err, err
    assert not (tmp_path / "export" / "det").exists()
