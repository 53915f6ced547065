"""Tests for tfcal.detectors.yolo: letterbox and its inverse against hand-derived values and an
independent NumPy reference, the three layouts, quantized TFLite I/O, labels, and the config."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml

from tfcal import TfcalError
from tfcal.config import load_config
from tfcal.detectors import yolo

tf = pytest.importorskip("tensorflow")

KEYS = {"layout": "boxes_first", "box_units": "normalized", "resize": "letterbox",
        "pixel_range": "unit"}


def _np_letterbox_decode(cxcywh_px, h0, w0, h1, w1):
    """NumPy mirror of Ultralytics' scale_boxes: input-pixel cxcywh -> normalized yxyx."""
    gain = min(h1 / h0, w1 / w0)
    pad_x = round((w1 - w0 * gain) / 2 - 0.1)
    pad_y = round((h1 - h0 * gain) / 2 - 0.1)
    cx, cy, w, h = np.moveaxis(np.asarray(cxcywh_px, np.float64), -1, 0)
    x0 = (cx - w / 2 - pad_x) / gain / w0
    x1 = (cx + w / 2 - pad_x) / gain / w0
    y0 = (cy - h / 2 - pad_y) / gain / h0
    y1 = (cy + h / 2 - pad_y) / gain / h0
    return np.clip(np.stack([y0, x0, y1, x1], -1), 0.0, 1.0)


def test_letterbox_inverse_hand_derived():
    # 100 x 200 image into 64 x 64: r = min(64/100, 64/200) = 0.32, resized 32 x 64, padded
    # top = round(16 - 0.1) = 16, left 0. A box centred at (32, 32) of 32 x 16 input pixels
    # spans x 16..48, y 24..40; back: x / 0.32 = 50..150 of 200, (y - 16) / 0.32 = 25..75 of
    # 100: [0.25, 0.25, 0.75, 0.75].
    raw = np.array([[[0.5], [0.5], [0.5], [0.25], [0.9]]], np.float32)  # [1, 4 + 1, 1]
    boxes, scores = yolo.decode(raw, (100, 200), KEYS, (64, 64))
    np.testing.assert_allclose(boxes.numpy()[0, 0], [0.25, 0.25, 0.75, 0.75], atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), [[[0.9]]])


