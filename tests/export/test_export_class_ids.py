"""Category ids are part of the serving graph: a gapped id map, end to end.

The known-answer job (tests/tuning/known_answer.py) with its categories renumbered to the gapped
ids car 1, person 7, flag 90 and mapped by `model.category_columns` (columns 0, 1, 2), plus a
fourth class column that no category maps to, scored 0.99 on every car box. It is tuned with
`on_unreachable: best_effort` (so all three categories are emitted), exported as a
`postprocess_only` SavedModel (verified against the tuner's category mapping), then run in a
fresh process and by `saved_model_cli run`. Every raw box carries a score in one column only, so
the right id of each served detection is known from its box: the id of that box's column.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tuning"))

import known_answer as ka  # noqa: E402
from tfcal.config import load_config  # noqa: E402
from tfcal.export import verify  # noqa: E402
from tfcal.postprocess import PostProcessConfig  # noqa: E402
from tfcal.tuning.pipeline import run_tune  # noqa: E402

GAPPED_IDS = {"car": 1, "person": 7, "flag": 90}
COLUMN_IDS = np.array([1, 7, 90, -1])  # column 3: no category


def _gapped_job(root: Path) -> Path:
    coco, raw = ka.build(list(range(1, 31)))
    renumber = {c["id"]: GAPPED_IDS[c["name"]] for c in coco["categories"]}
    coco["categories"] = [dict(c, id=renumber[c["id"]]) for c in coco["categories"]]
    for a in coco["annotations"]:
        a["category_id"] = renumber[a["category_id"]]
    scores = np.concatenate([raw["scores"], np.zeros_like(raw["scores"][..., :1])], -1)
    scores[..., 4] = np.where(scores[..., 1] > 0, 0.99, 0.0)  # unmapped column on car boxes
    raw["scores"] = scores
    config = ka.default_config(
        model={"category_columns": {"car": 0, "person": 1, "flag": 2}},
        tuning={"on_unreachable": "best_effort"},
        export={"enabled": True, "dir": "export", "model_name": "gapped"})
    return ka.write_job(root, config=config, raw=raw, coco=coco)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    path = _gapped_job(tmp_path_factory.mktemp("gapped"))
    result = run_tune(load_config(path))
    return result, np.load(path.parent / "raw.npz")


def test_tuner_writes_the_category_ids_and_disables_the_unmapped_column(tuned):
    result, _ = tuned
    ppc = PostProcessConfig.load(result.postprocess_path)
    assert ppc.class_ids == (1, 7, 90, -1)
    assert ppc.class_enabled[3] is False and ppc.enabled() == (True, True, True, False)
    # The export was verified against the tuner's category mapping (detector.json).
    checks = {name: ok for name, ok, _ in result.export.verification.checks}
    assert checks["fresh_process detection_classes"] and checks["saved_model_cli detection_classes"]


def test_served_classes_are_the_gapped_ids_in_a_fresh_process_and_saved_model_cli(tuned):
    result, raw = tuned
    version_dir = result.export.version_dir
    inputs = {"raw_detection_boxes": raw["boxes"][:2], "raw_detection_scores": raw["scores"][:2]}
    report = verify.VerificationReport(saved_model_dir=str(version_dir))
    fresh, cli = verify._run_fresh_processes(report, version_dir,
                                             verify.VerificationSample(inputs=inputs),
                                             verify.VerifyOptions())
    assert report.passed, report.failures()
    runs = {"fresh_process": {k.split("/", 1)[1]: v for k, v in fresh.items()
                              if k.startswith("serving_default/")},
            "saved_model_cli": cli}
    for name, out in runs.items():
        assert out["detection_classes"].dtype == np.float32, name
        seen = set()
        for b in range(2):
            n = int(out["num_detections"][b])
            assert n > 0, name
            for box, score, cls in zip(out["detection_boxes"][b, :n],
                                       out["detection_scores"][b, :n],
                                       out["detection_classes"][b, :n]):
                # The raw box it came from, and the one column that scores it.
                row = np.flatnonzero(np.all(np.abs(raw["boxes"][b] - box) < 1e-6, axis=1)
                                     & np.any(np.abs(raw["scores"][b, :, 1:] - score) < 1e-6,
                                              axis=1))
                assert row.size == 1, (name, box, score)
                column = int(np.flatnonzero(raw["scores"][b, row[0], 1:])[0])
                assert cls == COLUMN_IDS[column] and cls >= 0, (name, column, cls)
                seen.add(int(cls))
            assert np.all(out["detection_classes"][b, n:] == 0), name
        assert seen == {1, 7, 90}, name


def test_verification_holds_served_classes_to_the_tuned_category_ids(tuned):
    # The same export checked against another column -> id map fails on the classes, though
    # the config it was exported with agrees with itself.
    result, raw = tuned
    ppc = PostProcessConfig.load(result.postprocess_path)
    sample = verify.VerificationSample(
        inputs={"raw_detection_boxes": raw["boxes"][:1], "raw_detection_scores": raw["scores"][:1]})
    options = verify.VerifyOptions(run_saved_model_cli=False, raise_on_failure=False)
    report = verify.verify_export(result.export.version_dir, ppc, sample, None, options,
                                  category_ids=[2, 7, 90, -1])
    failed = [f for f in report.failures() if "detection_classes" in f]
    assert failed and "rows differ from the category ids tuned (e.g. 1 for 2)" in failed[0]
    detector = json.loads((result.run_dir / "detector.json").read_text())
    assert detector["category_ids"] == [1, 7, 90, -1]
