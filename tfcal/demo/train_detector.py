"""Training, export and evaluation of the demo detector (`tfcal/demo/assets/detector`).

The committed model was made with exactly this command, from the repository root::

    python -m tfcal.demo.train_detector --out tfcal/demo/assets/detector

It renders the training scenes (about 25 s), trains (about 5 minutes on 2 idle CPU cores;
7.6 minutes measured while other jobs shared the cores), exports, and evaluates the export on
the held-out scenes, logging a summary. Measured for the committed model (400 held-out images,
seed 2026, the model's own post-processing):

| metric | value |
| --- | --- |
| COCO AP / AP50 / AP75 (pycocotools) | 0.596 / 0.842 / 0.678 |
| AP50 per class (circle, square, triangle, cross, ring) | 0.863, 0.852, 0.845, 0.837, 0.813 |
| ECE of detections with score >= 0.05 (15 bins; TP at IoU 0.5) | 0.114 |
| ECE of detections with score >= 0.3 | 0.138 |
| parameters / SavedModel size | 148,809 / 0.67 MB |
| signature call, one 128x128 image, 2 CPU cores | about 7 ms |

The raw scores are over-confident below 0.5 (scores 0.3 to 0.4 are right 14% of the time) and
under-confident above it (scores 0.6 to 0.7 are right 81% of the time).

The defaults (`--train-seed 1 --num-train 4000 --epochs 20 --eval-seed 2026 --num-eval 400`)
are the committed model's; training data (seed 1) and evaluation data (seed 2026, the demo's)
are rendered by `tfcal.demo.data` from different seeds. Training is seeded and uses TF op
determinism, so rerunning the command reproduces the weights on the same TF build.

Model (`ShapeDetector`, 148,809 parameters, float32): an anchor-free, FCOS-style single-level
detector. The image is resized to 128x128 and scaled to [0, 1]; seven 3x3 ReLU convolutions
(strides 2, 2, 1, 2, 1, 1, 1 with dilations 1, 1, 1, 1, 1, 2, 1; 16-32-32-64-64-64-64 channels)
give a 16x16 stride-8 grid; two 3x3 heads predict, at each of the 256 cells, 5 sigmoid class
logits and 4 log-distances (left, top, right, bottom, in units of the stride) from the cell
centre to the box sides. A cell is positive for a box when its centre lies inside the box and
within 1.5 strides of the box centre (the smallest box wins); so every object gets several
overlapping predictions, and NMS has work to do. Losses: sigmoid focal loss (alpha 0.25,
gamma 2) on all cells plus GIoU on positive cells. Focal loss leaves the raw scores
miscalibrated (see above), which is what the demo's calibration step then corrects.

Export (`export_saved_model`): a `tf.Module` saved with `tf.saved_model.save`, in the form
`exporter_main_v2.py --input_type image_tensor` gives an SSD model with a SIGMOID score
converter. Signature `serving_default`:

| name | dtype, shape | meaning |
| --- | --- | --- |
| input `input_tensor` | uint8 `[1, None, None, 3]` | one RGB image, any size (1) |
| `raw_detection_boxes` | float32 `[1, 256, 4]` | before NMS, `[ymin, xmin, ymax, xmax]` in [0, 1] |
| `raw_detection_scores` | float32 `[1, 256, 6]` | sigmoid scores (2) |
| `detection_boxes` | float32 `[1, 100, 4]` | after combined NMS (3) |
| `detection_scores` | float32 `[1, 100]` | |
| `detection_classes` | float32 `[1, 100]` | category ids 1..5 (column + label_offset 1) |
| `num_detections` | float32 `[1]` | |

(1) Resized inside to 128x128. Batch 1, as in OD API image_tensor exports.
(2) Column 0 is background (always 0); column k is category id k.
(3) Score > 1e-8, IoU 0.6, 100 per class, 100 total, as the OD API's SSD post-processing.

The logits are `log(p / (1 - p))` of `raw_detection_scores` (score_converter `sigmoid`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcal import atomic
from tfcal.coco.dataset import load_coco
from tfcal.coco.evaluation import coco_stats
from tfcal.demo import data as shapes

log = logging.getLogger(__name__)

INPUT_SIZE = 128
STRIDE = 8
GRID = INPUT_SIZE // STRIDE
NUM_CELLS = GRID * GRID
NUM_CLASSES = shapes.NUM_CLASSES
CENTER_RADIUS = 1.5  # strides
MAX_LOG_DISTANCE = 4.0
# (name, in_channels, out_channels, stride, dilation) of the backbone convolutions.
BACKBONE = (
    ("conv1", 3, 16, 2, 1),
    ("conv2", 16, 32, 2, 1),
    ("conv3", 32, 32, 1, 1),
    ("conv4", 32, 64, 2, 1),
    ("conv5", 64, 64, 1, 1),
    ("conv6", 64, 64, 1, 2),
    ("conv7", 64, 64, 1, 1),
)
HEADS = (("cls_head", 64, NUM_CLASSES), ("box_head", 64, 4))
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLS_PRIOR = 0.01
NMS_IOU = 0.6
NMS_SCORE_THRESHOLD = 1e-8
MAX_DETECTIONS = 100


def init_weights(seed: int) -> dict[str, np.ndarray]:
    """He-initialized float32 weights `{name/kernel: [3, 3, in, out], name/bias: [out]}`."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, cin, cout, _, _ in BACKBONE:
        weights[f"{name}/kernel"] = rng.normal(0, np.sqrt(2.0 / (9 * cin)), (3, 3, cin, cout))
        weights[f"{name}/bias"] = np.zeros(cout)
    for name, cin, cout in HEADS:
        weights[f"{name}/kernel"] = rng.normal(0, 0.01, (3, 3, cin, cout))
        weights[f"{name}/bias"] = np.zeros(cout)
    # Focal-loss prior: start every class score at CLS_PRIOR.
    weights["cls_head/bias"][:] = -np.log((1 - CLS_PRIOR) / CLS_PRIOR)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def _cell_centers() -> np.ndarray:
    """float32 `[NUM_CELLS, 2]` cell centres `(y, x)` in input pixels, row-major."""
    ii, jj = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    return ((np.stack([ii, jj], -1).reshape(-1, 2) + 0.5) * STRIDE).astype(np.float32)


