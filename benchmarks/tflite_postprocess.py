"""On-device post-processing cost: LiteRT vs the YOLOv8n TFLite detector and vs TF, in one run.

For each image (COCO val2017, letterboxed by the YOLO adapter's own TF preprocessing, outside
the timings), times on the LiteRT runtime (`ai_edge_litert`, `--threads` threads):

- `detector`: the YOLOv8n int8 TFLite model's `invoke` (`../shared/models/yolov8n_tflite`);
- `lite_yolo`: the tuned post-processing's YOLO raw-output variant (dequantize the detector's
  int8 output in NumPy, then decode, letterbox inverse, calibration, per-class thresholds and
  NMS on device), the whole on-device post-processing a phone app runs after the detector;
- `lite`: the post-processing on decoded boxes and scores (`postprocess.tflite`);
- `tf`: TF's `postprocess_only` computation (the `PostProcessor` layer under one
  `tf.function`) on the same decoded boxes and scores.

Prints per-image medians and the ratios lite_yolo / detector (the aim: under 10%) and
lite / tf. The tuned numbers come from `--postprocess` (a `postprocess.json` written by
`tfcal tune`), or a seeded 80-class config (per-class temperature, thresholds in [0.25, 0.5],
IoU in [0.45, 0.7]). With `--coco N`, also COCO AP on the first N images: detector TFLite +
post-processing TFLite (the YOLO variant) against the TF path (adapter decode + PostProcessor),
with pycocotools.

Run: `python benchmarks/tflite_postprocess.py [--images 30] [--threads 1]
 [--postprocess runs/x/postprocess.json] [--data ../shared/data/coco_val2017_800] [--coco 800]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcal.detectors import yolo
from tfcal.export import tflite as tl
from tfcal.postprocess import PostProcessConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _seeded_config() -> PostProcessConfig:
    rng = np.random.default_rng(0)
    k = 80
    return PostProcessConfig(
        num_classes=k, background_column=False, calibration="temperature",
        calibration_params={"temperature": tuple(rng.uniform(0.8, 1.5, k).round(3))},
        min_score_thresh=tuple(rng.uniform(0.25, 0.5, k).round(3)),
        nms_iou=tuple(rng.uniform(0.45, 0.7, k).round(2)), max_total_detections=100)


class _Lite:
    """A LiteRT model called as an app calls it: set the inputs, invoke, read the outputs (the
    Python signature runner would also re-allocate every tensor on every call)."""

    def __init__(self, model: bytes, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_content=model, num_threads=threads)
        self.it.allocate_tensors()
        sig = self.it.get_signature_runner()
        self.inputs = {k: v["index"] for k, v in sig.get_input_details().items()}
        self.outputs = {k: v["index"] for k, v in sig.get_output_details().items()}

    def __call__(self, **inputs):
        for name, value in inputs.items():
            self.it.set_tensor(self.inputs[name], value)
        self.it.invoke()
        return {k: self.it.get_tensor(i) for k, i in self.outputs.items()}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path,
                    default=SHARED / "models" / "yolov8n_tflite" / "yolov8n_int8.tflite")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "coco_val2017_800")
    ap.add_argument("--postprocess", type=Path, default=None)
    ap.add_argument("--images", type=int, default=30, help="images timed")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per image and stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--coco", type=int, default=0, help="COCO AP on the first N images (0: no)")
    args = ap.parse_args()

    from ai_edge_litert.interpreter import Interpreter

    from tfcal.coco.dataset import load_coco

    cfg = PostProcessConfig.load(args.postprocess) if args.postprocess else _seeded_config()
    keys = yolo.resolve_layout(args.model, yolo.LayoutChoices(preset="yolov8"))
    det = Interpreter(model_path=str(args.model), num_threads=args.threads)
    det.allocate_tensors()
    d_in, d_out = det.get_input_details()[0], det.get_output_details()[0]
    size = tuple(int(v) for v in d_in["shape"][1:3])
    raw_shape = tuple(int(v) for v in d_out["shape"])
    n = yolo.num_classes_of(raw_shape, keys["layout"])[1]
    print(f"detector: {args.model.name}, input {list(d_in['shape'])} {d_in['dtype'].__name__}, "
          f"output {list(raw_shape)} {d_out['dtype'].__name__}; {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}")

    t0 = time.perf_counter()
    pp = tl.reference_postprocessor(cfg)
    bounds = tl.raw_keep_bounds(cfg, pp)
    lite_bytes = tl.convert(tl.build_postprocess_fn(cfg, n, bounds=bounds))
    yolo_bytes = tl.convert(tl.build_yolo_postprocess_fn(cfg, keys, size, raw_shape,
                                                         bounds=bounds))
    print(f"post-processing: {cfg.num_classes} classes, {cfg.calibration}; TFLite "
          f"{len(lite_bytes)} / {len(yolo_bytes)} (YOLO variant) bytes, built and converted in "
          f"{time.perf_counter() - t0:.1f} s")
    lite = _Lite(lite_bytes, args.threads)
    lite_yolo = _Lite(yolo_bytes, args.threads)
    tf_pp = tf.function(lambda b, s: pp(b, s), input_signature=[
        tf.TensorSpec([1, n, 4], tf.float32), tf.TensorSpec([1, n, cfg.num_classes],
                                                            tf.float32)])

    ds = load_coco(args.data / "instances_val2017.json", args.data / "images")
    scale, zero = d_out["quantization"]

    def detector_output(image):
        x = yolo.preprocess(tf.constant(image[None]), keys, size).numpy()
        q = d_in["quantization"]
        if d_in["dtype"] != np.float32:
            info = np.iinfo(d_in["dtype"])
            x = np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(d_in["dtype"])
        det.set_tensor(d_in["index"], x)
        det.invoke()
        return x

    def dequantized():
        out = det.get_tensor(d_out["index"])
        return out if out.dtype == np.float32 else ((out.astype(np.float32) - zero) * scale)

    rows = {"detector": [], "lite_yolo": [], "lite": [], "tf": []}
    for i in range(min(args.images, ds.num_images)):
        image = _read(ds, i)
        x = detector_output(image)
        hw = np.array(image.shape[:2], np.float32)
        raw = dequantized()
        boxes, scores = yolo.decode(tf.constant(raw), (float(hw[0]), float(hw[1])), keys, size)
        b, s = boxes.numpy(), scores.numpy()

        def run_detector():
            det.set_tensor(d_in["index"], x)
            det.invoke()

        rows["detector"].append(_median_ms(run_detector, args.repeats))
        rows["lite_yolo"].append(_median_ms(
            lambda: lite_yolo(yolo_output=dequantized(), image_size=hw), args.repeats))
        rows["lite"].append(_median_ms(
            lambda: lite(raw_detection_boxes=b, raw_detection_scores=s), args.repeats))
        rows["tf"].append(_median_ms(lambda: tf_pp(b, s)["num_detections"].numpy(),
                                     args.repeats))
        want = {k: v.numpy() for k, v in tf_pp(b, s).items()}
        got = lite_yolo(yolo_output=raw, image_size=hw)
        problems = tl.compare_detections(want, got)
        if problems:
            print(f"image {i}: LiteRT differs from TF: {problems}")
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nper image, median over {len(rows['detector'])} images (ms):")
    for k, v in med.items():
        print(f"  {k:10s} {v:8.2f}")
    print(f"ratio lite_yolo / detector: {med['lite_yolo'] / med['detector']:.3f} "
          f"(post-processing on device vs the detector)")
    print(f"ratio lite / tf:            {med['lite'] / med['tf']:.3f} "
          f"(LiteRT vs TF postprocess_only, same inputs)")
    if args.coco:
        _coco(args, cfg, ds, keys, size, detector_output, dequantized, lite_yolo, pp)


def _read(ds, i):
    from PIL import Image

    with Image.open(ds.image_paths[i]) as im:
        return np.asarray(im.convert("RGB"))


def _coco(args, cfg, ds, keys, size, detector_output, dequantized, lite_yolo, pp) -> None:
    from tfcal.coco.evaluation import coco_stats

    lite_res, tf_res = [], []
    count = min(args.coco, ds.num_images)
    differ = 0
    t0 = time.perf_counter()
    for i in range(count):
        image = _read(ds, i)
        detector_output(image)
        raw = dequantized()
        h, w = image.shape[:2]
        got = lite_yolo(yolo_output=raw, image_size=np.array([h, w], np.float32))
        boxes, scores = yolo.decode(tf.constant(raw), (float(h), float(w)), keys, size)
        want = {k: v.numpy() for k, v in pp(boxes, scores).items()}
        differ += bool(tl.compare_detections(want, got))
        for out, res in ((got, lite_res), (want, tf_res)):
            m = int(out["num_detections"][0])
            for (y0, x0, y1, x1), sc, c in zip(out["detection_boxes"][0, :m],
                                               out["detection_scores"][0, :m],
                                               out["detection_classes"][0, :m]):
                res.append({"image_id": int(ds.image_ids[i]), "category_id": int(c),
                            "bbox": [float(x0 * w), float(y0 * h), float((x1 - x0) * w),
                                     float((y1 - y0) * h)], "score": float(sc)})
    image_ids = [int(v) for v in ds.image_ids[:count]]
    lite_stats = coco_stats(ds, lite_res, image_ids=image_ids)
    tf_stats = coco_stats(ds, tf_res, image_ids=image_ids)
    print(f"\nCOCO on {count} images ({time.perf_counter() - t0:.0f} s): "
          f"{differ} images where LiteRT differs from TF")
    for key in ("AP", "AP50"):
        print(f"  {key}: detector TFLite + post-processing TFLite {lite_stats[key]:.4f}, "
              f"TF path {tf_stats[key]:.4f}")


if __name__ == "__main__":
    main()
