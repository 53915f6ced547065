"""The detector seam: what every adapter gives the runner (tuning) and the exporter (serving).

A `Detector` is a loaded detector reduced to one contract: decoded RGB images in, normalized raw
(pre-NMS) boxes and per-class raw scores out, with the detector's own preprocessing inside and
its geometry (letterbox, resize) undone. The local runner (`tfcal.coco.runner`) and a Beam
``RunInference`` model handler call it the same way; `open_detector(model_config)`
(`tfcal.detectors`) builds one from the picklable `tfcal.config.ModelConfig`.

For export, `Detector.serving_graph` returns the `ServingGraph` the exporter wraps: a
tf.function-safe callable from an OD API input (`INPUT_TYPES`) to the same raw boxes and
scores, so the served model takes images and returns the OD API detections.

TensorFlow is imported only when a model is loaded or run, so importing this module is fast.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Literal, Sequence

import numpy as np

from tfcal import TfcalError
from tfcal.handoff import DetectorDescription

InputType = Literal[
    "image_tensor", "float_image_tensor", "encoded_image_string_tensor", "tf_example"
]
INPUT_TYPES: tuple[str, ...] = (
    "image_tensor",
    "float_image_tensor",
    "encoded_image_string_tensor",
    "tf_example",
)


@dataclasses.dataclass(frozen=True)
class DetectorInfo:
    """What the exporter wraps of a detector: its serving input and raw outputs.

    Attributes:
      path: the detector's model file or folder.
      signature_key: the signature that was wrapped (adapters without signatures: their format).
      input_name: the serving input's name (OD API: `input_tensor`).
      input_type: one of `INPUT_TYPES`.
      input_dtype: the input's dtype name (`uint8`, `float32`, `string`).
      input_shape: the input's static shape, `None` for unknown dimensions.
      raw_boxes_key: output key of the raw boxes.
      raw_scores_key: output key of the raw scores.
      raw_boxes_shape: static shape of the raw boxes, `[batch, N, 4]` or `[batch, N, K, 4]`.
      raw_scores_shape: static shape of the raw scores, `[batch, N, C]`.
      pruned: True when the detector's own post-processing was cut from the wrapped graph.
      detector_nms_ops: NMS ops reachable from the wrapped detector graph (0 after pruning).
    """

    path: str
    signature_key: str
    input_name: str
    input_type: str
    input_dtype: str
    input_shape: tuple[int | None, ...]
    raw_boxes_key: str
    raw_scores_key: str
    raw_boxes_shape: tuple[int | None, ...]
    raw_scores_shape: tuple[int | None, ...]
    pruned: bool
    detector_nms_ops: int

    @property
    def batch_size(self) -> int | None:
        """The detector's static batch size (`None` = dynamic)."""
        return self.input_shape[0] if self.input_shape else None


@dataclasses.dataclass
class ServingGraph:
    """What the exporter wraps: a detector reduced to its raw outputs, on its serving input.

    Attributes:
      info: the `DetectorInfo`.
      raw_fn: tf.function-safe `raw_fn(x) -> (raw_boxes, raw_scores)` on the serving input `x`
        (`info.input_dtype`, `info.input_shape`); boxes float32 `[B, N, 4]` (or
        `[B, N, K, 4]`) normalized `[ymin, xmin, ymax, xmax]` of the original image, scores
        float32 `[B, N, C]` in the detector's score space.
      loaded: objects whose variables `raw_fn` captures (None when folded into constants);
        the exporter keeps them reachable from the saved module.
      reference: optional `reference(feed) -> {raw_boxes_key: array, raw_scores_key: array}`
        running the original detector on a feed, for verification (None: not available).
    """

    info: DetectorInfo
    raw_fn: Any
    loaded: Any = None
    reference: Any = None


class Detector(abc.ABC):
    """A loaded detector: images in, normalized raw (pre-NMS) boxes and per-class raw scores out.

    Attributes:
      description: the `tfcal.handoff.DetectorDescription` written to detector.json (its
        category ids are filled in by the tuner, which knows the data set).
      num_score_columns: C, raw score columns (background included if any).
      batchable: True when `__call__` takes B > 1 images of equal size in one run.

    Subclasses load lazily: building one reads no weights, so a cache hit never loads the model.
    """

    description: DetectorDescription
    num_score_columns: int
    batchable: bool

    @property
    def source(self) -> str:
        """The model file or folder, named in every message about this detector."""
        return str(self.description.saved_model)

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex of the model files and the layout keys (the raw-output cache key)."""

    @abc.abstractmethod
    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Runs the detector on decoded images.

        Args:
          images: uint8 `[H, W, 3]` RGB each, at their original size (all the same size when
            more than one is given; `batchable` says whether more than one may be given).

        Returns:
          boxes float32 `[B, N, 4]` `[ymin, xmin, ymax, xmax]` normalized to the original image
          (letterbox / resize undone), and scores float32 `[B, N, C]` in the detector's score
          space.

        Raises:
          TfcalError: naming `source`, when the outputs are not of that form.
        """

    def serving_graph(self, *, input_type: str | None = None, prune: bool = True
                      ) -> ServingGraph:
        """What the exporter wraps (images in, raw outputs out), see `ServingGraph`.

        Args:
          input_type: the serving input, one of `INPUT_TYPES`; None: the adapter's default.
          prune: fold variables into constants so the detector's own post-processing is cut.

        Raises:
          TfcalError: the detector cannot be served as a SavedModel (e.g. TFLite: export the
            post-processing alone).
        """
        raise TfcalError(f"{self.source}: this detector cannot be baked into a SavedModel; "
                         f"export the post-processing alone (`tfcal export --postprocess-only`)")