def test_letterbox_geometry_rounds_like_ultralytics():
    # 3 x 2 into 4 x 4: r = 4/3, resized round(4) x round(2.667) = 4 x 3, dw = 0.5, so the
    # image sits at left round(0.4) = 0 while scale_boxes' pad is round(0.567) = 1 (its own
    # rounding, mirrored here so that results match Ultralytics'). Half-way values round to
    # even: 427 high into 640: dh = 106.5, top round(106.4) = 106.
    gain, nh, nw, top, left, pad_y, pad_x = (
        float(v) for v in yolo.letterbox_geometry(3, 2, 4, 4))
    assert (nh, nw, top, left, pad_y, pad_x) == (4, 3, 0, 0, 0, 1)
    assert gain == pytest.approx(4 / 3)
    out = [float(v) for v in yolo.letterbox_geometry(427, 640, 640, 640)]
    assert out[1:] == [427, 640, 106, 0, 106, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    h0, w0 = [int(v) for v in rng.integers(50, 400, size=2)]
    h1, w1 = 96, 128
    n, k = 20, 3
    cxcywh = np.stack([rng.uniform(0, w1, n), rng.uniform(0, h1, n),
                       rng.uniform(1, w1 / 2, n), rng.uniform(1, h1 / 2, n)], -1)
    cls = rng.uniform(0, 1, (n, k))
    raw = np.concatenate([cxcywh, cls], -1)[None].astype(np.float32)  # [1, N, 4 + K] pixels
    keys = dict(KEYS, layout="boxes_last", box_units="pixels")
    boxes, scores = yolo.decode(raw, (h0, w0), keys, (h1, w1))
    np.testing.assert_allclose(boxes.numpy()[0], _np_letterbox_decode(cxcywh, h0, w0, h1, w1),
                               atol=1e-5)
    # The same head normalized, channels first, gives the same boxes.
    normalized = raw.copy()
    normalized[..., [0, 2]] /= w1
    normalized[..., [1, 3]] /= h1
    boxes_first, _ = yolo.decode(np.transpose(normalized, [0, 2, 1]), (h0, w0), KEYS, (h1, w1))
    np.testing.assert_allclose(boxes_first.numpy(), boxes.numpy(), atol=1e-5)
    # Stretch: normalized input coordinates are normalized image coordinates.
    stretched, _ = yolo.decode(raw, (h0, w0), dict(keys, resize="stretch"), (h1, w1))
    ref = np.stack([cxcywh[:, 1] - cxcywh[:, 3] / 2, cxcywh[:, 0] - cxcywh[:, 2] / 2,
                    cxcywh[:, 1] + cxcywh[:, 3] / 2, cxcywh[:, 0] + cxcywh[:, 2] / 2], -1)
    np.testing.assert_allclose(stretched.numpy()[0], np.clip(ref / [h1, w1, h1, w1], 0, 1),
                               atol=1e-6)


def test_objectness_layout_multiplies_class_scores():
    raw = np.array([[[0.5, 0.5, 0.2, 0.2, 0.5, 0.8, 0.1]]], np.float32)  # [1, 1, 5 + 2]
    keys = dict(KEYS, layout="objectness", resize="stretch")
    _, scores = yolo.decode(raw, (10, 10), keys, (32, 32))
    np.testing.assert_allclose(scores.numpy(), [[[0.4, 0.05]]], atol=1e-7)
    assert yolo.num_classes_of((1, 10, 7), "objectness") == (2, 10)
    assert yolo.num_classes_of((1, 84, 8400), "boxes_first") == (80, 8400)


def test_preprocess_pads_with_gray_and_keeps_exact_pixels():
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(1, 2, 4, 3)
    out = yolo.preprocess(image, KEYS, (4, 4)).numpy()  # no resize: top 1, bottom 1
    assert out.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(out[0, [0, 3]], 114 / 255.0, atol=1e-7)
    np.testing.assert_allclose(out[0, 1:3], image[0] / 255.0, atol=1e-7)
    byte = yolo.preprocess(image, dict(KEYS, pixel_range="byte"), (4, 4)).numpy()
    np.testing.assert_allclose(byte, out * 255.0, atol=1e-4)


def test_quantized_io_round_trips():
    detail = {"dtype": np.int8, "quantization": (1 / 255.0, -128)}
    x = np.array([0.0, 0.2, 1.0, 1.5], np.float32)
    q = yolo._quantize(x, detail)  # round(x * 255) - 128, clipped to [-128, 127]
    assert q.dtype == np.int8 and q.tolist() == [-128, -77, 127, 127]
    np.testing.assert_allclose(yolo._dequantize(q, detail), [0.0, 0.2, 1.0, 1.0], atol=1e-6)
    assert yolo._quantize(x, {"dtype": np.float32, "quantization": (0.0, 0)}) is not x


def test_labels_and_their_mapping(tmp_path, caplog):
    path = tmp_path / "labels.txt"
    path.write_text("person\nbicycle\nunicorn\n\n")
    names = yolo.read_labels(path)
    assert names == ("person", "bicycle", "unicorn")
    with pytest.raises(TfcalError, match=r"labels: 1 names are no category.*\['unicorn'\]"):
        yolo.label_columns(names, ["bicycle", "person"], on_unknown="error", source=str(path))
    with caplog.at_level(logging.WARNING):
        cols = yolo.label_columns(names, ["bicycle", "person"], on_unknown="disable",
                                  source=str(path))
    assert cols == {0: "person", 1: "bicycle"} and "unicorn" in caplog.text
    path.write_text("a\nb\na\n")
    with pytest.raises(TfcalError, match=r"names repeat: \['a'\]"):
        yolo.read_labels(path)


def test_presets_and_explicit_keys(tmp_path):
    tfl = tmp_path / "m.tflite"
    tfl.write_bytes(b"")
    sm = tmp_path / "sm"
    sm.mkdir()
    v8 = yolo.LayoutChoices(preset="yolov8")
    assert yolo.resolve_layout(tfl, v8)["box_units"] == "normalized"
    assert yolo.resolve_layout(sm, v8)["box_units"] == "pixels"
    v5 = yolo.resolve_layout(sm, yolo.LayoutChoices(preset="yolov5", resize="stretch"))
    assert (v5["layout"], v5["resize"], v5["backend"]) == ("objectness", "stretch", "saved_model")
    with pytest.raises(ValueError, match="layout: give a preset"):
        yolo.resolve_layout(tfl)


def _cfg(tmp_path, model):
    (tmp_path / "m.tflite").write_bytes(b"")
    (tmp_path / "labels.txt").write_text("person\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": model, "data": {"annotations": "a.json"}}))
    return path


