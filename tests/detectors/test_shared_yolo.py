"""The YOLO adapter on a real detector: Ultralytics' YOLOv8n int8 TFLite export on 15 COCO
val2017 images from `../shared` beside the repository (skipped when it is absent).

The reference is independent of tfcal: the letterbox in NumPy (bilinear with half-pixel
centres, as cv2.INTER_LINEAR, then gray 114 borders), `tf.lite.Interpreter` called directly, and
NumPy `scale_boxes`. Images that need no resize (most COCO images have a 640 side) must give the
very same raw outputs; over all 15, COCO AP with a plain per-class NMS (IoU 0.7, score 0.001,
300 boxes) must agree within 0.01 (measured: the adapter gives AP 0.4215 / AP50 0.5731 on all
50 images of coco_val2017_tiny, a cv2 letterbox reference 0.4217 / 0.5737).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .test_yolo import _np_letterbox_decode

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MODEL = SHARED / "models" / "yolov8n_tflite" / "yolov8n_int8.tflite"
LABELS = SHARED / "models" / "yolov8n_tflite" / "labels.txt"
DATA = SHARED / "data" / "coco_val2017_tiny"
NUM_IMAGES = 15

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.exists() or not (DATA / "instances_val2017.json").exists(),
                       reason=f"real model and data not found under {SHARED} "
                              "(models/yolov8n_tflite, data/coco_val2017_tiny)"),
]


def _np_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (cv2.INTER_LINEAR), rounded to uint8."""
    h0, w0 = image.shape[:2]
    ys = np.clip((np.arange(h) + 0.5) * h0 / h - 0.5, 0, h0 - 1)
    xs = np.clip((np.arange(w) + 0.5) * w0 / w - 0.5, 0, w0 - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h0 - 1), np.minimum(x0 + 1, w0 - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    im = image.astype(np.float64)
    top = im[y0][:, x0] * (1 - fx) + im[y0][:, x1] * fx
    bottom = im[y1][:, x0] * (1 - fx) + im[y1][:, x1] * fx
    return np.clip(np.round(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def _np_letterbox(image: np.ndarray, size: int = 640) -> np.ndarray:
    h0, w0 = image.shape[:2]
    r = min(size / h0, size / w0)
    nh, nw = int(round(h0 * r)), int(round(w0 * r))
    if (nh, nw) != (h0, w0):
        image = _np_resize(image, nh, nw)
    dh, dw = (size - nh) / 2, (size - nw) / 2
    top, left = int(round(dh - 0.1)), int(round(dw - 0.1))
    out = np.full((size, size, 3), 114, np.uint8)
    out[top:top + nh, left:left + nw] = image
    return out


def _plain_nms_results(tf, image_id, boxes, scores, hw, col_ids):
    nb, ns, nc, nv = tf.image.combined_non_max_suppression(
        boxes[None, :, None, :], scores[None], max_output_size_per_class=300,
        max_total_size=300, iou_threshold=0.7, score_threshold=0.001, clip_boxes=False)
    h, w = hw
    out = []
    for j in range(int(nv[0])):
        y0, x0, y1, x1 = nb[0, j].numpy() * [h, w, h, w]
        out.append({"image_id": int(image_id), "category_id": int(col_ids[int(nc[0, j])]),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(ns[0, j])})
    return out


def test_yolov8n_tflite_through_the_adapter_matches_a_numpy_letterbox_reference():
    import tensorflow as tf

    from tfcal.coco.dataset import load_coco
    from tfcal.coco.evaluation import coco_stats
    from tfcal.detectors.yolo import (LayoutChoices, YoloDetector, label_columns, read_labels,
                                      resolve_layout)
    from tfcal.handoff import DetectorDescription

    dataset = load_coco(DATA / "instances_val2017.json", DATA / "images")
    names = read_labels(LABELS)
    columns = label_columns(names, list(dataset.category_names), on_unknown="error",
                            source=str(LABELS))
    by_name = dict(zip(dataset.category_names, dataset.category_ids))
    col_ids = np.array([by_name[columns[c]] for c in range(len(names))])
    layout = resolve_layout(MODEL, LayoutChoices(preset="yolov8"))
    det = YoloDetector(DetectorDescription(saved_model=str(MODEL), format="yolo", layout=layout))
    interpreter = tf.lite.Interpreter(model_path=str(MODEL), num_threads=2)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert det.num_score_columns == 80 and det.input_size == (640, 640)

    ids = sorted(int(i) for i in dataset.image_ids)[:NUM_IMAGES]
    adapter_results, reference_results, exact = [], [], 0
    for image_id in ids:
        path = dataset.image_paths[int(np.flatnonzero(dataset.image_ids == image_id)[0])]
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3).numpy()
        h0, w0 = image.shape[:2]
        boxes, scores = det([image])
        interpreter.set_tensor(inp["index"],
                               _np_letterbox(image)[None].astype(np.float32) / 255.0)
        interpreter.invoke()
        raw = interpreter.get_tensor(out["index"])[0].T  # [8400, 84]
        ref_boxes = _np_letterbox_decode(raw[:, :4] * 640.0, h0, w0, 640, 640)
        if max(h0, w0) == 640:  # no resize: the very same pixels, the very same outputs
            np.testing.assert_allclose(boxes[0], ref_boxes, atol=1e-5)
            np.testing.assert_allclose(scores[0], raw[:, 4:], atol=1e-6)
            exact += 1
        adapter_results += _plain_nms_results(tf, image_id, boxes[0], scores[0], (h0, w0),
                                              col_ids)
        reference_results += _plain_nms_results(tf, image_id, ref_boxes.astype(np.float32),
                                                raw[:, 4:], (h0, w0), col_ids)
    assert exact >= NUM_IMAGES // 2
    got = coco_stats(dataset, adapter_results, image_ids=ids)
    want = coco_stats(dataset, reference_results, image_ids=ids)
    assert abs(got["AP"] - want["AP"]) <= 0.01 and abs(got["AP50"] - want["AP50"]) <= 0.01
    assert 0.3 <= got["AP"] <= 0.6, got  # YOLOv8n on COCO: about 0.4 here
