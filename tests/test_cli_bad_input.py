"""Bad input through the CLI: one clear line naming the file and field, exit code 2, no output.

Covers malformed configs, annotations, images, model signatures and predictions (precomputed raw
outputs and COCO results files). Each case builds a valid job, breaks one thing, runs the CLI
in-process, and checks stderr, the exit code, and that the output folder was never created.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tfcal.cli import main

NUM_BOXES = 4


def _coco():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32, "camera": "x"},
                   {"id": 2, "file_name": "b.png", "width": 32, "height": 32, "camera": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 12, 8], "area": 96,
             "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _raw():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([0.1, 0.1, 0.4, 0.4], np.float32), (2, NUM_BOXES, 1))
    scores = rng.uniform(0, 1, (2, NUM_BOXES, 3)).astype(np.float32)
    scores[..., 0] = 0.0
    return {"image_ids": np.array([1, 2], np.int64), "boxes": boxes, "scores": scores}


class Job:
    """A valid tuning job in a temporary folder; `break_*` helpers spoil one part of it."""

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir()
        for name in ("a.png", "b.png"):
            Image.new("RGB", (32, 32), (90, 120, 30)).save(root / "images" / name)
        self.coco = _coco()
        self.raw = _raw()
        self.cfg = {"model": {"raw_outputs": "raw.npz"},
                    "data": {"annotations": "ann.json", "images": "images",
                             "subgroups": ["camera"]},
                    "calibration": {"method": "none"},
                    "output": {"dir": "out"}, "export": {"enabled": False}}

    def write(self):
        (self.root / "ann.json").write_text(json.dumps(self.coco))
        np.savez(self.root / "raw.npz", **self.raw)
        path = self.root / "cfg.yaml"
        path.write_text(yaml.safe_dump(self.cfg))
        return path


@pytest.fixture
def job(tmp_path):
    return Job(tmp_path)


def _expect_bad_input(capsys, argv, *fragments, out_dir: Path | None = None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    assert err.startswith("tfcal: error: ") or "usage:" in err, err
    for fragment in fragments:
        assert fragment in err, err
    if out_dir is not None:
        assert not out_dir.exists(), f"partial output left in {out_dir}"
    return err


# --- config --------------------------------------------------------------------------------

CONFIG_CASES = [
    ("tuning", "target_precision", 1.5, "tuning.target_precision: must be in (0, 1], got 1.5"),
    ("tuning", "objective", "auc", "tuning.objective: must be one of"),
    ("tuning", "nms_iou_grid", [], "tuning.nms_iou_grid"),
    ("model", "score_converter", "tanh", "model.score_converter"),
    ("data", "holdout_fraction", 0, "data.holdout_fraction"),
    ("data", "unknown_key", 1, "data.unknown_key: unknown key"),
    ("runner", "kind", "spark", "runner.kind: must be one of local | beam"),
    ("runner", "beam_options", ["runner=DirectRunner"], "runner.beam_options[0]: must be a Beam"),
    ("runner", "shard_images", 0, "runner.shard_images: must be > 0"),
    ("runner", "kind", "beam", "runner.kind: beam runs a detector"),
]


@pytest.mark.parametrize("section, key, value, fragment", CONFIG_CASES)
def test_bad_config(job, capsys, section, key, value, fragment):
    job.cfg.setdefault(section, {})[key] = value
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path)], str(path), fragment,
                      out_dir=job.root / "out")


def test_beam_flags_after_the_config_must_be_flags(job, capsys):
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path), "--", "DataflowRunner"],
                      f"{path}: runner.beam_options (command line, after --)",
                      "got 'DataflowRunner'", out_dir=job.root / "out")
    _expect_bad_input(capsys, ["report", str(job.root), "--", "--runner=DirectRunner"],
                      "apply to tune and drift only")


def test_config_not_yaml(job, capsys):
    path = job.root / "cfg.yaml"
    path.write_text("model: [raw_outputs\n")
    _expect_bad_input(capsys, ["tune", str(path)], "invalid YAML")


def test_missing_config_file(tmp_path, capsys):
    _expect_bad_input(capsys, ["tune", str(tmp_path / "nope.yaml")], "cannot read config")


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune"])
    assert info.value.code == 2


# --- annotations ---------------------------------------------------------------------------

def _drop(d, key):
    del d[key]


ANNOTATION_CASES = [
    ("missing images key", lambda c: _drop(c, "images"), "images"),
    ("negative width", lambda c: c["annotations"][0].__setitem__("bbox", [2, 2, -3, 10]),
     "annotations[0].bbox"),
    ("nan bbox", lambda c: c["annotations"][1].__setitem__("bbox", [2, 2, float("nan"), 10]),
     "annotations[1].bbox"),
    ("duplicate image id", lambda c: c["images"][1].__setitem__("id", 1), "images[1].id"),
    ("duplicate annotation id", lambda c: c["annotations"][1].__setitem__("id", 1),
     "annotations[1].id"),
    ("unknown category", lambda c: c["annotations"][0].__setitem__("category_id", 9),
     "annotations[0].category_id"),
    ("unknown image", lambda c: c["annotations"][0].__setitem__("image_id", 9),
     "annotations[0].image_id"),
    ("missing bbox", lambda c: _drop(c["annotations"][0], "bbox"), "annotations[0]"),
    ("missing subgroup field", lambda c: _drop(c["images"][0], "camera"), "camera"),
    # Fault corpus: silently accepted before (a box far outside its 32 x 32 image; a data set
    # of crowd regions only, every class disabled with exit 0).
    ("bbox outside its image", lambda c: c["annotations"][1].__setitem__("bbox",
                                                                          [300, 5, 12, 8]),
     "annotations[1].bbox: lies outside its image (id 2, 32 x 32 pixels"),
    ("all annotations crowd", lambda c: [a.__setitem__("iscrowd", 1) for a in c["annotations"]],
     "annotations[].iscrowd: all 2 annotations are crowd regions"),
]


@pytest.mark.parametrize("name, spoil, fragment", ANNOTATION_CASES,
                         ids=[c[0] for c in ANNOTATION_CASES])
def test_bad_annotations(job, capsys, name, spoil, fragment):
    spoil(job.coco)
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "ann.json", fragment, out_dir=job.root / "out")


def test_annotations_not_json(job, capsys):
    path = job.write()
    (job.root / "ann.json").write_text("{not json")
    _expect_bad_input(capsys, ["tune", str(path)], "ann.json", out_dir=job.root / "out")


# --- images (checked when a model will run) ------------------------------------------------

@pytest.fixture
def model_job(job, tmp_path_factory):
    job.cfg["model"] = {"saved_model": str(_tiny_model(tmp_path_factory))}
    return job


def test_missing_image_file(model_job, capsys):
    path = model_job.write()
    (model_job.root / "images" / "b.png").unlink()
    _expect_bad_input(capsys, ["tune", str(path)], "b.png", out_dir=model_job.root / "out")


def test_unreadable_image_file(model_job, capsys):
    path = model_job.write()
    (model_job.root / "images" / "a.png").write_bytes(b"this is not an image at all")
    _expect_bad_input(capsys, ["tune", str(path)], "a.png", out_dir=model_job.root / "out")


def test_missing_images_dir(model_job, capsys):
    model_job.cfg["data"]["images"] = "no_such_dir"
    path = model_job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "no_such_dir", out_dir=model_job.root / "out")


# --- model signatures ----------------------------------------------------------------------

_MODEL_CACHE: dict[str, Path] = {}


def _tiny_model(factory, *, boxes_shape=(NUM_BOXES, 4), name="ok") -> Path:
    """An OD-API-form SavedModel (uint8 image in, raw boxes and scores out); built once."""
    if name in _MODEL_CACHE:
        return _MODEL_CACHE[name]
    import tensorflow as tf

    class Det(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8)])
        def serve(self, input_tensor):
            mean = tf.reduce_mean(tf.cast(input_tensor, tf.float32)) / 255.0
            boxes = tf.tile(tf.constant([[[0.1, 0.1, 0.4, 0.4]]]), [1, NUM_BOXES, 1])
            boxes = tf.reshape(boxes, [1, *boxes_shape]) if boxes_shape[-1] == 4 else \
                tf.zeros([1, *boxes_shape])
            scores = tf.fill([1, NUM_BOXES, 3], mean)
            return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}

    det = Det()
    path = factory.mktemp(f"model_{name}")
    tf.saved_model.save(det, str(path), signatures={"serving_default": det.serve})
    _MODEL_CACHE[name] = path
    return path


def test_model_dir_is_not_a_saved_model(job, capsys):
    (job.root / "empty_model").mkdir()
    job.cfg["model"] = {"saved_model": "empty_model"}
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "empty_model", out_dir=job.root / "out")


def test_missing_signature(model_job, capsys):
    model_job.cfg["model"]["signature"] = "detect"
    path = model_job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "detect", out_dir=model_job.root / "out")


def test_missing_output_key(model_job, capsys):
    model_job.cfg["model"]["raw_scores"] = "detection_multiclass_scores"
    path = model_job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "detection_multiclass_scores",
                      out_dir=model_job.root / "out")


def test_missing_input_key(model_job, capsys):
    model_job.cfg["model"]["input"] = "images"
    path = model_job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "images", out_dir=model_job.root / "out")


def test_wrong_box_shape(job, capsys, tmp_path_factory):
    job.cfg["model"] = {"saved_model": str(_tiny_model(tmp_path_factory, boxes_shape=(NUM_BOXES, 3),
                                                       name="bad_boxes"))}
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path)], "raw_detection_boxes",
                      out_dir=job.root / "out")


# --- predictions: precomputed raw outputs --------------------------------------------------

def _nan_scores(r):
    r["scores"][0, 1, 1] = np.nan


def _inf_scores(r):
    r["scores"][1, 0, 2] = np.inf


def _far_boxes(r):
    r["boxes"][0, 0] = [0.1, 0.1, 3.0, 0.4]


def _missing_image(r):
    for k in r:
        r[k] = r[k][:1]


def _too_few_columns(r):
    r["scores"] = r["scores"][..., :2]


def _no_scores(r):
    del r["scores"]


def _logits(r):
    # Fault corpus: logits from a detector configured with score_converter: sigmoid (the
    # default) were an internal error naming neither the key nor the file.
    r["scores"] = (r["scores"] * 12.0 - 6.0).astype(np.float32)


RAW_CASES = [("nan score", _nan_scores, "raw.npz", "scores"),
             ("logits under score_converter sigmoid", _logits, "raw.npz",
              "scores: values in [-6, 4.953] are not probabilities, but "
              "model.score_converter: sigmoid"),
             ("inf score", _inf_scores, "raw.npz", "scores"),
             ("box far outside [0, 1]", _far_boxes, "raw.npz", "boxes"),
             ("image without outputs", _missing_image, "raw.npz", "image"),
             # Two score columns (background + 1 class) cannot cover both categories.
             ("category/column mismatch", _too_few_columns, "ann.json", "no score column"),
             ("missing array", _no_scores, "raw.npz", "scores")]


@pytest.mark.parametrize("name, spoil, file, fragment", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_bad_raw_outputs(job, capsys, name, spoil, file, fragment):
    spoil(job.raw)
    path = job.write()
    _expect_bad_input(capsys, ["tune", str(path)], file, fragment, out_dir=job.root / "out")


# --- predictions: COCO results for `tfcal evaluate` ----------------------------------------

def _results():
    return [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9},
            {"image_id": 2, "category_id": 2, "bbox": [5, 5, 12, 8], "score": 0.4}]


EVAL_CASES = [
    ("empty", lambda r: r.clear(), "empty"),
    ("nan score", lambda r: r[0].__setitem__("score", float("nan")), "score"),
    ("inf score", lambda r: r[1].__setitem__("score", float("inf")), "score"),
    ("unknown category", lambda r: r[0].__setitem__("category_id", 7), "category_id"),
    ("unknown image", lambda r: r[0].__setitem__("image_id", 7), "image_id"),
    ("negative box", lambda r: r[0].__setitem__("bbox", [2, 2, -1, 10]), "bbox"),
    ("missing score", lambda r: r[1].pop("score"), "score"),
]


@pytest.mark.parametrize("name, spoil, fragment", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_detections_file(tmp_path, capsys, name, spoil, fragment):
    (tmp_path / "ann.json").write_text(json.dumps(_coco()))
    results = _results()
    spoil(results)
    (tmp_path / "dets.json").write_text(json.dumps(results, allow_nan=True))
    out = tmp_path / "report.json"
    _expect_bad_input(capsys, ["evaluate", "--annotations", str(tmp_path / "ann.json"),
                               "--detections", str(tmp_path / "dets.json"), "--out", str(out)],
                      "dets.json", fragment, out_dir=out)


def test_evaluate_good_file_writes_report(tmp_path, capsys):
    (tmp_path / "ann.json").write_text(json.dumps(_coco()))
    (tmp_path / "dets.json").write_text(json.dumps(_results()))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--annotations", str(tmp_path / "ann.json"), "--detections",
                 str(tmp_path / "dets.json"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["coco_stats"]["AP50"] == pytest.approx(1.0)
    assert {c["category_id"]: (c["tp"], c["fp"], c["fn"]) for c in report["per_class"]} == \
        {1: (1, 0, 0), 2: (1, 0, 0)}


def test_good_job_runs(job, capsys):
    """The unspoilt job is valid, so every failure above is caused by its one change."""
    path = job.write()
    code = main(["tune", str(path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (job.root / "out" / "report.json").exists()
    assert (job.root / "out" / "postprocess.json").exists()


def test_report_rerender(job, capsys):
    path = job.write()
    assert main(["tune", str(path)]) == 0
    (job.root / "out" / "report.md").unlink()
    assert main(["report", str(job.root / "out")]) == 0
    assert (job.root / "out" / "report.md").exists()
    bad = job.root / "bad_report.json"
    bad.write_text(json.dumps({"classes": []}))
    _expect_bad_input(capsys, ["report", str(bad)], "bad_report.json", "summary")


