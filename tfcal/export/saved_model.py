"""Wraps a detector's raw outputs with the tuned PostProcessor and saves the SavedModel, for
every detector format (OD API, YOLO, Keras) and for post-processing alone.

What to wrap comes from the detector's adapter (`tfcal.detectors`): its `ServingGraph` takes
an OD API input and returns raw boxes and scores, with the adapter's preprocessing and decoding
inside (YOLO and Keras detectors: `tfcal.detectors.base.image_serving_graph`, images in, any of
the four OD API input types). For an OD API export:

A detector exported by the OD API (`exporter_main_v2.py`) has a `serving_default` signature with
one input (`input_tensor`) and, among others, `raw_detection_boxes` (float32 `[batch, N, 4]`,
`[ymin, xmin, ymax, xmax]` normalized) and `raw_detection_scores` (float32
`[batch, N, num_classes + 1]`, column 0 = background). Its own post-processing (`detection_*`
outputs, with a combined NMS) is cut away: the signature is restricted to the raw outputs, its
variables are folded into constants and grappler inlines the nested function calls, so pruning
removes the detector's NMS from the graph that is saved. `count_nms_ops` proves it on the result.

The OD API detector is loaded by `tfcal.detectors.odapi` (`load_serving_graph`), the adapter the
runner uses too; its module docstring lists the input types it detects (`detect_input_type`).

The exported SavedModel has these signatures:

- `serving_default`: the detector's input (same name, dtype, shape) -> `detection_boxes` float32
  `[batch, max_total_detections, 4]`, `detection_scores` float32 `[batch, max_total_detections]`,
  `detection_classes` float32 `[batch, max_total_detections]` (class id = column +
  `label_offset`, as the OD API emits them), `num_detections` float32 `[batch]`; optionally the
  raw outputs under their own names.
- `encoded_image`: `encoded_image` string `[None]` of JPEG/PNG bytes (REST `{"b64": ...}`) -> the
  same detections (not for `tf_example` detectors).
- `postprocess_only`: `raw_detection_boxes` float32 `[None, None, 4]` and `raw_detection_scores`
  float32 `[None, None, C]` -> the same detections.
- `metadata`: `request` string `[B]` (content ignored) -> `postprocess_config` string `[B]`, each
  the JSON also written to `assets/tfcal_postprocess.json` (tuned numbers, config hash,
  provenance). Batch-first so that it also works with TF Serving's batching enabled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import tensorflow as tf

import tfcal
from tfcal import TfcalError
from tfcal import atomic, validation
from tfcal.detectors import open_described
from tfcal.detectors.base import INPUT_TYPES, DetectorInfo, InputType, ServingGraph
from tfcal.detectors.odapi import NMS_OPS, detect_input_type, load_serving_graph
from tfcal.handoff import DetectorDescription
from tfcal.layers import PostProcessor
from tfcal.postprocess import PostProcessConfig

__all__ = ["DETECTION_KEYS", "EXTRA_OUTPUTS", "INPUT_TYPES", "NMS_OPS", "DetectorInfo", "ExportResult",
           "ModelOptions", "ServingGraph", "count_nms_ops", "detect_input_type",
           "export_detector", "load_described", "load_detector", "save_export"]

logger = logging.getLogger(__name__)

EXTRA_OUTPUTS: tuple[str, ...] = ("detection_multiclass_scores", "detection_anchor_indices")
DETECTION_KEYS: tuple[str, ...] = (
    "detection_boxes",
    "detection_scores",
    "detection_classes",
    "num_detections",
)
METADATA_ASSET = "tfcal_postprocess.json"
METADATA_FORMAT = "tfcal.export.metadata/1"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it contains.

    Attributes:
      path: the SavedModel directory.
      signatures: signature keys in the SavedModel.
      metadata: the JSON object behind the `metadata` signature and the assets file.
      detector: the `DetectorInfo`, None for a `postprocess_only` export.
    """

    path: Path
    signatures: tuple[str, ...]
    metadata: dict[str, Any]
    detector: DetectorInfo | None


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What an exported SavedModel holds besides the detections (validated here, once).

    Attributes:
      input_type: the served input type, one of `INPUT_TYPES`; default None: an OD API
        detector's own (detected from its signature input, see `load_detector`), ``image_tensor``
        for YOLO and Keras detectors.
      include_raw_outputs: also return the raw boxes and scores from `serving_default`,
        default False.
      encoded_image_signature: add the `encoded_image` signature (JPEG/PNG strings in), default
        True.
      prune: cut the detector's own post-processing from the graph, default True (see
        `load_detector`).
      raw_scores_columns: for `postprocess_only` models, the raw score columns `C` (>= 1);
        default None: `num_classes + background_column`.
      per_class_boxes: for `postprocess_only` models, raw boxes are `[batch, N, K, 4]`, default
        False.
      extra_outputs: OD API per-detection outputs to add to every detections signature, any of
        `EXTRA_OUTPUTS`, default none: ``detection_multiclass_scores`` float32
        `[batch, max_total_detections, C]`, the detector's raw score row of each detection (the
        OD API's: every class, background included when the model has it, in the detector's
        score space, before calibration); ``detection_anchor_indices`` float32
        `[batch, max_total_detections]`, the index in the raw boxes each detection came from.
        Padding rows are 0, as the OD API pads.
    """

    input_type: InputType | None = None
    include_raw_outputs: bool = False
    encoded_image_signature: bool = True
    prune: bool = True
    raw_scores_columns: int | None = None
    per_class_boxes: bool = False
    extra_outputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.input_type is not None:
            validation.choice("input_type", self.input_type, INPUT_TYPES)
        for name in ("include_raw_outputs", "encoded_image_signature", "prune",
                     "per_class_boxes"):
            validation.boolean(name, getattr(self, name))
        if self.raw_scores_columns is not None:
            validation.integer("raw_scores_columns", self.raw_scores_columns, minimum=1)
        extras = tuple(self.extra_outputs)
        for name in extras:
            validation.choice("extra_outputs", name, EXTRA_OUTPUTS)
        if len(set(extras)) != len(extras):
            raise ValueError(f"extra_outputs: must not repeat a name, got {list(extras)}")
        object.__setattr__(self, "extra_outputs", extras)


def load_detector(
    path: str | os.PathLike,
    *,
    signature_key: str = "serving_default",
    input_type: InputType | None = None,
    raw_boxes_key: str = "raw_detection_boxes",
    raw_scores_key: str = "raw_detection_scores",
    prune: bool = True,
) -> ServingGraph:
    """The `ServingGraph` of an OD API detector SavedModel folder (see
    `tfcal.detectors.odapi.load_serving_graph`, which this calls)."""
    return load_serving_graph(path, signature_key=signature_key, input_type=input_type,
                              raw_boxes_key=raw_boxes_key, raw_scores_key=raw_scores_key,
                              prune=prune)


def load_postprocess_config(config) -> Any:
    """Returns a `PostProcessConfig` from a config object, a `postprocess.json` path or a dict."""
    if isinstance(config, PostProcessConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return PostProcessConfig.load(config)
    if isinstance(config, Mapping):
        return PostProcessConfig.from_dict(config)
    raise TypeError(
        f"postprocess_config must be a PostProcessConfig, path or dict, got {type(config)}"
    )


def config_sha256(config) -> str:
    """SHA-256 of a `PostProcessConfig`'s canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(json.loads(config.to_json()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def build_metadata(config, detector: DetectorInfo | None = None) -> dict[str, Any]:
    """The JSON object served by the `metadata` signature and written to the assets file.

    Keys: `format`, `config_sha256`, `postprocess_config` (every tuned number),
    `provenance` (the config's `metadata`: data fingerprint, target, report summary, ...),
    `detector` (input type, signature, raw keys and shapes), `tfcal_version`,
    `tensorflow_version`.
    """
    cfg_obj = json.loads(config.to_json())
    det = None
    if detector is not None:
        det = {
            "source": detector.path,
            "signature_key": detector.signature_key,
            "input_name": detector.input_name,
            "input_type": detector.input_type,
            "input_dtype": detector.input_dtype,
            "input_shape": list(detector.input_shape),
            "raw_boxes_key": detector.raw_boxes_key,
            "raw_scores_key": detector.raw_scores_key,
            "raw_boxes_shape": list(detector.raw_boxes_shape),
            "raw_scores_shape": list(detector.raw_scores_shape),
            "detector_postprocessing_pruned": detector.pruned,
        }
    return {
        "format": METADATA_FORMAT,
        "config_sha256": config_sha256(config),
        "postprocess_config": cfg_obj,
        "provenance": dict(cfg_obj.get("metadata") or {}),
        "detector": det,
        "tfcal_version": tfcal.__version__,
        "tensorflow_version": tf.__version__,
    }


