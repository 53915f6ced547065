"""A YOLO-layout detector built from the bundled demo detector, for the adapter tests.

`DemoYolo` runs the demo network (`tfcal.demo.train_detector.forward`, weights read from
tfcal/demo/assets/detector) on a letterboxed float32 `[B, 128, 128, 3]` input in `[0, 1]` and
returns what a YOLOv8 export returns: float32 `[B, 4 + K, N]`, rows 0-3 the box centre x, centre
y, width and height normalized to the input, rows 4.. the class probabilities (sigmoid), in the
column order `PERM` (so columns are not category ids minus one: they map by the labels file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcal.demo.data import CATEGORIES
from tfcal.demo.run import DETECTOR_DIR
from tfcal.demo.train_detector import INPUT_SIZE, forward

#: Output column j holds demo class PERM[j] (category id PERM[j] + 1).
PERM = (3, 0, 4, 1, 2)
LABELS = tuple(CATEGORIES[k]["name"] for k in PERM)


class DemoYolo(tf.Module):
    def __init__(self):
        super().__init__()
        loaded = tf.saved_model.load(str(DETECTOR_DIR))
        self.w = {k: tf.Variable(v.numpy(), trainable=False) for k, v in loaded.weights.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32,
                                                name="images")])
    def serve(self, images):
        logits, boxes = forward(self.w, images)  # [B, N, K], [B, N, 4] yxyx input pixels
        probs = tf.gather(tf.sigmoid(logits), list(PERM), axis=-1)
        y0, x0, y1, x1 = tf.unstack(boxes / float(INPUT_SIZE), axis=-1)
        head = tf.concat([tf.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1),
                          probs], -1)  # [B, N, 4 + K]
        return {"output0": tf.transpose(head, [0, 2, 1])}


def build(root: Path) -> dict[str, Path]:
    """Writes the SavedModel, a float TFLite and a uint8-I/O TFLite conversion, and labels."""
    root.mkdir(parents=True, exist_ok=True)
    module = DemoYolo()
    saved = root / "yolo_saved_model"
    tf.saved_model.save(module, str(saved),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    (root / "yolo.tflite").write_bytes(converter.convert())
    rng = np.random.default_rng(0)

    def representative():
        for _ in range(4):
            yield [rng.uniform(0, 1, (1, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.inference_input_type = tf.uint8
    (root / "yolo_uint8_input.tflite").write_bytes(converter.convert())
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"saved_model": saved, "tflite": root / "yolo.tflite",
            "tflite_uint8": root / "yolo_uint8_input.tflite", "labels": root / "labels.txt",
            "module": module}