def load_keras_model(path) -> Any:
    """Loads a ``.keras`` model, uncompiled (TfcalError naming `path` when it cannot)."""
    import keras

    try:
        return keras.saving.load_model(str(path), compile=False)
    except (OSError, ValueError, TypeError) as e:
        raise TfcalError(f"{path}: cannot load Keras model: {str(e).splitlines()[0]}") from None


def check_outputs(source: str, boxes: np.ndarray, scores: np.ndarray, batch: int,
                  what: str = "outputs") -> tuple[np.ndarray, np.ndarray]:
    """Checks a detector's decoded outputs: boxes `[batch, N, 4]` (or per class
    `[batch, N, K, 4]`), scores `[batch, N, C]`.

    Returns them as float32 arrays. Raises TfcalError naming `source` otherwise.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim not in (3, 4) or scores.ndim != 3 or boxes.shape[-1] != 4 or \
            boxes.shape[:2] != scores.shape[:2] or boxes.shape[0] != batch:
        raise TfcalError(f"{source}: {what} {list(boxes.shape)} and {list(scores.shape)} must "
                         f"be [{batch}, N, 4] (or [{batch}, N, K, 4]) boxes and [{batch}, N, C] "
                         f"scores")
    return boxes, scores


def image_serving_graph(raw_fn, *, path: str, signature_key: str, raw_boxes_key: str,
                        raw_scores_key: str, input_type: str | None = None) -> ServingGraph:
    """The `ServingGraph` of an adapter whose `raw_fn` runs on decoded images.

    Args:
      raw_fn: tf.function-safe `raw_fn(images) -> (boxes, scores)` on uint8 or float32
        `[B, H, W, 3]` images (values in `[0, 255]`), with the adapter's preprocessing and
        decoding inside.
      path, signature_key, raw_boxes_key, raw_scores_key: what `DetectorInfo` records.
      input_type: the serving input, one of `INPUT_TYPES` (default ``image_tensor``): uint8 or
        float32 `[B, H, W, 3]` images of one size, or string `[B]` of JPEG/PNG bytes
        (``encoded_image_string_tensor``) or of `tf.train.Example`s holding them in
        ``image/encoded`` (``tf_example``), decoded and run one by one (any sizes).

    Returns:
      A `ServingGraph` whose variables are folded into constants, and whose `reference` runs
      `raw_fn` itself.
    """
    import tensorflow as tf
    from tensorflow.python.framework import convert_to_constants

    input_type = input_type or "image_tensor"
    if input_type not in INPUT_TYPES:
        raise TfcalError(f"{path}: input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    image_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="input_tensor")
    frozen = convert_to_constants.convert_variables_to_constants_v2(
        tf.function(raw_fn).get_concrete_function(image_spec))
    boxes_shape, scores_shape = (t.shape for t in frozen.outputs)

    def on_images(x):
        boxes, scores = frozen(tf.cast(x, tf.uint8) if x.dtype != tf.uint8 else x)
        return boxes, scores

    if input_type in ("image_tensor", "float_image_tensor"):
        dtype = tf.uint8 if input_type == "image_tensor" else tf.float32
        spec = tf.TensorSpec([None, None, None, 3], dtype, name="input_tensor")
        if dtype == tf.float32:  # values in [0, 255], as the OD API's float_image_tensor
            def serve(x):
                return on_images(tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8))
        else:
            serve = on_images
    else:
        spec = tf.TensorSpec([None], tf.string, name="input_tensor")
        one_box = tf.TensorSpec(boxes_shape[1:], tf.float32)
        one_score = tf.TensorSpec(scores_shape[1:], tf.float32)

        def one(encoded):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            boxes, scores = on_images(image[tf.newaxis])
            return boxes[0], scores[0]

        def serve(x):
            if input_type == "tf_example":
                x = tf.io.parse_example(
                    x, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"]
            return tf.map_fn(one, x, fn_output_signature=(one_box, one_score))

    def reference(feed):
        """`raw_fn` eagerly on the feed, each string decoded on its own."""
        value = feed["input_tensor"]
        if input_type in ("image_tensor", "float_image_tensor"):
            boxes, scores = raw_fn(tf.constant(value))
            return {raw_boxes_key: boxes.numpy(), raw_scores_key: scores.numpy()}
        outs = []
        for item in value:
            if input_type == "tf_example":
                item = tf.train.Example.FromString(item).features.feature[
                    "image/encoded"].bytes_list.value[0]
            image = tf.io.decode_image(item, channels=3, expand_animations=False)
            outs.append([t.numpy()[0] for t in raw_fn(image[tf.newaxis])])
        return {raw_boxes_key: np.stack([o[0] for o in outs]),
                raw_scores_key: np.stack([o[1] for o in outs])}

    info = DetectorInfo(
        path=str(path), signature_key=signature_key, input_name="input_tensor",
        input_type=input_type, input_dtype=spec.dtype.name, input_shape=tuple(spec.shape),
        raw_boxes_key=raw_boxes_key, raw_scores_key=raw_scores_key,
        raw_boxes_shape=tuple(boxes_shape.as_list()),
        raw_scores_shape=tuple(scores_shape.as_list()), pruned=True, detector_nms_ops=0)
    return ServingGraph(info=info, raw_fn=serve, loaded=None, reference=reference)