class _ExportModule(tf.Module):
    """The saved object: the PostProcessor layer (its tuned weights) and the signature functions."""

    def __init__(self, postprocessor, metadata_asset_path: str):
        super().__init__(name="tfcal_export")
        # The layer is kept out of the object graph; its weights are tracked as a plain list
        # (as Keras' own ExportArchive does) once built, so both loaders restore them.
        self._postprocessor = _Untracked(postprocessor)
        self.metadata_asset = tf.saved_model.Asset(metadata_asset_path)

    @property
    def postprocessor(self):
        return self._postprocessor.value


def _tf_variables(layer) -> list[tf.Variable]:
    """The layer's weights as the `tf.Variable`s behind the Keras variables.

    Tracking the Keras variables (or the layer) saves a model that `tf.saved_model.load` restores
    but the TF1 loader (`saved_model_cli run`, TF Serving) does not ("Could not find variable
    ..."); tracking the underlying `tf.Variable`s works for both.
    """
    out = []
    for v in layer.variables:
        value = v if isinstance(v, tf.Variable) else getattr(v, "value", None)
        if not isinstance(value, tf.Variable):
            raise TypeError(
                f"{layer.name}: weight {v.name} is not backed by a tf.Variable: {type(value)}"
            )
        out.append(value)
    return out


