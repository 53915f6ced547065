"""The TF OD API adapter: exported detector SavedModels behind the `Detector` seam.

`load_saved_model` restores the SavedModel and `read_signature` finds the signature, its input
and the raw (pre-NMS) box and score outputs, with one set of error messages naming the model
path and the key. `OdapiDetector` runs any of the four input types for tuning (decoded images
are fed as uint8, float32, PNG bytes, or a `tf.train.Example` with ``image/encoded``), and
its `serving_graph` is what the exporter wraps (`load_serving_graph`: the signature cut down
to its raw outputs, the detector's own NMS pruned away).

Input types (from the signature input's dtype and rank, see `detect_input_type`):

| input type | signature input |
| --- | --- |
| `image_tensor` | uint8 `[1 or None, None, None, 3]` |
| `float_image_tensor` | float32 `[1 or None, None, None, 3]`, values in `[0, 255]` |
| `encoded_image_string_tensor` | string `[None]` of JPEG/PNG bytes |
| `tf_example` | string `[None]` of serialized `tf.train.Example` |

TensorFlow is imported when a model is loaded, so that importing this module stays fast.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tfcal import TfcalError
from tfcal.detectors.base import (INPUT_TYPES, Detector, DetectorInfo, InputType, ServingGraph,
                                  check_outputs)
from tfcal.handoff import DetectorDescription
from tfcal.raw import model_fingerprint

__all__ = ["INPUT_TYPES", "InputType", "NMS_OPS", "OdapiDetector", "Signature",
           "detect_input_type", "load_saved_model", "load_serving_graph", "read_signature"]

logger = logging.getLogger(__name__)

NMS_OPS = frozenset(
    {
        "CombinedNonMaxSuppression",
        "NonMaxSuppression",
        "NonMaxSuppressionV2",
        "NonMaxSuppressionV3",
        "NonMaxSuppressionV4",
        "NonMaxSuppressionV5",
        "NonMaxSuppressionWithOverlaps",
    }
)
POST_NMS_OUTPUTS = frozenset({"detection_masks", "detection_keypoints",
                              "detection_keypoint_scores"})
"""OD API outputs made for the model's own post-NMS detections: refused (see `read_signature`)."""
_PARSE_EXAMPLE_OPS = frozenset({"ParseExample", "ParseExampleV2", "ParseSingleExample"})


@dataclasses.dataclass(frozen=True, eq=False)
class Signature:
    """A detector signature reduced to what tfcal reads from it.

    Attributes:
      path: the SavedModel folder.
      key: the signature key.
      fn: the signature's concrete function (keyword inputs, dict of outputs).
      input_name: the input's key. input_spec: its `tf.TensorSpec`.
      raw_boxes_key, raw_scores_key: the raw outputs' keys.
      raw_boxes_shape, raw_scores_shape: their static `tf.TensorShape`s.
    """

    path: Path
    key: str
    fn: Any
    input_name: str
    input_spec: Any
    raw_boxes_key: str
    raw_scores_key: str
    raw_boxes_shape: Any
    raw_scores_shape: Any

    @property
    def where(self) -> str:
        """``<path>: signature '<key>'``, the start of every message about it."""
        return f"{self.path}: signature {self.key!r}"


def load_saved_model(path: str | Path) -> Any:
    """Restores the SavedModel in `path` (TfcalError naming it when there is none or it fails)."""
    import tensorflow as tf

    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise TfcalError(f"{path}: not a SavedModel folder (no saved_model.pb)")
    try:
        return tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise TfcalError(f"{path}: cannot load SavedModel: {str(e).splitlines()[0]}") from None


