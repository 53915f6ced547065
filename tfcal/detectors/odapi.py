"""The one loader of TF OD API-style detector SavedModels, shared by the runner and the exporter.

`load_saved_model` restores the SavedModel and `read_signature` finds the signature, its input
and the raw (pre-NMS) box and score outputs, with one set of error messages naming the model
path and the key. What each caller can do with the detector is checked by that caller: the
runner (`tfcal.coco.runner`) runs uint8 `[1|None, None, None, 3]` inputs and `[B, N, 4]`
boxes; the exporter (`tfcal.export.odapi`) wraps any of `INPUT_TYPES` and per-class boxes.

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

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping

from tfcal import TfcalError

InputType = Literal[
    "image_tensor", "float_image_tensor", "encoded_image_string_tensor", "tf_example"
]
INPUT_TYPES: tuple[str, ...] = (
    "image_tensor",
    "float_image_tensor",
    "encoded_image_string_tensor",
    "tf_example",
)
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