def forward(weights: dict, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Runs the network.

    Args:
      weights: `{name: tf.Variable or tensor}` as from `init_weights`.
      images: float32 `[batch, 128, 128, 3]` in [0, 1].

    Returns:
      `(class_logits, boxes)`: float32 `[batch, 256, 5]` and float32 `[batch, 256, 4]`
      `[ymin, xmin, ymax, xmax]` in input pixels.
    """
    x = images
    for name, _, _, stride, dilation in BACKBONE:
        x = tf.nn.conv2d(x, weights[f"{name}/kernel"], strides=stride, padding="SAME",
                         dilations=dilation)
        x = tf.nn.relu(x + weights[f"{name}/bias"])
    batch = tf.shape(x)[0]
    logits = tf.nn.conv2d(x, weights["cls_head/kernel"], 1, "SAME") + weights["cls_head/bias"]
    dist = tf.nn.conv2d(x, weights["box_head/kernel"], 1, "SAME") + weights["box_head/bias"]
    logits = tf.reshape(logits, [batch, NUM_CELLS, NUM_CLASSES])
    dist = tf.exp(tf.minimum(tf.reshape(dist, [batch, NUM_CELLS, 4]), MAX_LOG_DISTANCE)) * STRIDE
    centers = tf.constant(_cell_centers())[None]
    # dist columns: left, top, right, bottom.
    boxes = tf.stack([centers[..., 0] - dist[..., 1], centers[..., 1] - dist[..., 0],
                      centers[..., 0] + dist[..., 3], centers[..., 1] + dist[..., 2]], axis=-1)
    return logits, boxes


def build_targets(scenes: list[shapes.Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Assigns ground-truth boxes to grid cells.

    Returns:
      `(classes, boxes)`: int32 `[num_images, 256]` (0 background, else category id) and float32
      `[num_images, 256, 4]` `[ymin, xmin, ymax, xmax]` input pixels of the assigned box.
    """
    centers = _cell_centers()
    classes = np.zeros((len(scenes), NUM_CELLS), np.int32)
    boxes = np.zeros((len(scenes), NUM_CELLS, 4), np.float32)
    for n, scene in enumerate(scenes):
        h, w = scene.image.shape[:2]
        sy, sx = INPUT_SIZE / h, INPUT_SIZE / w
        best_area = np.full(NUM_CELLS, np.inf)
        for (x, y, bw, bh), cat in zip(scene.boxes, scene.category_ids):
            ymin, xmin, ymax, xmax = y * sy, x * sx, (y + bh) * sy, (x + bw) * sx
            cy, cx = (ymin + ymax) / 2, (xmin + xmax) / 2
            inside = ((centers[:, 0] > ymin) & (centers[:, 0] < ymax)
                      & (centers[:, 1] > xmin) & (centers[:, 1] < xmax))
            near = np.max(np.abs(centers - [cy, cx]), axis=1) <= CENTER_RADIUS * STRIDE
            own = int(min(cy // STRIDE, GRID - 1) * GRID + min(cx // STRIDE, GRID - 1))
            mask = inside & near
            mask[own] = True
            area = (ymax - ymin) * (xmax - xmin)
            take = mask & (area < best_area)
            best_area[take] = area
            classes[n, take] = cat
            boxes[n, take] = [ymin, xmin, ymax, xmax]
    return classes, boxes


def _giou_loss(pred: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """1 - GIoU of `[n, 4]` yxyx boxes, `[n]`."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = tf.maximum(pred[:, :2], target[:, :2])
    rb = tf.minimum(pred[:, 2:], target[:, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_p + area_t - inter
    iou = inter / (union + 1e-6)
    enc = tf.maximum(pred[:, 2:], target[:, 2:]) - tf.minimum(pred[:, :2], target[:, :2])
    enc_area = enc[:, 0] * enc[:, 1] + 1e-6
    return 1.0 - (iou - (enc_area - union) / enc_area)


def loss_fn(weights, images, target_classes, target_boxes):
    """Focal loss (per positive cell) plus 2 x mean GIoU loss on positive cells; scalar."""
    logits, boxes = forward(weights, images)
    onehot = tf.one_hot(target_classes - 1, NUM_CLASSES)  # background (-1) -> all zeros
    prob = tf.sigmoid(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=logits)
    p_t = onehot * prob + (1 - onehot) * (1 - prob)
    alpha_t = onehot * FOCAL_ALPHA + (1 - onehot) * (1 - FOCAL_ALPHA)
    focal = alpha_t * tf.pow(1 - p_t, FOCAL_GAMMA) * ce
    positive = target_classes > 0
    num_pos = tf.maximum(tf.reduce_sum(tf.cast(positive, tf.float32)), 1.0)
    cls_loss = tf.reduce_sum(focal) / num_pos
    giou = _giou_loss(tf.boolean_mask(boxes, positive), tf.boolean_mask(target_boxes, positive))
    box_loss = tf.reduce_sum(giou) / num_pos
    return cls_loss + 2.0 * box_loss, cls_loss, box_loss


def train(*, num_train: int = 4000, epochs: int = 20, batch_size: int = 32,
          learning_rate: float = 3e-3, train_seed: int = 1) -> dict[str, np.ndarray]:
    """Trains on `num_train` scenes rendered with `train_seed`; returns the float32 weights."""
    tf.keras.utils.set_random_seed(train_seed)
    tf.config.experimental.enable_op_determinism()
    t0 = time.perf_counter()
    scenes = shapes.render_scenes(num_train, seed=train_seed)
    images = np.stack([s.image for s in scenes])
    target_classes, target_boxes = build_targets(scenes)
    log.info("rendered %d training images in %.1f s", num_train, time.perf_counter() - t0)

    weights = {k: tf.Variable(v, name=k.replace("/", "_")) for k, v in
               init_weights(train_seed).items()}
    variables = list(weights.values())
    steps_per_epoch = num_train // batch_size
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=epochs * steps_per_epoch, alpha=0.02,
        warmup_target=None)
    optimizer = tf.keras.optimizers.Adam(schedule)

    @tf.function(reduce_retracing=True)
    def step(img, cls, box):
        with tf.GradientTape() as tape:
            loss, cls_loss, box_loss = loss_fn(weights, tf.cast(img, tf.float32) / 255.0, cls, box)
        grads = tape.gradient(loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, 10.0)
        optimizer.apply_gradients(zip(grads, variables))
        return loss, cls_loss, box_loss

    rng = np.random.default_rng(train_seed + 1000)
    for epoch in range(epochs):
        order = rng.permutation(num_train)
        flips = rng.random(steps_per_epoch) < 0.5
        totals = np.zeros(3)
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * batch_size:(s + 1) * batch_size])
            img, cls, box = images[idx], target_classes[idx], target_boxes[idx]
            if flips[s]:  # horizontal flip of the whole batch
                img = img[:, :, ::-1]
                cls = cls.reshape(-1, GRID, GRID)[:, :, ::-1].reshape(-1, NUM_CELLS)
                box = box.reshape(-1, GRID, GRID, 4)[:, :, ::-1].reshape(-1, NUM_CELLS, 4)
                box = np.stack([box[..., 0], INPUT_SIZE - box[..., 3], box[..., 2],
                                INPUT_SIZE - box[..., 1]], axis=-1)
            out = step(tf.constant(np.ascontiguousarray(img)),
                       tf.constant(np.ascontiguousarray(cls)),
                       tf.constant(np.ascontiguousarray(box, dtype=np.float32)))
            totals += [float(v) for v in out]
        totals /= steps_per_epoch
        log.info("epoch %d/%d: loss %.4f (focal %.4f, giou %.4f), %.0f s", epoch + 1, epochs,
                 *totals, time.perf_counter() - t0)
    return {k: v.numpy() for k, v in weights.items()}


class ShapeDetector(tf.Module):
    """The exported detector: the weights as constants-in-variables and the OD API signature."""

    def __init__(self, weights: dict[str, np.ndarray]):
        super().__init__(name="shape_detector")
        self.weights = {k: tf.Variable(v, trainable=False, name=k.replace("/", "_"))
                        for k, v in weights.items()}

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve(self, input_tensor):
        """OD API image_tensor signature; see the module docstring for the outputs."""
        images = tf.image.resize(tf.cast(input_tensor, tf.float32), [INPUT_SIZE, INPUT_SIZE],
                                 method="bilinear") / 255.0
        logits, boxes = forward(self.weights, images)
        boxes = tf.clip_by_value(boxes / float(INPUT_SIZE), 0.0, 1.0)
        scores = tf.sigmoid(logits)
        raw_scores = tf.concat([tf.zeros_like(scores[..., :1]), scores], axis=-1)
        nmsed = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores, max_output_size_per_class=MAX_DETECTIONS,
            max_total_size=MAX_DETECTIONS, iou_threshold=NMS_IOU,
            score_threshold=NMS_SCORE_THRESHOLD, pad_per_class=False, clip_boxes=False)
        return {
            "raw_detection_boxes": tf.identity(boxes, name="raw_detection_boxes"),
            "raw_detection_scores": tf.identity(raw_scores, name="raw_detection_scores"),
            "detection_boxes": nmsed.nmsed_boxes,
            "detection_scores": nmsed.nmsed_scores,
            "detection_classes": nmsed.nmsed_classes + 1.0,  # label_offset 1
            "num_detections": tf.cast(nmsed.valid_detections, tf.float32),
        }


def export_saved_model(weights: dict[str, np.ndarray], out: str | Path) -> Path:
    """Saves `ShapeDetector(weights)` to `out` atomically (temporary sibling, then rename)."""
    module = ShapeDetector(weights)
    with atomic.directory(out, overwrite=True) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
        os.chmod(tmp, 0o755)
    return Path(out)


def _iou_yxyx(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of `[n, 4]` and `[m, 4]` yxyx boxes, `[n, m]`."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Equal-width-bin ECE: sum over bins of (bin count / total) x |mean label - mean score|."""
    bins = np.minimum((scores * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(labels[sel].mean() - scores[sel].mean())
    return float(ece)


def evaluate(saved_model: str | Path, *, num_images: int = 400, seed: int = 2026,
             min_score: float = 0.05) -> dict:
    """Measures the exported model on freshly rendered held-out scenes.

    AP numbers come from pycocotools (`tfcal.coco.evaluation.coco_stats`) on the model's own
    post-processed detections. ECE is over
    the post-processed detections with score >= `min_score`, each labelled TP when it matches an
    unmatched same-class ground-truth box at IoU >= 0.5 (greedy by score, per image).

    Returns:
      dict with AP, AP50, AP75, ece, num_scored_detections, tp_rate, mean_score,
      seconds_per_image (signature call only, batch 1).
    """
    model = tf.saved_model.load(str(saved_model))
    fn = model.signatures["serving_default"]
    with tempfile.TemporaryDirectory() as tmp:
        ann_path = shapes.generate_dataset(tmp, num_images=num_images, seed=seed)
        doc = json.loads(ann_path.read_text())
        coco_gt = load_coco(ann_path, Path(tmp) / "images").coco
        results, scored, labels = [], [], []
        fn(input_tensor=tf.zeros([1, 128, 128, 3], tf.uint8))  # warm up
        elapsed = 0.0
        for info in doc["images"]:
            image = tf.io.decode_png(tf.io.read_file(str(Path(tmp) / "images" / info["file_name"])))
            t = time.perf_counter()
            out = fn(input_tensor=image[None])
            elapsed += time.perf_counter() - t
            n = int(out["num_detections"][0])
            h, w = info["height"], info["width"]
            boxes = out["detection_boxes"][0, :n].numpy() * [h, w, h, w]
            det_scores = out["detection_scores"][0, :n].numpy()
            classes = out["detection_classes"][0, :n].numpy().astype(int)
            for box, score, cat in zip(boxes, det_scores, classes):
                results.append({"image_id": info["id"], "category_id": int(cat),
                                "bbox": [float(box[1]), float(box[0]), float(box[3] - box[1]),
                                         float(box[2] - box[0])], "score": float(score)})
            anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[info["id"]]))
            gt = np.array([[a["bbox"][1], a["bbox"][0], a["bbox"][1] + a["bbox"][3],
                            a["bbox"][0] + a["bbox"][2]] for a in anns]).reshape(-1, 4)
            gt_cls = np.array([a["category_id"] for a in anns])
            used = np.zeros(len(anns), bool)
            ious = _iou_yxyx(boxes, gt) if len(anns) else np.zeros((n, 0))
            for d in np.argsort(-det_scores, kind="stable"):
                if det_scores[d] < min_score:
                    continue
                cand = np.where((gt_cls == classes[d]) & ~used & (ious[d] >= 0.5))[0]
                tp = cand.size > 0
                if tp:
                    used[cand[np.argmax(ious[d, cand])]] = True
                scored.append(det_scores[d])
                labels.append(float(tp))
        stats = coco_stats(coco_gt, results)
    scored_a, labels_a = np.array(scored), np.array(labels)
    return {
        "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"],
        "ece": expected_calibration_error(scored_a, labels_a),
        "ece_score_ge_0.3": expected_calibration_error(scored_a[scored_a >= 0.3],
                                                       labels_a[scored_a >= 0.3]),
        "tp_rate_score_ge_0.3": float(labels_a[scored_a >= 0.3].mean()),
        "mean_score_ge_0.3": float(scored_a[scored_a >= 0.3].mean()),
        "num_scored_detections": int(scored_a.size),
        "tp_rate": float(labels_a.mean()), "mean_score": float(scored_a.mean()),
        "seconds_per_image": elapsed / num_images,
    }


def saved_model_size(path: str | Path) -> int:
    """Total bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfcal.demo.train_detector",
        description="Train the demo shape detector, export it in TF OD API form, and evaluate it.")
    parser.add_argument("--out", required=True, help="SavedModel directory to write")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--eval-seed", type=int, default=2026)
    parser.add_argument("--num-eval", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.train_seed == args.eval_seed:
        parser.error("--train-seed and --eval-seed must differ (held-out evaluation)")
    t0 = time.perf_counter()
    weights = train(num_train=args.num_train, epochs=args.epochs, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, train_seed=args.train_seed)
    train_seconds = time.perf_counter() - t0
    out = export_saved_model(weights, args.out)
    params = int(sum(v.size for v in weights.values()))
    metrics = evaluate(out, num_images=args.num_eval, seed=args.eval_seed)
    summary = {"parameters": params, "saved_model_bytes": saved_model_size(out),
               "train_seconds": round(train_seconds, 1), **metrics}
    log.info("summary: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