def read_signature(model: Any, path: str | Path, *, signature_key: str = "serving_default",
                   raw_boxes_key: str = "raw_detection_boxes",
                   raw_scores_key: str = "raw_detection_scores",
                   input_key: str | None = None) -> Signature:
    """Finds the signature, its input and its raw outputs.

    Args:
      model: the restored SavedModel (`load_saved_model`).
      path: its folder, named in errors.
      signature_key, raw_boxes_key, raw_scores_key: the names to find.
      input_key: the input to use; None: the signature must have exactly one input.

    Raises:
      TfcalError: naming the path and key, for a missing signature, input or output.
    """
    path = Path(path)
    sigs = getattr(model, "signatures", {})
    if signature_key not in sigs:
        raise TfcalError(f"{path}: signature {signature_key!r} not found (has {sorted(sigs)})")
    fn = sigs[signature_key]
    where = f"{path}: signature {signature_key!r}"
    _, inputs = fn.structured_input_signature
    if input_key is None:
        if len(inputs) != 1:
            raise TfcalError(f"{where}: must have one input, got {sorted(inputs)}")
        (input_key,) = inputs
    elif input_key not in inputs:
        raise TfcalError(f"{where}: input {input_key!r} not found (has {sorted(inputs)})")
    outputs = fn.structured_outputs
    for key in (raw_boxes_key, raw_scores_key):
        if key not in outputs:
            raise TfcalError(f"{where}: output {key!r} not found (has {sorted(outputs)})")
    post_nms = sorted(k for k in outputs if k in POST_NMS_OUTPUTS)
    if post_nms:
        raise TfcalError(
            f"{where}: outputs {post_nms} are computed by the model for its own post-NMS "
            f"detections (Mask R-CNN masks, CenterNet keypoints), so they cannot follow the "
            f"detections of tfcal's tuned NMS and would be dropped; export a box-only model "
            f"(exporter_main_v2.py without the mask or keypoint heads) to tune and serve")
    return Signature(path=path, key=signature_key, fn=fn, input_name=input_key,
                     input_spec=inputs[input_key], raw_boxes_key=raw_boxes_key,
                     raw_scores_key=raw_scores_key,
                     raw_boxes_shape=outputs[raw_boxes_key].shape,
                     raw_scores_shape=outputs[raw_scores_key].shape)


def detect_input_type(spec: Any, ops: Mapping[str, int] | None = None) -> str:
    """Returns the OD API input type of a signature input.

    Args:
      spec: the signature's input `tf.TensorSpec`.
      ops: op-type counts of the detector graph (functions included); a string input whose graph
        parses `tf.train.Example`s is `tf_example`, otherwise `encoded_image_string_tensor`.

    Returns:
      One of `INPUT_TYPES`.

    Raises:
      TfcalError: the spec matches none of the OD API input types.
    """
    rank = spec.shape.rank
    dtype = spec.dtype.name
    if dtype == "uint8" and rank == 4:
        return "image_tensor"
    if dtype == "float32" and rank == 4:
        return "float_image_tensor"
    if dtype == "string" and rank == 1:
        if ops and any(ops.get(op, 0) for op in _PARSE_EXAMPLE_OPS):
            return "tf_example"
        return "encoded_image_string_tensor"
    raise TfcalError(
        f"signature input {spec.name!r}: not an OD API input type (uint8/float32 rank 4, "
        f"string rank 1), got {spec.dtype.name} {spec.shape}"
    )


def graph_ops(graph_def) -> collections.Counter:
    """Op-type counts of a GraphDef, its function library included."""
    ops = collections.Counter(n.op for n in graph_def.node)
    for fn in graph_def.library.function:
        ops.update(n.op for n in fn.node_def)
    return ops


def _shape_tuple(shape) -> tuple[int | None, ...]:
    return tuple(shape.as_list()) if shape.rank is not None else ()


