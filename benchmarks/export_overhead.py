"""Latency of the exported model (detector + tfcal post-processing) vs the original detector.

Runs `python benchmarks/export_overhead.py [--detector DIR] [--images DIR] [--rounds N]`.

Both SavedModels' `serving_default` run on the same images, interleaved: each image goes through
both back to back, the order alternating each round. This is done through both loaders:
`tf.saved_model.load` and the TF1 loader that TF Serving (and `saved_model_cli run`) uses.
The ratio is the median over calls of the paired ratio exported / original (robust to load
drift on a shared machine); the worse of the two loaders must be <= 1.05. The medians of each
model are printed too. The PostProcessor uses the detector's own post-processing numbers
(sigmoid scores, IoU 0.6, 100 per class, 100 total), so the comparison is like for like. Also
printed: the same export without pruning (the detector's NMS still reachable, as dead weight)
and the graph proof, NMS ops reachable from each signature's outputs.

Default detector: ../shared/models/nanodet_odapi with ../shared/data/coco_val2017_tiny images;
without them, the small OD API test detector from tests/export on generated images.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TARGET = 1.05
DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def _images(images_dir: Path | None, count: int) -> list[np.ndarray]:
    if images_dir is not None and images_dir.is_dir():
        paths = sorted(images_dir.glob("*.jpg"))[:count]
        if paths:
            return [tf.io.decode_jpeg(p.read_bytes(), channels=3).numpy() for p in paths]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(240 + 16 * i, 320, 3), dtype=np.uint8) for i in range(count)]


def _tf1_runner(saved_model_dir: Path):
    """`serving_default` through the TF1 loader (the path TF Serving runs): x -> outputs."""
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(saved_model_dir))
    sig = meta.signature_def["serving_default"]
    fetch = {k: sig.outputs[k].name for k in DETECTION_KEYS}
    (feed,) = (v.name for v in sig.inputs.values())
    return lambda input_tensor: sess.run(fetch, {feed: input_tensor})


def _interleaved(models: dict, inputs: list, rounds: int) -> dict[str, list[float]]:
    """Per-call seconds; `original` and `exported` run back to back on each input, the order
    alternating each round, so each pair sees the same machine load; the others follow."""
    times: dict[str, list[float]] = {name: [] for name in models}
    others = [name for name in models if name not in ("original", "exported")]
    for r in range(rounds):
        pair = ["original", "exported"] if r % 2 == 0 else ["exported", "original"]
        for x in inputs:
            for name in pair + others:
                start = time.perf_counter()
                out = models[name](input_tensor=x)
                for value in out.values():
                    np.asarray(value)
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", type=Path, default=SHARED / "models" / "nanodet_odapi")
    parser.add_argument(
        "--images", type=Path, default=SHARED / "data" / "coco_val2017_tiny" / "images"
    )
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tfcal_bench_") as work:
        return _run(args, Path(work))


def _run(args, work: Path) -> int:
    from tfcal.export import saved_model
    from tfcal.handoff import DetectorDescription
    from tfcal.postprocess import PostProcessConfig

    detector = args.detector
    if (detector / "saved_model.pb").is_file():
        num_classes = 90
        images = _images(args.images, args.num_images)
        source = f"{detector} on {len(images)} images from {args.images}"
    else:
        sys.path.insert(0, str(ROOT / "tests" / "export"))
        from odapi_test_model import NUM_CLASSES, build_odapi_test_model

        detector = build_odapi_test_model(work / "detector", "image_tensor", batch_size=1)
        num_classes = NUM_CLASSES
        images = _images(None, args.num_images)
        source = "the OD API test detector (shared detector not found)"
        source += f" on {len(images)} generated images"
    # The detector's own numbers (nanodet: combined NMS, score >= 1e-8, IoU 0.6, 100/100).
    config = PostProcessConfig(
        num_classes=num_classes,
        min_score_thresh=(1e-8,),
        nms_iou=(0.6,),
        max_detections_per_class=100,
        max_total_detections=100,
    )
    exported_dir = work / "exported"
    unpruned_dir = work / "unpruned"
    described = DetectorDescription(saved_model=detector)
    saved_model.export_detector(described, config, exported_dir)
    saved_model.export_detector(described, config, unpruned_dir,
                                saved_model.ModelOptions(prune=False))

    exported = tf.saved_model.load(str(exported_dir))
    eager = {
        "original": tf.saved_model.load(str(detector)).signatures["serving_default"],
        "exported": exported.signatures["serving_default"],
        "unpruned": tf.saved_model.load(str(unpruned_dir)).signatures["serving_default"],
        # The pruned detector alone (no post-processing at all): the floor of both models.
        "raw_only": lambda input_tensor: exported.detector_raw_outputs(input_tensor),
    }
    tf1 = {
        "original": _tf1_runner(detector),
        "exported": _tf1_runner(exported_dir),
        "unpruned": _tf1_runner(unpruned_dir),
    }
    batches = [image[np.newaxis] for image in images]
    results = {}
    for path, models in (("tf.saved_model.load", eager), ("TF1 loader (TF Serving)", tf1)):
        for fn in models.values():  # warm up: tracing, grappler, first allocations
            for x in batches[:2]:
                fn(input_tensor=x)
        times = _interleaved(models, batches, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        paired = statistics.median(e / o for e, o in zip(times["exported"], times["original"]))
        results[path] = paired
        print(f"{path}: {len(times['original'])} calls per model ({args.rounds} rounds)")
        for name, value in med.items():
            print(f"  {name:9s} median {value * 1e3:8.2f} ms")
        print(f"  ratio of medians exported / original: {med['exported'] / med['original']:.3f}")
        print(f"  ratio of medians unpruned / original: {med['unpruned'] / med['original']:.3f}")
        print(f"  median paired ratio exported / original: {paired:.3f}")

    nms = {
        "original serving_default": saved_model.count_nms_ops(detector),
        "exported serving_default": saved_model.count_nms_ops(exported_dir),
        "exported postprocess_only": saved_model.count_nms_ops(exported_dir, "postprocess_only"),
        "unpruned serving_default": saved_model.count_nms_ops(unpruned_dir),
    }
    pruned_ok = nms["exported serving_default"] == nms["exported postprocess_only"]
    print("NMS ops reachable from the outputs (postprocess_only = the PostProcessor alone):")
    for name, counts in nms.items():
        print(f"  {name}: {counts or 0}")
    print(f"detector NMS pruned from the exported graph: {'yes' if pruned_ok else 'NO'}")
    worst = max(results.values())
    passed = worst <= TARGET and pruned_ok
    print(f"detector: {source}")
    print(
        f"ratio exported / original (worst of both loaders, median paired): {worst:.3f} "
        f"(target <= {TARGET:.2f}) {'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