class _Untracked:
    """Holds an object without making it a dependency of the enclosing tf.Module."""

    def __init__(self, value):
        self.value = value


def _detections(postprocessor, boxes, scores, extra_outputs=()) -> dict[str, tf.Tensor]:
    """The detections signature outputs: `DETECTION_KEYS`, plus the `extra_outputs` (see
    `ModelOptions`) gathered for the kept boxes by the post-processor."""
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    extras = {}
    if "detection_multiclass_scores" in extra_outputs:
        extras["detection_multiclass_scores"] = scores
    if "detection_anchor_indices" in extra_outputs:
        index = tf.range(tf.shape(scores)[1], dtype=tf.float32)
        extras["detection_anchor_indices"] = tf.broadcast_to(index, tf.shape(scores)[:2])
    out = postprocessor(boxes, scores, extras=extras or None)
    return {key: tf.cast(out[key], tf.float32) for key in (*DETECTION_KEYS, *extras)}


def _build_module(
    config,
    detector: ServingGraph | None,
    *,
    metadata_json: str,
    metadata_asset_path: str,
    options: ModelOptions,
) -> tuple[_ExportModule, dict[str, Any]]:
    include_raw_outputs = options.include_raw_outputs
    extra_outputs = options.extra_outputs
    raw_scores_columns = options.raw_scores_columns
    per_class_boxes = options.per_class_boxes
    post = PostProcessor.from_postprocess_config(config)
    module = _ExportModule(post, metadata_asset_path)
    signatures: dict[str, Any] = {}

    if detector is not None:
        boxes_shape = list(detector.info.raw_boxes_shape)
        scores_shape = list(detector.info.raw_scores_shape)
        if raw_scores_columns is None:
            raw_scores_columns = scores_shape[-1]
        per_class_boxes = len(boxes_shape) == 4
    elif raw_scores_columns is None:
        raw_scores_columns = config.num_classes + (1 if config.background_column else 0)
    # Build the layer eagerly: its weights then exist before any function is traced, so they are
    # plain captured variables that both loaders (object graph and TF1) restore.
    num_classes_boxes = [1, 1, config.num_classes, 4] if per_class_boxes else [1, 1, 4]
    post(tf.zeros(num_classes_boxes, tf.float32), tf.zeros([1, 1, raw_scores_columns], tf.float32))
    module.postprocessor_variables = _tf_variables(post)
    box_rank_shape = [None, None, None, 4] if per_class_boxes else [None, None, 4]
    boxes_spec = tf.TensorSpec(box_rank_shape, tf.float32, name="raw_detection_boxes")
    scores_spec = tf.TensorSpec(
        [None, None, raw_scores_columns], tf.float32, name="raw_detection_scores"
    )

    @tf.function(input_signature=[boxes_spec, scores_spec])
    def postprocess_only(raw_detection_boxes, raw_detection_scores):
        return _detections(module.postprocessor, raw_detection_boxes, raw_detection_scores,
                           extra_outputs)

    module.postprocess_only = postprocess_only

    # Batch-first like every other signature: TF Serving's batching (--enable_batching) splits
    # inputs and outputs along dimension 0, so a scalar-in/scalar-out signature would fail there.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="request")])
    def metadata(request):
        text = tf.constant(metadata_json)
        return {"postprocess_config": tf.fill(tf.shape(request), text)}

    module.metadata = metadata

    if detector is None:
        signatures["serving_default"] = postprocess_only.get_concrete_function()
    else:
        info = detector.info
        raw_fn = detector.raw_fn
        in_spec = tf.TensorSpec(
            info.input_shape, tf.as_dtype(info.input_dtype), name=info.input_name
        )

        @tf.function(input_signature=[in_spec])
        def detector_raw_outputs(x):
            boxes, scores = raw_fn(x)
            return {info.raw_boxes_key: boxes, info.raw_scores_key: scores}

        module.detector_raw_outputs = detector_raw_outputs  # not a signature: for verification
        if not info.pruned and detector.loaded is not None:
            module.detector = detector.loaded  # its variables are captured by the signatures

        def serve_fn(x):
            boxes, scores = raw_fn(x)
            out = _detections(module.postprocessor, boxes, scores, extra_outputs)
            if include_raw_outputs:
                out[info.raw_boxes_key] = tf.identity(boxes)
                out[info.raw_scores_key] = tf.identity(scores)
            return out

        serve = tf.function(serve_fn, input_signature=[in_spec])
        module.serve = serve
        signatures["serving_default"] = serve.get_concrete_function()

        if options.encoded_image_signature and info.input_type != "tf_example":
            enc = _encoded_image_fn(module, info, raw_fn, extra_outputs)
            module.encoded_image = enc
            signatures["encoded_image"] = enc.get_concrete_function()
        elif options.encoded_image_signature:
            logger.info("no encoded_image signature: the detector takes tf.train.Example input")
        signatures["postprocess_only"] = postprocess_only.get_concrete_function()
    signatures["metadata"] = metadata.get_concrete_function()
    return module, signatures


