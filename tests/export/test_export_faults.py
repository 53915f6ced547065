"""Export faults (issue #14): a postprocess.json that does not fit the detector, another
detector than the tuned one, concurrent exports, and leftovers of a killed export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tfcal import atomic
from .odapi_test_model import export_job
from tfcal.cli import main
from tfcal.export import serving


_job = export_job  # the shared tuned-run fixture of the export tests


def test_num_classes_that_do_not_fit_the_detector(tmp_path, image_detector,
                                                  postprocess_config, capsys):
    # Fault corpus: an internal error (exit 3) that did not name the file.
    ppc = postprocess_config.replace(num_classes=5, min_score_thresh=(0.3,), nms_iou=(0.5,))
    config = _job(tmp_path, image_detector, ppc)
    assert main(["export", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"{tmp_path / 'run' / 'postprocess.json'}: num_classes: 5" in err
    assert "'raw_detection_scores' has 4 columns" in err
    assert not (tmp_path / "export" / "det" / "1").exists()


def test_another_detector_than_the_tuned_one_is_refused(tmp_path, image_detector,
                                                        postprocess_config, capsys):
    ppc = postprocess_config.replace(metadata={**postprocess_config.metadata,
                                               "model_fingerprint": "a" * 64})
    config = _job(tmp_path, image_detector, ppc)
    assert main(["export", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "differs from the one tuned" in err, err
    assert "metadata.model_fingerprint aaaaaaaaaaaaaaaa" in err
    assert not (tmp_path / "export").exists()


def test_a_version_made_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    # Fault corpus: two exports at once; the second was told to pass --overwrite for a
    # version it never asked for (which would have destroyed the other's). Now the number
    # is chosen again at publication, and the rename never replaces.
    model = tmp_path / "det"
    (model / "1").mkdir(parents=True)
    (model / "1" / "theirs").write_text("1")
    monkeypatch.setattr(serving, "next_version", lambda d: 1)  # chosen before 1 appeared
    mine = atomic.mkdtemp(model, "version")
    (mine / "mine").write_text("2")
    assert serving._publish(mine, model, None, False) == 2
    assert (model / "1" / "theirs").read_text() == "1" and (model / "2" / "mine").exists()
    again = atomic.mkdtemp(model, "version")
    with pytest.raises(FileExistsError, match="already exists"):
        serving._publish(again, model, 1, False)  # asked for 1: refused, 1 untouched
    assert (model / "1" / "theirs").read_text() == "1"
    empty = model / "3"
    empty.mkdir()  # being filled by someone else: rename(2) alone would replace it
    monkeypatch.setattr(serving, "next_version", lambda d: 3)
    assert serving._publish(again, model, None, False) == 4 and empty.is_dir()


@pytest.mark.slow
def test_leftovers_of_a_killed_export_are_reclaimed(tmp_path, image_detector,
                                                    postprocess_config):
    # Fault corpus: after a SIGKILL during export, `.1.*.tmp` and `.tfcal_meta.*` stayed in
    # the model folder forever. The export is killed right after the SavedModel is written.
    from tfcal.export import ServingOptions, export_for_serving

    ppc_path = postprocess_config.save(tmp_path / "postprocess.json")
    root = tmp_path / "export"
    script = textwrap.dedent(f"""
        import os, signal
        import tensorflow as tf
        from tfcal.export import ServingOptions, export_for_serving
        real = tf.saved_model.save
        def save_then_die(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        tf.saved_model.save = save_then_die
        export_for_serving({str(image_detector)!r}, {str(ppc_path)!r}, {str(root)!r}, "det",
                           options=ServingOptions(verify=False))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(serving.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    left = sorted(p.name for p in (root / "det").iterdir() if p.name.startswith("."))
    assert any(n.startswith(".version.tmp-") for n in left), left
    assert any(n.startswith(".tfcal_meta.tmp-") for n in left), left
    done = export_for_serving(image_detector, ppc_path, root, "det",
                              options=ServingOptions(verify=False))
    assert done.version == 1
    assert sorted(p.name for p in (root / "det").iterdir()) == ["1"]
