"""The on-device post-processing (`tfcal.export.tflite`) on LiteRT against the TF PostProcessor.

Every model is converted once per module (conversions take seconds) and run on the LiteRT
runtime (`ai_edge_litert`, no TensorFlow in the interpreter); the reference is the
`PostProcessor` layer the SavedModel's `postprocess_only` signature runs. Inputs are seeded and
built on purpose: boxes at an IoU threshold +- 1e-5, scores exactly at a class threshold, a
disabled class, gapped category ids, every calibration method, soft-NMS, clip window,
class-agnostic NMS, an empty input and the total cap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tfcal.export import tflite as tl
from tfcal.postprocess import PostProcessConfig

pytest.importorskip("ai_edge_litert", reason="the LiteRT runtime (ai-edge-litert) is needed")

pytestmark = pytest.mark.slow  # converting a model takes 1-5 s; every test shares them

N = 64  # boxes per image
K = 5
THRESH = (0.3, 0.5, 0.25, 0.4, 0.6)
IOU = (0.5, 0.6, 0.45, 0.7, 0.5)
ENABLED = (True, True, False, True, True)
IDS = (1, 3, 7, 20, 44)  # gapped category ids
M = 12


CALIBRATION_PARAMS = ("temperature", "platt_a", "platt_b", "knots_x", "knots_y", "box_a", "box_b",
                      "box_c")


def _config(**changes) -> PostProcessConfig:
    kw = dict(num_classes=K, min_score_thresh=THRESH, nms_iou=IOU, class_enabled=ENABLED,
              class_ids=IDS, max_detections_per_class=M, max_total_detections=M)
    kw.update(changes)
    params = {name: kw.pop(name) for name in CALIBRATION_PARAMS if name in kw}
    return PostProcessConfig(**kw, calibration_params=params)


class Model:
    """A converted model, its config and the TF reference."""

    def __init__(self, config: PostProcessConfig, num_boxes: int = N):
        self.config = config
        self.reference = tl.reference_postprocessor(config)
        self.bytes = tl.convert(tl.build_postprocess_fn(config, num_boxes,
                                                        postprocessor=self.reference))
        self.lite = tl.LiteRunner(self.bytes)

    def run(self, boxes, raw):
        boxes = np.asarray(boxes, np.float32)
        raw = np.asarray(raw, np.float32)
        want = {k: v.numpy() for k, v in self.reference(tf.constant(boxes),
                                                          tf.constant(raw)).items()}
        got = self.lite(raw_detection_boxes=boxes, raw_detection_scores=raw)
        return want, got

    def check(self, boxes, raw, **kw):
        want, got = self.run(boxes, raw)
        box_atol = tl.BOX_ATOL_FRAME if self.config.change_coordinate_frame else 0.0
        assert tl.compare_detections(want, got, box_atol=box_atol, **kw) == []
        return want, got


@pytest.fixture(scope="module")
def plain() -> Model:
    """No calibration (scores pass through bit-exactly), per-class thresholds and IoUs, a
    disabled class, gapped ids, a total cap of 12."""
    return Model(_config())


@pytest.fixture(scope="module")
def temperature() -> Model:
    return Model(_config(calibration="temperature", temperature=(1.3, 0.8, 1.0, 2.0, 1.1)))


@pytest.mark.parametrize("seed", range(6))
def test_seeded_inputs_match_tf(plain, temperature, seed):
    boxes, raw = tl.seeded_inputs(plain.config, N, count=1, seed=seed)[0]
    for model in (plain, temperature):
        want, got = model.check(boxes, raw)
        assert want["num_detections"][0] > 0
    # Class column 2 (id 7) is disabled: never emitted.
    assert 7.0 not in got["detection_classes"][0, :int(got["num_detections"][0])]


def test_plain_scores_are_bit_exact(plain):
    boxes, raw = tl.seeded_inputs(plain.config, N, count=1, seed=11)[0]
    want, got = plain.check(boxes, raw, score_atol=0.0)
    assert np.array_equal(np.sort(want["detection_scores"]), np.sort(got["detection_scores"]))


def _two_boxes_at_iou(iou: float) -> np.ndarray:
    """Two unit-height boxes whose IoU is `iou` (float64 derivation): box A = [0, 0, 1, 1],
    box B = [0, s, 1, 1 + s] overlaps A by 1 - s, so IoU = (1 - s) / (1 + s), s = (1 - iou) /
    (1 + iou). Scaled by 0.5 to sit inside [0, 1]."""
    s = (1 - iou) / (1 + iou)
    return 0.5 * np.array([[0, 0, 1, 1], [0, s, 1, 1 + s]], np.float64)


@pytest.mark.parametrize("delta", [-1e-5, 1e-5])
def test_boxes_at_the_iou_threshold(plain, delta):
    # Class column 1 (IoU 0.6) and column 3 (IoU 0.7): pairs of boxes at IoU thr +- 1e-5.
    boxes = np.zeros((N, 4), np.float32)
    raw = np.zeros((N, K + 1), np.float32)
    boxes[2:] = [0.9, 0.9, 0.95, 0.95]
    boxes[0:2] = _two_boxes_at_iou(IOU[1] + delta)
    boxes[2:4] = _two_boxes_at_iou(IOU[3] + delta) + 0.2
    raw[0:2, 1 + 1] = [0.9, 0.8]
    raw[2:4, 1 + 3] = [0.9, 0.8]
    want, got = plain.check(boxes[None], raw[None])
    # Above the threshold the second box of each pair is suppressed; below it is kept.
    assert int(want["num_detections"][0]) == (2 if delta > 0 else 4)


def test_scores_exactly_at_a_class_threshold(plain):
    # A score equal to its class threshold is kept, the float32 just below is dropped.
    boxes = np.tile(np.array([[0.1, 0.1, 0.2, 0.2]], np.float32), (N, 1))
    boxes += np.arange(N, dtype=np.float32)[:, None] * 0.012  # no overlaps
    raw = np.zeros((N, K + 1), np.float32)
    for col, t in enumerate(THRESH):
        raw[2 * col, 1 + col] = np.float32(t)
        raw[2 * col + 1, 1 + col] = np.nextafter(np.float32(t), np.float32(0))
    want, got = plain.check(boxes[None], raw[None], score_atol=0.0)
    kept = sorted(got["detection_classes"][0, :int(got["num_detections"][0])].tolist())
    assert kept == [1.0, 3.0, 20.0, 44.0]  # one per enabled class, the one at the threshold


def test_empty_input(plain, temperature):
    boxes, raw = tl.seeded_inputs(plain.config, N, count=1, seed=3)[0]
    raw = raw * 0.2  # below every threshold
    for model in (plain, temperature):
        want, got = model.check(boxes, raw)
        assert got["num_detections"][0] == 0
        assert not np.any(got["detection_boxes"]) and not np.any(got["detection_scores"])


def test_the_total_cap(plain):
    # 40 separate boxes above every threshold: only the best 12 come out, by score.
    boxes = np.zeros((N, 4), np.float32)
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2) * 0.12
    boxes[:] = np.concatenate([grid, grid + 0.1], 1)
    rng = np.random.default_rng(5)
    raw = rng.uniform(0.6, 1.0, (N, K + 1)).astype(np.float32)
    want, got = plain.check(boxes[None], raw[None])
    assert got["num_detections"][0] == M
    scores = got["detection_scores"][0]
    assert np.all(np.diff(scores) <= 0)


def test_zero_area_boxes(plain, temperature):
    # TF gives zero-area boxes IoU 0: each is selected once (LiteRT's kernel alone would
    # select them repeatedly).
    boxes, raw = tl.seeded_inputs(plain.config, N, count=1, seed=4)[0]
    boxes[0, :10, 2] = boxes[0, :10, 0]  # ymax = ymin
    raw[0, :10, 1:] = np.random.default_rng(4).uniform(0.7, 0.99, (10, K))  # no ties
    for model in (plain, temperature):
        want, got = model.check(boxes, raw)
        rows = got["detection_boxes"][0, :int(got["num_detections"][0])]
        classes = got["detection_classes"][0, :len(rows)]
        pairs = {(c, tuple(b)) for c, b in zip(classes.tolist(), rows.tolist())}
        assert len(pairs) == len(rows)  # no (class, box) twice


@pytest.fixture(scope="module", params=[
    dict(calibration="temperature", temperature=(1.3,)),
    dict(calibration="platt", platt_a=(1.1, 0.9, 1.0, -0.5, 1.2), platt_b=(0.1, -0.2, 0.0, 0.3,
                                                                          0.0)),
    dict(calibration="isotonic", knots_x=[[0, .2, .5, 1]] * 3 + [[0, .3, 1]] * 2,
         knots_y=[[0, .1, .6, .9]] * 3 + [[0, .3, .95]] * 2),
    dict(score_converter="identity", calibration="temperature", temperature=(1.3,)),
    dict(score_converter="softmax", calibration="temperature", temperature=(0.7,)),
    dict(calibration="box_platt", box_a=(1.1, 0.9, 1.0, 1.3, 1.2), box_b=(0.1, -0.2, 0.0, 0.3, 0.0),
         box_c=(1.5, -1.0, 0.0, 2.0, 0.5)),
    dict(soft_nms_sigma=(0.3, 0.5, 0.0, 0.0, 0.2)),
    dict(class_agnostic=True, nms_iou=(0.5,), max_detections_per_class=None),
    dict(clip_window=(0.1, 0.2, 0.8, 0.9), change_coordinate_frame=True, clip_boxes=True),
], ids=["temperature", "platt", "isotonic", "identity", "softmax", "box_platt", "soft_nms",
        "agnostic", "window"])
def variant(request) -> Model:
    changes = dict(request.param)
    if changes.get("max_detections_per_class", 0) is None:
        changes["max_detections_per_class"] = 100
    return Model(_config(**changes))


def test_every_feature_matches_tf(variant):
    count = 0
    for seed in range(4):
        boxes, raw = tl.seeded_inputs(variant.config, N, count=1, seed=seed)[0]
        want, _ = variant.check(boxes, raw)
        count += int(want["num_detections"][0])
    assert count > 0


def test_platt_negative_slope_is_a_decreasing_bound():
    cfg = _config(calibration="platt", platt_a=(1.0, 1.0, 1.0, -0.5, 1.0),
                  platt_b=(0.0,) * K)
    bounds = tl.raw_keep_bounds(cfg)
    assert list(bounds.increasing) == [True, True, True, False, True]
    assert bounds.bound[2] == np.inf  # disabled


def test_raw_keep_bounds_are_tf_decisions():
    cfg = _config(calibration="temperature", temperature=(1.3, 0.8, 1.0, 2.0, 1.1))
    pp = tl.reference_postprocessor(cfg)
    bounds = tl.raw_keep_bounds(cfg, pp)
    live = np.isfinite(bounds.bound)
    below = np.nextafter(bounds.bound, np.float32(-1))
    at = tl._tf_keeps(pp, cfg, np.where(live, bounds.bound, 0.5)[None, :])[0]
    under = tl._tf_keeps(pp, cfg, np.where(live, below, 0.5)[None, :])[0]
    assert np.all(at[live]) and not np.any(under[live] & (bounds.band[live] == 0))


def test_compare_detections_reports_differences():
    want = {"detection_boxes": np.zeros((1, 3, 4), np.float32),
            "detection_scores": np.array([[0.9, 0.5, 0.0]], np.float32),
            "detection_classes": np.array([[1, 3, 0]], np.float32),
            "num_detections": np.array([2.0], np.float32)}
    want["detection_boxes"][0, :2] = [[0, 0, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]
    assert tl.compare_detections(want, want) == []
    swapped = {k: v.copy() for k, v in want.items()}
    swapped["detection_classes"][0, 1] = 7
    assert "detection_classes" in tl.compare_detections(want, swapped)[0]
    moved = {k: v.copy() for k, v in want.items()}
    moved["detection_boxes"][0, 0, 0] = np.nextafter(np.float32(0), np.float32(1))
    assert "detection_boxes" in tl.compare_detections(want, moved)[0]
    off = {k: v.copy() for k, v in want.items()}
    off["detection_scores"][0, 1] += 2e-6
    assert "detection_scores" in tl.compare_detections(want, off)[0]
    fewer = {k: v.copy() for k, v in want.items()}
    fewer["num_detections"][0] = 1
    assert "num_detections" in tl.compare_detections(want, fewer)[0]


def test_export_writes_verified_files(tmp_path):
    cfg = _config(calibration="temperature", temperature=(1.3,))
    out = tl.export_tflite(cfg, tmp_path / "tflite", num_boxes=N, name="demo",
                           category_names={1: "person", 3: "car"})
    assert out.verification.passed and out.verification.images == 8
    assert sorted(p.name for p in out.directory.iterdir()) == [
        "demo.json", "demo.labels.txt", "demo.tflite"]
    assert out.labels_path.read_text().splitlines() == ["1\tperson", "3\tcar", "7", "20", "44"]
    meta = json.loads(out.metadata_path.read_text())
    assert meta["postprocess_config"]["class_ids"] == list(IDS)
    assert meta["verification"]["failures"] == []
    # The written file runs on LiteRT and gives the reference's detections.
    boxes, raw = tl.seeded_inputs(cfg, N, count=1, seed=9)[0]
    got = tl.LiteRunner(out.model_path)(raw_detection_boxes=boxes, raw_detection_scores=raw)
    want = tl.reference_postprocessor(cfg)(boxes, raw)
    assert tl.compare_detections({k: v.numpy() for k, v in want.items()}, got) == []
    with pytest.raises(FileExistsError):
        tl.export_tflite(cfg, out.directory, num_boxes=N)


def test_export_verifies_on_the_given_inputs(tmp_path):
    cfg = _config()
    given = tl.TFLiteVerifyInputs(tl.seeded_inputs(cfg, N, count=3, seed=4), "three test inputs")
    out = tl.export_tflite(cfg, tmp_path / "tflite", num_boxes=N, inputs=given)
    assert (out.verification.images, out.verification.source) == (3, "three test inputs")
    assert out.verification.passed
    with pytest.raises(ValueError, match="pairs: need at least one"):
        tl.TFLiteVerifyInputs([])
    # The tuning run's handoff reads N from the cached raw outputs it verifies on.
    handed = tl.export_tflite_handoff(cfg, None, tmp_path / "export", "det", raw_inputs=given)
    assert handed.directory == tmp_path / "export" / "det_tflite"
    assert (handed.verification.images, handed.verification.source) == (3, "three test inputs")
    meta = json.loads(handed.metadata_path.read_text())
    assert meta["inputs"]["raw_detection_boxes"] == [1, N, 4]


def test_a_mismatch_fails_the_export_and_writes_nothing(tmp_path, monkeypatch):
    cfg = _config()
    real = tl._detections

    def off_by_one_class(config, boxes, raw, bounds):
        out = real(config, boxes, raw, bounds)
        out["detection_classes"] = out["detection_classes"] + 1.0
        return out

    monkeypatch.setattr(tl, "_detections", off_by_one_class)
    with pytest.raises(tl.TFLiteVerificationError, match="detection_classes"):
        tl.export_tflite(cfg, tmp_path / "tflite", num_boxes=N)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- YOLO


def test_yolo_raw_output_variant_equals_the_adapter():
    from tfcal.detectors import yolo

    keys = yolo.resolve_layout("model.tflite", yolo.LayoutChoices(preset="yolov8"))
    k, n = 4, 200
    cfg = PostProcessConfig(num_classes=k, background_column=False, calibration="temperature",
                            calibration_params={"temperature": (1.2,)}, min_score_thresh=(0.3, 0.4, 0.35, 0.5),
                            nms_iou=(0.5, 0.6, 0.45, 0.7), class_ids=(1, 5, 9, 90),
                            max_total_detections=20)
    pp = tl.reference_postprocessor(cfg)
    lite = tl.LiteRunner(tl.convert(tl.build_yolo_postprocess_fn(
        cfg, keys, (320, 320), (1, 4 + k, n), postprocessor=pp)))
    for seed, hw in enumerate([(480, 640), (640, 427), (320, 320)]):
        rng = np.random.default_rng(seed)
        raw = np.concatenate([rng.uniform(0, 1, (1, 2, n)), rng.uniform(0.02, 0.4, (1, 2, n)),
                              rng.beta(0.5, 2, (1, k, n))], 1).astype(np.float32)
        boxes, scores = yolo.decode(tf.constant(raw), hw, keys, (320, 320))
        want = {key: v.numpy() for key, v in pp(boxes, scores).items()}
        got = lite(yolo_output=raw, image_size=np.array(hw, np.float32))
        assert tl.compare_detections(want, got) == []
        assert want["num_detections"][0] > 0
    # No anchor above any threshold: no candidate at all (the delegate once failed on that).
    raw[:, 4:] = 0.0
    got = lite(yolo_output=raw, image_size=np.array([480, 640], np.float32))
    assert got["num_detections"][0] == 0 and not np.any(got["detection_scores"])


# ----------------------------------------------------------------------------- command line


def _tiny_yolo(path, k: int = 3) -> None:
    """A YOLOv8-layout TFLite head: float32 `[1, 32, 32, 3]` in, `[1, 4 + k, 64]` out (centre-
    size boxes normalized to the input, sigmoid class scores), seeded weights."""
    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(0, 2, (3, 4 + k)).astype(np.float32))
    b = tf.constant(rng.normal(0, 1, (4 + k,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32)])
    def head(x):
        f = tf.reshape(tf.nn.avg_pool2d(x, 4, 4, "VALID"), [1, 64, 3])
        rows = tf.sigmoid(tf.matmul(f, w) + b) * tf.constant([1, 1, 0.3, 0.3] + [1] * k)
        return tf.transpose(rows, [0, 2, 1])

    path.write_bytes(tl.convert(head))


def _yolo_job(tmp_path, **export):
    import yaml

    _tiny_yolo(tmp_path / "yolo.tflite")
    (tmp_path / "labels.txt").write_text("person\nbicycle\ncar\n")
    PostProcessConfig(num_classes=3, background_column=False, calibration="temperature",
                      calibration_params={"temperature": (1.2,)}, min_score_thresh=(0.3, 0.4, 0.5),
                      nms_iou=(0.5, 0.6, 0.45), class_ids=(1, 2, 3),
                      max_total_detections=20).save(tmp_path / "run" / "postprocess.json")
    cfg = {"model": {"format": "yolo", "path": str(tmp_path / "yolo.tflite"),
                     "yolo": {"preset": "yolov8", "labels": str(tmp_path / "labels.txt")}},
           "data": {"annotations": "unused.json"},
           "output": {"dir": "run"},
           "export": {"dir": "export", "model_name": "det", "verify": False, **export}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_export_format_tflite_writes_both_models(tmp_path, capsys):
    from tfcal.cli import main

    config = _yolo_job(tmp_path)
    assert main(["export", str(config), "--format", "tflite"]) == 0
    out = tmp_path / "export" / "det_tflite"
    assert sorted(p.name for p in out.iterdir()) == [
        "postprocess.json", "postprocess.labels.txt", "postprocess.tflite",
        "postprocess_yolo.tflite"]
    assert not (tmp_path / "export" / "det_postprocess").exists()  # no SavedModel asked for
    meta = json.loads((out / "postprocess.json").read_text())
    assert meta["inputs"]["raw_detection_boxes"] == [1, 64, 4]
    assert meta["yolo_variant"]["inputs"]["yolo_output"] == [1, 7, 64]
    printed = capsys.readouterr().out
    assert "identical detections" in printed and "YOLO raw-output variant" in printed
    # The folder is not replaced without --overwrite: exit 2, one line.
    assert main(["export", str(config), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert main(["export", str(config), "--format", "tflite", "--overwrite"]) == 0


def test_cli_tflite_mismatch_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from tfcal.cli import main

    config = _yolo_job(tmp_path)
    real = tl._detections

    def dropped_row(config, boxes, raw, bounds, num_boxes=None):
        out = real(config, boxes, raw, bounds, num_boxes)
        out["num_detections"] = tf.maximum(out["num_detections"] - 1.0, 0.0)
        return out

    monkeypatch.setattr(tl, "_detections", dropped_row)
    assert main(["export", str(config), "--format", "tflite"]) == 1
    assert "differs from TF" in capsys.readouterr().err
    assert not (tmp_path / "export" / "det_tflite").exists()


def test_config_export_tflite_is_validated_at_load(tmp_path, capsys):
    from tfcal.cli import main

    config = _yolo_job(tmp_path, tflite="yes please")
    assert main(["export", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "export.tflite" in err


# ----------------------------------------------------------------------------- fused


def test_demo_detector_and_post_processing_fuse_into_one_file():
    from pathlib import Path

    import tfcal
    from tfcal.export.saved_model import load_detector

    graph = load_detector(Path(tfcal.__file__).parent / "demo" / "assets" / "detector")
    cfg = _config(calibration="temperature", temperature=(1.3,), max_total_detections=20)
    pp = tl.reference_postprocessor(cfg)
    lite = tl.LiteRunner(tl.convert(tl.build_fused_fn(cfg, graph, (96, 128), postprocessor=pp)))
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(3):
        image = rng.integers(0, 256, (1, 96, 128, 3), dtype=np.uint8)
        boxes, scores = graph.raw_fn(tf.constant(image))
        want = {k: v.numpy() for k, v in pp(boxes, scores).items()}
        got = lite(input_tensor=image)
        # The network's own arithmetic rounds differently in LiteRT (measured: boxes within
        # 7.5e-8): tolerances, not bit-exactness, for the fused file.
        assert tl.compare_detections(want, got, score_atol=1e-5, box_atol=1e-5) == []
        total += int(want["num_detections"][0])
    assert total > 0


def test_cli_export_with_export_tflite_writes_the_saved_model_and_tflite(tmp_path, capsys):
    from tfcal.cli import main

    config = _yolo_job(tmp_path, tflite=True)
    assert main(["export", str(config)]) == 0
    # A TFLite detector: the SavedModel is the post-processing alone, beside the TFLite folder.
    assert (tmp_path / "export" / "det_postprocess" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "export" / "det_tflite" / "postprocess_yolo.tflite").is_file()
    printed = capsys.readouterr().out
    assert "version 1" in printed and "identical detections" in printed