def test_config_format_yolo(tmp_path):
    cfg = load_config(_cfg(tmp_path, {"format": "yolo", "path": "m.tflite",
                                      "yolo": {"preset": "yolov8", "labels": "labels.txt"}}))
    m = cfg.model
    assert (m.score_converter, m.background_column) == ("sigmoid", False)  # format defaults
    assert m.detector_path == tmp_path / "m.tflite" and m.yolo.labels == tmp_path / "labels.txt"
    cfg = load_config(_cfg(tmp_path, {"format": "yolo", "path": "m.tflite",
                                      "background_column": True,
                                      "yolo": {"layout": "boxes_last", "labels": "labels.txt"}}))
    assert cfg.model.background_column is True  # what the file says wins


@pytest.mark.parametrize("model,message", [
    ({"format": "yolo", "path": "m.tflite", "yolo": {"preset": "v9", "labels": "labels.txt"}},
     r"model.yolo.preset: must be one of yolov8 \| yolo11 \| yolov5, got 'v9'"),
    ({"format": "yolo", "path": "m.tflite", "yolo": {"labels": "labels.txt"}},
     r"model.yolo.layout: give a preset"),
    ({"format": "yolo", "path": "m.tflite", "yolo": {"preset": "yolov8"}},
     r"model.yolo.labels: is required"),
    ({"format": "yolo", "path": "m.tflite", "yolo": {"preset": "yolov8", "labels": "no.txt"}},
     r"model.yolo.labels: .*no.txt: cannot read labels"),
    ({"format": "yolo", "path": "m.tflite",
      "yolo": {"preset": "yolov8", "labels": "labels.txt", "input_size": [640]}},
     r"model.yolo.input_size: must be \[height, width\]"),
    ({"format": "yolo", "saved_model": "m.tflite"}, r"model.saved_model: is for format odapi"),
    ({"format": "yolo", "path": "nope.tflite", "yolo": {"preset": "yolov8"}},
     r"model.path: no such file"),
    ({"saved_model": "det", "yolo": {"preset": "yolov8"}}, r"model.yolo: is for format yolo"),
    ({"saved_model": "det", "path": "m.tflite"}, r"model.path: is for format yolo or keras"),
    ({"format": "keras", "path": "m.tflite"}, r"model.path: format keras takes a .keras file"),
])
def test_config_errors_name_the_key(tmp_path, model, message):
    with pytest.raises(TfcalError, match=r"c.yaml: " + message):
        load_config(_cfg(tmp_path, model))


def _raw_job(tmp_path, labels):
    """Two images, precomputed YOLO-space outputs (3 boxes, 2 class columns), and a config."""
    import json

    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30}
                       for i in (1, 2)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10],
                             "area": 100, "iscrowd": 0}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "raw.npz", image_ids=np.array([1, 2]),
             boxes=np.tile(np.array([0.1, 0.1, 0.5, 0.5], np.float32), (2, 3, 1)),
             scores=rng.uniform(0, 1, (2, 3, 2)).astype(np.float32))
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"format": "yolo", "raw_outputs": "raw.npz", "yolo": {"labels": "labels.txt"}},
        "data": {"annotations": "a.json"}}))
    return load_config(path)


def test_labels_map_columns_to_category_ids_by_name(tmp_path):
    from tfcal.tuning.prepare import prepare

    prep = prepare(_raw_job(tmp_path, ["dog", "cat"]))  # column 0 is dog (id 7), 1 is cat (3)
    assert prep.num_classes == 2 and prep.mapping.column_category_ids.tolist() == [7, 3]
    with pytest.raises(TfcalError, match=r"labels.txt: labels: 3 names, but .*raw.npz has 2 "
                                         r"class columns"):
        prepare(_raw_job(tmp_path, ["dog", "cat", "bird"]))


def test_unknown_labels_exit_2_with_one_line(tmp_path, capsys):
    from tfcal.cli import main

    _raw_job(tmp_path, ["dog", "unicorn"])
    assert main(["tune", str(tmp_path / "c.yaml"), "--no-export"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "labels.txt: labels: 1 names are no category" in err and "unicorn" in err
    assert not list(tmp_path.rglob("postprocess.json")) and not list(tmp_path.rglob("report.json"))
