"""Builds a small detector SavedModel in TF OD API export form, for the export tests.

The model is made here (no download): a `tf.Module` whose `serving_default` takes the OD API
input of the chosen type and returns what `exporter_main_v2.py` returns for an SSD with a sigmoid
score converter: `raw_detection_boxes` float32 `[B, N, 4]`, `raw_detection_scores` float32
`[B, N, K + 1]` (column 0 = background, always 0), and its own post-processing through a combined
NMS: `detection_boxes` float32 `[B, 10, 4]`, `detection_scores`, `detection_classes` (1-based
float32) `[B, 10]`, `num_detections` float32 `[B]`.

The scores depend on the image (mean colour, weighted by a variable), so different images give
different detections and the variables have to be carried into the export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

NUM_CLASSES = 3  # K
NUM_BOXES = 12  # N
IMAGE_SIZE = 32  # the model resizes to IMAGE_SIZE x IMAGE_SIZE
OWN_MAX_DETECTIONS = 10


def _anchor_boxes(seed: int) -> np.ndarray:
    """float32 `[N, 4]`: four clusters of three overlapping boxes, `[ymin, xmin, ymax, xmax]`."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.25, 0.25], [0.25, 0.7], [0.7, 0.3], [0.7, 0.7]])
    boxes = []
    for cy, cx in centers:
        for _ in range(3):
            jitter = rng.uniform(-0.04, 0.04, size=2)
            h, w = rng.uniform(0.2, 0.3, size=2)
            y, x = cy + jitter[0], cx + jitter[1]
            boxes.append([y - h / 2, x - w / 2, y + h / 2, x + w / 2])
    return np.clip(np.array(boxes, dtype=np.float32), 0.0, 1.0)


class OdApiTestModel(tf.Module):
    """A tiny detector with the OD API `serving_default` contract (see the module docstring)."""

    def __init__(
        self, input_type: str = "image_tensor", batch_size: int | None = None, seed: int = 0,
        per_class_boxes: bool = False,
    ):
        super().__init__()
        self.per_class_boxes = per_class_boxes
        rng = np.random.default_rng(seed)
        self.input_type = input_type
        self.anchors = tf.constant(_anchor_boxes(seed))
        self.logit_bias = tf.Variable(
            rng.normal(0.0, 1.5, size=(NUM_BOXES, NUM_CLASSES)).astype(np.float32)
        )
        self.colour_weight = tf.Variable(
            rng.normal(0.0, 3.0, size=(3, NUM_CLASSES)).astype(np.float32)
        )
        self.box_shift = tf.Variable(np.float32(0.05))
        if input_type in ("image_tensor", "float_image_tensor"):
            dtype = tf.uint8 if input_type == "image_tensor" else tf.float32
            spec = tf.TensorSpec([batch_size, None, None, 3], dtype, name="input_tensor")
        elif input_type in ("encoded_image_string_tensor", "tf_example"):
            spec = tf.TensorSpec([None], tf.string, name="input_tensor")
        else:
            raise ValueError(f"unknown input_type {input_type!r}")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _decode(self, encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return tf.image.resize(tf.cast(image, tf.float32), [IMAGE_SIZE, IMAGE_SIZE])

    def _images(self, x) -> tf.Tensor:
        """float32 `[B, IMAGE_SIZE, IMAGE_SIZE, 3]` in `[0, 255]`."""
        if self.input_type in ("image_tensor", "float_image_tensor"):
            return tf.image.resize(tf.cast(x, tf.float32), [IMAGE_SIZE, IMAGE_SIZE])
        if self.input_type == "tf_example":
            parsed = tf.io.parse_example(x, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
            x = parsed["image/encoded"]
        return tf.map_fn(
            self._decode,
            x,
            fn_output_signature=tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32),
        )

    def _serve(self, x):
        images = self._images(x)
        colour = tf.reduce_mean(images, axis=[1, 2]) / 255.0  # [B, 3]
        logits = (
            self.logit_bias[tf.newaxis]
            + tf.matmul(colour - 0.5, self.colour_weight)[:, tf.newaxis, :]
        )
        batch = tf.shape(images)[0]
        scores = tf.concat(
            [tf.zeros_like(logits[..., :1]), tf.sigmoid(logits)], axis=-1
        )  # [B, N, K+1]
        shift = self.box_shift * (colour[:, :1] - 0.5)  # [B, 1]
        boxes = tf.clip_by_value(self.anchors[tf.newaxis] + shift[:, :, tf.newaxis], 0.0, 1.0)
        boxes = tf.reshape(boxes, [batch, NUM_BOXES, 4])
        if self.per_class_boxes:  # a second stage's refinement per class: [B, N, K, 4]
            nudge = tf.constant([0.0, 0.01, 0.02], tf.float32)[:NUM_CLASSES]
            boxes = tf.clip_by_value(boxes[:, :, tf.newaxis, :] + nudge[:, tf.newaxis], 0.0, 1.0)
        nms_boxes, nms_scores, nms_classes, num = tf.image.combined_non_max_suppression(
            boxes if self.per_class_boxes else boxes[:, :, tf.newaxis, :],
            scores[..., 1:],
            max_output_size_per_class=OWN_MAX_DETECTIONS,
            max_total_size=OWN_MAX_DETECTIONS,
            iou_threshold=0.6,
            score_threshold=1e-8,
        )
        return {
            "raw_detection_boxes": boxes,
            "raw_detection_scores": scores,
            "detection_boxes": nms_boxes,
            "detection_scores": nms_scores,
            "detection_classes": nms_classes + 1.0,
            "num_detections": tf.cast(num, tf.float32),
        }


def build_odapi_test_model(
    path: str | Path,
    input_type: str = "image_tensor",
    *,
    batch_size: int | None = None,
    seed: int = 0,
    per_class_boxes: bool = False,
) -> Path:
    """Saves an `OdApiTestModel` SavedModel to `path` and returns `path` (`per_class_boxes`:
    `raw_detection_boxes` float32 `[B, N, K, 4]`, as Faster R-CNN exports give them)."""
    model = OdApiTestModel(input_type, batch_size, seed, per_class_boxes)
    tf.saved_model.save(
        model, str(path), signatures={"serving_default": model.serve.get_concrete_function()}
    )
    return Path(path)


def sample_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A seeded uint8 `[height, width, 3]` image with a bright rectangle."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = rng.integers(
        0, 256, size=3, dtype=np.uint8
    )
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 `[H, W, 3]` image."""
    return tf.io.encode_png(image).numpy()


def export_job(tmp_path, detector, postprocess_config):
    """A tuned run folder (run/postprocess.json) and a config for `tfcal export`; returns the
    config path."""
    import yaml

    postprocess_config.save(tmp_path / "run" / "postprocess.json")
    cfg = {"model": {"saved_model": str(detector)},
           "data": {"annotations": "unused.json"},
           "output": {"dir": "run"},
           "export": {"dir": "export", "model_name": "det", "verify": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