def _encoded_image_fn(module: _ExportModule, info: DetectorInfo, raw_fn, extra_outputs=()):
    """The `encoded_image` signature: string `[None]` of JPEG/PNG bytes -> detections."""
    spec = tf.TensorSpec([None], tf.string, name="encoded_image")
    if info.input_type == "encoded_image_string_tensor":

        @tf.function(input_signature=[spec])
        def encoded_image(images):
            boxes, scores = raw_fn(images)
            return _detections(module.postprocessor, boxes, scores, extra_outputs)

        return encoded_image

    # Image detectors: decode each image and run the detector on it alone. Images in one request
    # may differ in size and OD API exports often fix the batch to 1, so map over the batch.
    box_spec = tf.TensorSpec(info.raw_boxes_shape[1:], tf.float32)
    score_spec = tf.TensorSpec(info.raw_scores_shape[1:], tf.float32)
    image_dtype = tf.as_dtype(info.input_dtype)

    def one(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf.cast(image, image_dtype)[tf.newaxis]
        boxes, scores = raw_fn(image)
        return boxes[0], scores[0]

    @tf.function(input_signature=[spec])
    def encoded_image(images):
        boxes, scores = tf.map_fn(one, images, fn_output_signature=(box_spec, score_spec))
        return _detections(module.postprocessor, boxes, scores, extra_outputs)

    return encoded_image


def save_export(
    output_dir: str | os.PathLike,
    postprocess_config,
    detector: ServingGraph | None = None,
    options: ModelOptions = ModelOptions(),
) -> ExportResult:
    """Writes the SavedModel into `output_dir` (which must exist and be empty; no atomicity here).

    Args: as `export_detector`, with the loaded `detector`; `detector=None` writes a
    `postprocess_only` model whose `serving_default` takes raw boxes and scores.
    """
    config = load_postprocess_config(postprocess_config)
    output_dir = Path(output_dir)
    meta = build_metadata(config, detector.info if detector else None)
    meta_json = json.dumps(meta, indent=2, sort_keys=True)
    # Staged beside the export under a name owned by this process (reclaimed by the next
    # export there if this one is killed, see `atomic.remove_stale`).
    staging = atomic.mkdtemp(output_dir.parent, "tfcal_meta")
    try:
        asset_path = staging / METADATA_ASSET
        asset_path.write_text(meta_json + "\n", encoding="utf-8")
        module, signatures = _build_module(
            config,
            detector,
            metadata_json=meta_json,
            metadata_asset_path=str(asset_path),
            options=options,
        )
        tf.saved_model.save(module, str(output_dir), signatures=signatures)
    finally:
        atomic.remove(staging)
    return ExportResult(
        path=output_dir,
        signatures=tuple(signatures),
        metadata=meta,
        detector=detector.info if detector else None,
    )


def load_described(detector: DetectorDescription, options: ModelOptions) -> ServingGraph:
    """The `ServingGraph` of a `DetectorDescription`, through its adapter
    (`tfcal.detectors.open_described`), with the input type and pruning of `options`."""
    if detector.saved_model is None:
        raise TfcalError("detector.saved_model: needed to export a detector (None exports a "
                         "postprocess_only model)")
    return open_described(detector).serving_graph(input_type=options.input_type,
                                                  prune=options.prune)


def export_detector(
    detector: DetectorDescription | None,
    postprocess_config,
    output_dir: str | os.PathLike,
    options: ModelOptions = ModelOptions(),
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Wraps a detector (through its adapter) with the tuned post-processing and saves it
    atomically.

    Args:
      detector: the detector's `DetectorDescription` (SavedModel, signature, raw output keys);
        None writes a `postprocess_only` model (raw boxes and scores in, detections out).
      postprocess_config: a `PostProcessConfig`, a `postprocess.json` path or its dict.
      output_dir: the new SavedModel directory (written to a temporary sibling, then renamed).
      options: what the SavedModel holds, the `ModelOptions`; default `ModelOptions()`.
      overwrite: replace an existing `output_dir`; otherwise an existing one raises.

    Returns:
      An `ExportResult`.

    Raises:
      TfcalError: bad detector or config. FileExistsError: `output_dir` exists, no `overwrite`.
      TypeError: `detector` is not a `DetectorDescription`.
    """
    if detector is not None and not isinstance(detector, DetectorDescription):
        raise TypeError(f"detector: expected a tfcal.handoff.DetectorDescription or None, got "
                        f"{detector!r} (a SavedModel folder is "
                        f"DetectorDescription(saved_model=...))")
    loaded = None if detector is None else load_described(detector, options)
    with atomic.directory(output_dir, overwrite=overwrite) as tmp:
        result = save_export(tmp, postprocess_config, loaded, options)
    return dataclasses.replace(result, path=Path(output_dir))


def count_nms_ops(
    saved_model_dir: str | os.PathLike, signature_key: str = "serving_default"
) -> dict[str, int]:
    """Counts the NMS ops reachable from a signature's outputs in a saved graph.

    Walks back from the signature's output tensors through node inputs, and into every function
    a reachable node calls (`PartitionedCall`, `StatefulPartitionedCall`, control flow branches,
    any function-valued attr), from each function's return values. Reads `saved_model.pb` only.

    Returns:
      Op type -> count, for the op types in `NMS_OPS` that are reachable (empty when none).
    """
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    meta = sm.meta_graphs[0]
    sig = meta.signature_def[signature_key]
    graph = meta.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    counts: collections.Counter = collections.Counter()
    done_functions: set[str] = set()

    def node_name(ref: str) -> str:
        return ref.lstrip("^").split(":")[0]

    def called(node) -> list[str]:
        names = []
        for attr in node.attr.values():
            if attr.HasField("func"):
                names.append(attr.func.name)
            names.extend(f.name for f in attr.list.func)
        if node.op in functions:  # a function called by its name as the op type
            names.append(node.op)
        return names

    def walk(nodes: Mapping[str, Any], roots: list[str]):
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            name = stack.pop()
            if name in seen or name not in nodes:
                continue
            seen.add(name)
            node = nodes[name]
            if node.op in NMS_OPS:
                counts[node.op] += 1
            for fn_name in called(node):
                walk_function(fn_name)
            stack.extend(node_name(i) for i in node.input)

    def walk_function(fn_name: str):
        if fn_name in done_functions or fn_name not in functions:
            return
        done_functions.add(fn_name)
        fn = functions[fn_name]
        nodes = {n.name: n for n in fn.node_def}
        roots = [node_name(v) for v in fn.ret.values()]
        roots += [node_name(v) for v in fn.control_ret.values()]
        walk(nodes, roots)

    top = {n.name: n for n in graph.node}
    walk(top, [node_name(t.name) for t in sig.outputs.values()])
    return dict(counts)
