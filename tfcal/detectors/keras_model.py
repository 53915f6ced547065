"""The Keras adapter: a `.keras` model whose outputs are raw boxes and scores, behind the seam.

The model takes float32 images `[B, H, W, 3]` (values in `[0, 255]`, or `[0, 1]` with
`pixel_range: unit`), stretched to `input_size` when given or when the model input has a fixed
size, and returns (a dict, or a list in `model.output_names` order) raw boxes float32
`[B, N, 4]` `[ymin, xmin, ymax, xmax]` normalized to its input (so to the original image, as the
resize only stretches) under `boxes_output`, and raw scores float32 `[B, N, C]` under
`scores_output`. How the scores read (converter, background column, column -> category) is the
model section's usual keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from tfcal import TfcalError
from tfcal.detectors.base import (Detector, ServingGraph, check_outputs, image_serving_graph,
                                  load_keras_model)


class KerasDetector(Detector):
    """A Keras detector (see the module docstring).

    Args:
      description: the `DetectorDescription`: `saved_model` is the ``.keras`` file, `layout`
        holds `boxes_output`, `scores_output`, `input_size` and `pixel_range`.
    """

    def __init__(self, description):
        if description.saved_model is None:
            raise TfcalError("model.path: a Keras detector needs a .keras file")
        self.description = description
        self.path = Path(description.saved_model)
        if not self.path.is_file():
            raise TfcalError(f"{self.path}: no such .keras file")
        self.keys = dict(description.layout)
        self._model = None

    def fingerprint(self) -> str:
        return self.description.fingerprint()

    def _load(self):
        if self._model is not None:
            return self._model
        model = load_keras_model(self.path)
        size = self.keys.get("input_size")
        if size is None and model.inputs:
            static = tuple(model.inputs[0].shape)[1:3]
            size = static if all(v is not None for v in static) else None
        self.input_size = None if size is None else (int(size[0]), int(size[1]))
        self._names = list(getattr(model, "output_names", []) or [])
        self._model = model
        return model

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return True

    @property
    def num_score_columns(self) -> int | None:  # type: ignore[override]
        self._load()
        return None  # known after the first run; the runner checks the outputs then

    def _outputs(self, out):
        b, s = self.keys["boxes_output"], self.keys["scores_output"]
        if isinstance(out, (list, tuple)):
            if len(out) != len(self._names):
                raise TfcalError(f"{self.path}: {len(out)} outputs but output names "
                                 f"{self._names}")
            out = dict(zip(self._names, out))
        if not isinstance(out, Mapping) or b not in out or s not in out:
            have = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise TfcalError(f"{self.path}: outputs {b!r} and {s!r} (model.keras.boxes_output, "
                             f"scores_output) not found (has {have})")
        return out[b], out[s]

    def raw_fn(self, x):
        """tf.function-safe: uint8/float32 images `[B, H, W, 3]` -> `(boxes, scores)`."""
        import tensorflow as tf

        with tf.init_scope():  # load eagerly, even when first called inside a trace
            model = self._load()
        x = tf.cast(x, tf.float32)
        if self.input_size is not None:
            x = tf.image.resize(x, self.input_size, method="bilinear")
        if self.keys.get("pixel_range") == "unit":
            x = x / 255.0
        boxes, scores = self._outputs(model(x, training=False))
        return tf.cast(boxes, tf.float32), tf.cast(scores, tf.float32)

    def __call__(self, images):
        import tensorflow as tf

        batch = tf.stack([tf.convert_to_tensor(im) for im in images])
        boxes, scores = self.raw_fn(batch)
        return check_outputs(str(self.path), boxes.numpy(), scores.numpy(), len(images))

    def serving_graph(self, *, input_type: str | None = None, prune: bool = True
                      ) -> ServingGraph:
        # Loaded eagerly: a Keras model loaded inside a tf.function trace gets other weights.
        self._load()
        d = self.description
        return image_serving_graph(self.raw_fn, path=str(self.path), signature_key="keras",
                                   raw_boxes_key=d.raw_boxes, raw_scores_key=d.raw_scores,
                                   input_type=input_type)