def load_serving_graph(
    path: str | Path,
    *,
    signature_key: str = "serving_default",
    input_type: InputType | None = None,
    raw_boxes_key: str = "raw_detection_boxes",
    raw_scores_key: str = "raw_detection_scores",
    prune: bool = True,
    input_key: str | None = None,
) -> ServingGraph:
    """Loads an OD API detector SavedModel and reduces it to its raw outputs, for the exporter.

    Args:
      path: the detector SavedModel directory (`exporter_main_v2.py` output `saved_model/`).
      signature_key: the signature to wrap, default `serving_default`.
      input_type: one of `INPUT_TYPES`; default: detected from the signature input.
      raw_boxes_key: output key of the raw boxes, float32 `[batch, N, 4]` or `[batch, N, K, 4]`.
      raw_scores_key: output key of the raw scores, float32 `[batch, N, C]`.
      prune: fold variables into constants and inline the graph so that everything not needed for
        the raw outputs (the detector's NMS) is pruned away. The folded weights live in the
        GraphDef, which protobuf limits to 2 GB; use `prune=False` for larger detectors (the
        signature is then called whole and the runtime is left to prune it).
      input_key: the signature input; None: the signature's only input.

    Returns:
      A `ServingGraph` whose `reference` runs the unmodified signature.

    Raises:
      TfcalError: missing directory, signature or output key, or an unsupported input.
    """
    import tensorflow as tf

    path = Path(path)
    loaded = load_saved_model(path)
    found = read_signature(loaded, path, signature_key=signature_key, raw_boxes_key=raw_boxes_key,
                           raw_scores_key=raw_scores_key, input_key=input_key)
    sig, input_name, input_spec = found.fn, found.input_name, found.input_spec
    sig_ops = graph_ops(sig.graph.as_graph_def())
    detected = detect_input_type(input_spec, sig_ops)
    if input_type is None:
        input_type = detected
    elif input_type not in INPUT_TYPES:
        raise TfcalError(f"{path}: input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    elif input_type != detected and {input_type, detected} != {
        "tf_example",
        "encoded_image_string_tensor",
    }:
        raise TfcalError(
            f"{path}: input_type {input_type!r} does not match signature input "
            f"{input_spec.dtype.name} {input_spec.shape} ({detected})"
        )
    spec = tf.TensorSpec(input_spec.shape, input_spec.dtype, name=input_name)

    @tf.function
    def raw_only(x):
        out = sig(**{input_name: x})
        return out[raw_boxes_key], out[raw_scores_key]

    concrete = raw_only.get_concrete_function(spec)
    if prune:
        from tensorflow.python.framework import convert_to_constants

        frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)
        graph_def = frozen.graph.as_graph_def()
        raw_fn = _ListToTuple(frozen)
        boxes_shape, scores_shape = (t.shape for t in frozen.outputs)
        nms = sum(count for op, count in graph_ops(graph_def).items() if op in NMS_OPS)
        logger.info("pruned detector graph: %d nodes, %d NMS ops", len(graph_def.node), nms)
        if nms:
            logger.warning("%s: %d NMS ops remain in the pruned detector graph", path, nms)
    else:
        raw_fn = concrete
        boxes_shape, scores_shape = (t.shape for t in concrete.outputs)
        nms = sum(count for op, count in sig_ops.items() if op in NMS_OPS)
    info = DetectorInfo(
        path=str(path),
        signature_key=signature_key,
        input_name=input_name,
        input_type=input_type,
        input_dtype=input_spec.dtype.name,
        input_shape=_shape_tuple(input_spec.shape),
        raw_boxes_key=raw_boxes_key,
        raw_scores_key=raw_scores_key,
        raw_boxes_shape=_shape_tuple(boxes_shape),
        raw_scores_shape=_shape_tuple(scores_shape),
        pruned=prune,
        detector_nms_ops=nms,
    )

    def reference(feed):
        out = loaded.signatures[signature_key](**{k: tf.constant(v) for k, v in feed.items()})
        return {k: out[k].numpy() for k in (raw_boxes_key, raw_scores_key)}

    return ServingGraph(info=info, raw_fn=raw_fn, loaded=loaded, reference=reference)


class _ListToTuple:
    """Calls a frozen concrete function and returns its two outputs as a tuple."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        boxes, scores = self.fn(x)
        return boxes, scores


def encode_example(encoded: bytes) -> bytes:
    """A serialized `tf.train.Example` holding one encoded image (``image/encoded`` and
    ``image/format``), the form OD API `tf_example` exports parse."""
    import tensorflow as tf

    fmt = b"png" if encoded[:4] == b"\x89PNG" else b"jpeg"
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[fmt])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class OdapiDetector(Detector):
    """A TF OD API-style SavedModel behind the `Detector` seam.

    The signature takes one of the four OD API inputs (`INPUT_TYPES`) and returns raw boxes
    float32 `[B, N, 4]` normalized `[ymin, xmin, ymax, xmax]` and raw scores float32
    `[B, N, C]`. For tuning, decoded images are given to the signature as uint8 or float32
    `[B, H, W, 3]`, or re-encoded losslessly as PNG (strings, or `tf.train.Example`s with
    ``image/encoded``), so every input type sees the same pixels.

    Args:
      description: the model's `DetectorDescription` (`saved_model`, `signature`, `input`,
        `raw_boxes`, `raw_scores`, score space).
      num_score_columns: C the category mapping expects (checked on load); None: not checked.
    """

    def __init__(self, description: DetectorDescription, num_score_columns: int | None = None):
        if description.saved_model is None:
            raise TfcalError("model.saved_model: an OD API detector needs a SavedModel folder")
        self.description = description
        self._expected_columns = num_score_columns
        self._path = Path(description.saved_model)
        if not (self._path / "saved_model.pb").is_file():
            raise TfcalError(f"{self._path}: not a SavedModel folder (no saved_model.pb)")
        self._loaded = None

    def fingerprint(self) -> str:
        d = self.description
        return model_fingerprint(self._path, keys=(d.signature, d.input, d.raw_boxes,
                                                   d.raw_scores))

    def _load(self):
        if self._loaded is not None:
            return
        d = self.description
        model = load_saved_model(self._path)
        sig = read_signature(model, self._path, signature_key=d.signature,
                             raw_boxes_key=d.raw_boxes, raw_scores_key=d.raw_scores,
                             input_key=d.input)
        where, spec, shape = sig.where, sig.input_spec, sig.input_spec.shape
        input_type = detect_input_type(spec, graph_ops(sig.fn.graph.as_graph_def()))
        if input_type in ("image_tensor", "float_image_tensor"):
            if shape[3] not in (None, 3):
                raise TfcalError(f"{where}: input {d.input!r} must be [1|None, None, None, 3], "
                                 f"got {spec.dtype.name} {shape}")
        if shape[0] not in (None, 1):
            raise TfcalError(f"{where}: input {d.input!r} batch dimension must be 1 or None, "
                             f"got {shape[0]}")
        b, s = sig.raw_boxes_shape, sig.raw_scores_shape
        if b.rank not in (3, 4) or b[-1] not in (None, 4):
            raise TfcalError(f"{where}: output {d.raw_boxes!r} must be [B, N, 4] or per class "
                             f"[B, N, K, 4], got {b}")
        if s.rank != 3:
            raise TfcalError(f"{where}: output {d.raw_scores!r} must be [B, N, C], got {s}")
        if b[1] is not None and s[1] is not None and b[1] != s[1]:
            raise TfcalError(f"{where}: outputs {d.raw_boxes!r} {b} and {d.raw_scores!r} {s} "
                             f"disagree on N")
        expected = self._expected_columns
        if expected is not None and s[2] is not None and s[2] != expected:
            raise TfcalError(f"{where}: output {d.raw_scores!r} has {s[2]} score columns, "
                             f"expected {expected}")
        self._model, self._fn, self._input_type = model, sig.fn, input_type
        self._batchable = shape[0] is None
        self._columns = s[2]
        self._loaded = True

    @property
    def input_type(self) -> str:
        """The signature's input type, one of `INPUT_TYPES` (loads the model)."""
        self._load()
        return self._input_type

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        self._load()
        return self._batchable

    @property
    def num_score_columns(self) -> int | None:  # type: ignore[override]
        self._load()
        return self._columns

    def feed(self, images: Sequence[np.ndarray]):
        """The signature input for decoded uint8 `[H, W, 3]` images, in its input type."""
        import tensorflow as tf

        self._load()
        if self._input_type in ("image_tensor", "float_image_tensor"):
            batch = tf.stack([tf.convert_to_tensor(im, tf.uint8) for im in images])
            return batch if self._input_type == "image_tensor" else tf.cast(batch, tf.float32)
        encoded = [tf.io.encode_png(tf.convert_to_tensor(im, tf.uint8)).numpy() for im in images]
        if self._input_type == "tf_example":
            encoded = [encode_example(e) for e in encoded]
        return tf.constant(encoded, dtype=tf.string)

    def __call__(self, images):
        d = self.description
        self._load()
        out = self._fn(**{d.input: self.feed(images)})
        b, s = out[d.raw_boxes].numpy(), out[d.raw_scores].numpy()
        return check_outputs(str(self._path), b, s, len(images),
                             what=f"outputs {d.raw_boxes!r} and {d.raw_scores!r}")

    def serving_graph(self, *, input_type: str | None = None, prune: bool = True
                      ) -> ServingGraph:
        d = self.description
        return load_serving_graph(self._path, signature_key=d.signature, input_type=input_type,
                                  raw_boxes_key=d.raw_boxes, raw_scores_key=d.raw_scores,
                                  prune=prune)
