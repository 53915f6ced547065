"""The YOLO adapter: YOLO-style heads (TFLite, SavedModel or Keras) behind the `Detector` seam.

A YOLO head gives, per anchor point, a centre-size box and per-class sigmoid probabilities (no
background column), in one of three layouts:

| layout | raw output | scores |
| --- | --- | --- |
| `boxes_first` | `[B, 4 + K, N]` (YOLOv8 / YOLO11 exports) | the K class columns |
| `boxes_last` | `[B, N, 4 + K]` | the K class columns |
| `objectness` | `[B, N, 5 + K]` (YOLOv5) | objectness x class |

Boxes are `[cx, cy, w, h]`, normalized to the network input (`box_units: normalized`) or in its
pixels (`pixels`). The input is the image letterboxed (`resize: letterbox`: aspect kept, gray
114 borders, Ultralytics' rounding) or stretched (`stretch`) to `input_size`, with values in
`[0, 1]` (`pixel_range: unit`) or `[0, 255]` (`byte`). `decode` undoes all of this: the
adapter returns `[ymin, xmin, ymax, xmax]` normalized to the original image, clipped to
`[0, 1]`. Preprocessing and decoding are the same TF functions for tuning and in the exported
graph, so the served model sees what was tuned.

Ultralytics' letterbox (``LetterBox``, ``auto=False``) and its inverse (``scale_boxes``), for
an `h0 x w0` image and an `h1 x w1` input: ``r = min(h1 / h0, w1 / w0)``; the image is resized
to ``round(h0 r) x round(w0 r)`` (bilinear, on uint8) and padded by
``top = round(dh - 0.1)``, ``left = round(dw - 0.1)`` with ``dh = (h1 - round(h0 r)) / 2``
(likewise dw); boxes map back as ``x0 = (x1 - pad_x) / r`` with
``pad_x = round((w1 - w0 r) / 2 - 0.1)`` (rounding half to even, as Python's `round`).

Backends, from the model path: a ``.tflite`` file runs with `tf.lite.Interpreter` (float or
quantized int8/uint8 input and output, through the tensors' quantization parameters; batch 1;
tuning only, not exportable as a SavedModel); a SavedModel folder runs its signature; a
``.keras`` file is loaded with `keras.saving.load_model`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args

import numpy as np

from tfcal import TfcalError
from tfcal.detectors.base import (Detector, ServingGraph, check_outputs, image_serving_graph,
                                  load_keras_model)
from tfcal.detectors.odapi import load_saved_model

logger = logging.getLogger(__name__)

Layout = Literal["boxes_first", "boxes_last", "objectness"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
BoxUnits = Literal["normalized", "pixels"]
BOX_UNITS: tuple[str, ...] = get_args(BoxUnits)
Resize = Literal["letterbox", "stretch"]
RESIZES: tuple[str, ...] = get_args(Resize)
PixelRange = Literal["unit", "byte"]
PIXEL_RANGES: tuple[str, ...] = get_args(PixelRange)
PAD_VALUE = 114.0  # Ultralytics' letterbox gray

#: Presets: the layout keys of the common exports (explicit keys override them). Ultralytics
#: normalizes boxes to the input in its TFLite exports and gives input pixels otherwise;
#: YOLOv5's TF exports normalize them.
PRESETS: dict[str, dict[str, str]] = {
    "yolov8": {"layout": "boxes_first", "resize": "letterbox", "pixel_range": "unit"},
    "yolo11": {"layout": "boxes_first", "resize": "letterbox", "pixel_range": "unit"},
    "yolov5": {"layout": "objectness", "resize": "letterbox", "pixel_range": "unit",
               "box_units": "normalized"},
}


def backend_of(path: str | Path) -> str:
    """`tflite` for a ``.tflite`` file, `keras` for a ``.keras`` file, `saved_model` for a
    folder (TfcalError otherwise)."""
    path = Path(path)
    if path.suffix == ".tflite":
        return "tflite"
    if path.suffix == ".keras":
        return "keras"
    if path.is_dir():
        return "saved_model"
    raise TfcalError(f"{path}: not a .tflite file, a .keras file or a SavedModel folder")


@dataclasses.dataclass(frozen=True)
class LayoutChoices:
    """The layout keys given for a YOLO model (`model.yolo`); None takes the preset's.

    Attributes:
      preset: {'yolov8', 'yolo11', 'yolov5'} or None.
      layout: {'boxes_first', 'boxes_last', 'objectness'} or None (then `preset` is needed).
      box_units: {'normalized', 'pixels'} or None. resize: {'letterbox', 'stretch'} or None
        (default letterbox). pixel_range: {'unit', 'byte'} or None (default unit).
      input_size: `[height, width]` or None (the model input's).
      output: the output key, when the model has several.
    """

    preset: str | None = None
    layout: Layout | None = None
    box_units: BoxUnits | None = None
    resize: Resize | None = None
    pixel_range: PixelRange | None = None
    input_size: Sequence[int] | None = None
    output: str | None = None


def resolve_layout(path: str | Path, choices: LayoutChoices = LayoutChoices(), *,
                   signature: str = "serving_default") -> dict[str, Any]:
    """The layout keys of a YOLO model: the preset's, overridden by the explicit ones.

    Args:
      path: the model (its backend follows from it, `backend_of`).
      choices: the keys given; None fields come from the preset.
      signature: the SavedModel signature, recorded in the result.

    Returns:
      A JSON-able dict: `backend`, `layout`, `box_units`, `resize`, `pixel_range`,
      `input_size` (`[height, width]` or None: the model input's), `output`, `signature`.

    Raises:
      ValueError: an unknown choice, or no layout given (neither `preset` nor `layout`).
    """
    preset, input_size = choices.preset, choices.input_size
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: must be one of {' | '.join(PRESETS)}, got {preset!r}")
    backend = backend_of(path)
    keys: dict[str, Any] = dict(PRESETS.get(preset, {}))
    if preset in ("yolov8", "yolo11"):
        keys["box_units"] = "normalized" if backend == "tflite" else "pixels"
    given = {"layout": choices.layout, "box_units": choices.box_units,
             "resize": choices.resize, "pixel_range": choices.pixel_range}
    keys.update({k: v for k, v in given.items() if v is not None})
    keys.setdefault("resize", "letterbox")
    keys.setdefault("pixel_range", "unit")
    if "layout" not in keys:
        raise ValueError("layout: give a preset (yolov8, yolo11, yolov5) or a layout "
                         f"({' | '.join(LAYOUTS)})")
    keys.setdefault("box_units", "normalized")
    for name, allowed in (("layout", LAYOUTS), ("box_units", BOX_UNITS), ("resize", RESIZES),
                          ("pixel_range", PIXEL_RANGES)):
        if keys[name] not in allowed:
            raise ValueError(f"{name}: must be one of {' | '.join(allowed)}, got {keys[name]!r}")
    if input_size is not None:
        input_size = [int(v) for v in input_size]
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size: must be [height, width] > 0, got {input_size}")
    return {"backend": backend, **{k: keys[k] for k in ("layout", "box_units", "resize",
                                                        "pixel_range")},
            "input_size": input_size, "output": choices.output, "signature": signature}


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class names, one per line in column order (blank lines at the end ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TfcalError(f"{path}: cannot read labels: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names or not all(names):
        raise TfcalError(f"{path}: labels: need one non-empty class name per line")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TfcalError(f"{path}: labels: names repeat: {dup[:5]}")
    return names


def label_columns(names: Sequence[str], known: Sequence[str], *, on_unknown: str, source: str
                  ) -> dict[int, str]:
    """``{column: name}`` of the labels that name a data set category.

    Args:
      names: the labels file's names, in column order.
      known: the data set's category names.
      on_unknown: ``error``: a label that is no category fails; ``disable``: its column is left
        unused (no category, never emitted), with a warning.
      source: the labels file, named in messages.
    """
    known_set = set(known)
    unknown = [n for n in names if n not in known_set]
    if unknown and on_unknown == "error":
        raise TfcalError(f"{source}: labels: {len(unknown)} names are no category of the data "
                         f"set: {unknown[:5]} (set model.yolo.on_unknown_label: disable to "
                         f"leave their columns unused)")
    if unknown:
        logger.warning("%s: %d labels are no data set category; their columns are unused: %s",
                       source, len(unknown), unknown[:10])
    return {col: n for col, n in enumerate(names) if n in known_set}


# --- the TF functions shared by tuning and the exported graph ---------------------------------

def letterbox_geometry(h0, w0, h1: int, w1: int):
    """Ultralytics' letterbox of an `h0 x w0` image into `h1 x w1` (see the module docstring).

    Args:
      h0, w0: the image size, scalar tensors (any numeric dtype).
      h1, w1: the network input size.

    Returns:
      `(gain, new_h, new_w, top, left, pad_y, pad_x)`: float32 `gain`, int32 resized size and
      image offsets, and float32 inverse offsets `pad_y`, `pad_x` of `scale_boxes`.
    """
    import tensorflow as tf

    h0 = tf.cast(h0, tf.float32)
    w0 = tf.cast(w0, tf.float32)
    gain = tf.minimum(h1 / h0, w1 / w0)
    new_h = tf.round(h0 * gain)
    new_w = tf.round(w0 * gain)
    top = tf.round((h1 - new_h) / 2.0 - 0.1)
    left = tf.round((w1 - new_w) / 2.0 - 0.1)
    pad_y = tf.round((h1 - h0 * gain) / 2.0 - 0.1)
    pad_x = tf.round((w1 - w0 * gain) / 2.0 - 0.1)
    return (gain, tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32), tf.cast(top, tf.int32),
            tf.cast(left, tf.int32), pad_y, pad_x)


def preprocess(images, keys: Mapping[str, Any], input_size: Sequence[int]):
    """Images as the network takes them.

    Args:
      images: uint8 or float32 (values in `[0, 255]`) `[B, H, W, 3]`, one size per batch.
      keys: the layout keys (`resolve_layout`).
      input_size: `[h1, w1]`.

    Returns:
      float32 `[B, h1, w1, 3]`, in `[0, 1]` or `[0, 255]` (`pixel_range`).
    """
    import tensorflow as tf

    h1, w1 = int(input_size[0]), int(input_size[1])
    x = tf.cast(images, tf.float32)
    shape = tf.shape(x)
    if keys["resize"] == "stretch":
        x = tf.image.resize(x, [h1, w1], method="bilinear")
        x = tf.round(tf.clip_by_value(x, 0.0, 255.0))
    else:
        _, new_h, new_w, top, left, _, _ = letterbox_geometry(shape[1], shape[2], h1, w1)
        x = tf.image.resize(x, tf.stack([new_h, new_w]), method="bilinear")
        x = tf.round(tf.clip_by_value(x, 0.0, 255.0))  # cv2.resize on uint8 rounds
        bottom = h1 - new_h - top
        right = w1 - new_w - left
        x = tf.pad(x - PAD_VALUE, [[0, 0], [top, bottom], [left, right], [0, 0]]) + PAD_VALUE
        x = tf.ensure_shape(x, [None, h1, w1, 3])
    if keys["pixel_range"] == "unit":
        x = x / 255.0
    return x


def decode(raw, image_hw, keys: Mapping[str, Any], input_size: Sequence[int]):
    """Raw YOLO outputs as normalized `[ymin, xmin, ymax, xmax]` boxes of the original image.

    Args:
      raw: float32 `[B, 4 + K, N]`, `[B, N, 4 + K]` or `[B, N, 5 + K]` (`layout`).
      image_hw: the original image size `(H, W)` (scalars or a `[2]` tensor).
      keys: the layout keys (`resolve_layout`).
      input_size: `[h1, w1]`.

    Returns:
      `(boxes, scores)`: float32 `[B, N, 4]` clipped to `[0, 1]`, and float32 `[B, N, K]`
      (class probabilities; objectness x class for `objectness`).
    """
    import tensorflow as tf

    h1, w1 = float(input_size[0]), float(input_size[1])
    raw = tf.cast(raw, tf.float32)
    if keys["layout"] == "boxes_first":
        raw = tf.transpose(raw, [0, 2, 1])
    cx, cy, w, h = raw[..., 0], raw[..., 1], raw[..., 2], raw[..., 3]
    if keys["layout"] == "objectness":
        scores = raw[..., 5:] * raw[..., 4:5]
    else:
        scores = raw[..., 4:]
    if keys["box_units"] == "normalized":  # to input pixels
        cx, w = cx * w1, w * w1
        cy, h = cy * h1, h * h1
    x0, x1 = cx - w / 2.0, cx + w / 2.0
    y0, y1 = cy - h / 2.0, cy + h / 2.0
    h0 = tf.cast(image_hw[0], tf.float32)
    w0 = tf.cast(image_hw[1], tf.float32)
    if keys["resize"] == "stretch":
        ys, xs = [y0 / h1, y1 / h1], [x0 / w1, x1 / w1]
    else:
        gain, _, _, _, _, pad_y, pad_x = letterbox_geometry(h0, w0, int(h1), int(w1))
        ys = [(y - pad_y) / gain / h0 for y in (y0, y1)]
        xs = [(x - pad_x) / gain / w0 for x in (x0, x1)]
    boxes = tf.clip_by_value(tf.stack([ys[0], xs[0], ys[1], xs[1]], axis=-1), 0.0, 1.0)
    return boxes, scores


def num_classes_of(shape: Sequence[int | None], layout: str) -> tuple[int | None, int | None]:
    """`(K, N)` of a raw output shape in `layout` (None where unknown)."""
    if layout == "boxes_first":
        rows, n = shape[1], shape[2]
    else:
        n, rows = shape[1], shape[2]
    extra = 5 if layout == "objectness" else 4
    return (None if rows is None else rows - extra), n


# --- backends ------------------------------------------------------------------------------

class _Tflite:
    """A `.tflite` model run with `tf.lite.Interpreter` (batch 1; quantized I/O handled). An
    interpreter is not thread-safe: calls are serialized by a lock, so one detector may be
    shared by threads (e.g. a Beam worker's)."""

    batchable = False

    def __init__(self, path: Path):
        import threading

        import tensorflow as tf

        self.lock = threading.Lock()

        try:
            self.interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise TfcalError(f"{path}: cannot load TFLite model: "
                             f"{str(e).splitlines()[0]}") from None
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise TfcalError(f"{path}: a YOLO TFLite model needs one input and one output, got "
                             f"{len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]
        shape = [int(v) for v in self.input["shape"]]
        if len(shape) != 4 or shape[3] != 3:
            raise TfcalError(f"{path}: TFLite input must be [1, H, W, 3], got {shape}")
        self.input_size = (shape[1], shape[2])
        self.output_shape = tuple(int(v) for v in self.output["shape"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        with self.lock:
            for one in x:
                self.interpreter.set_tensor(self.input["index"],
                                            _quantize(one[None], self.input))
                self.interpreter.invoke()
                out.append(_dequantize(self.interpreter.get_tensor(self.output["index"]),
                                       self.output))
        return np.concatenate(out, axis=0)


def _quantize(x: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """float32 values as the tensor's dtype (``q = round(x / scale) + zero_point``)."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x.astype(np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero if scale else np.round(x)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """A tensor's values as float32 (``x = (q - zero_point) * scale``)."""
    if q.dtype == np.float32:
        return q
    scale, zero = detail["quantization"]
    return ((q.astype(np.float32) - zero) * (scale or 1.0)).astype(np.float32)


class _Graph:
    """A SavedModel signature or a Keras model: a TF callable on float32 `[B, h1, w1, 3]`."""

    batchable = True

    def __init__(self, path: Path, backend: str, keys: Mapping[str, Any]):
        import tensorflow as tf

        self.path = path
        output = keys.get("output")
        if backend == "keras":
            model = load_keras_model(path)
            self.model = model
            shape = tuple(model.inputs[0].shape) if model.inputs else (None, None, None, 3)
            self.input_size = shape[1:3]

            def fn(x):
                out = model(x, training=False)
                return _pick(out, output, path)
        else:
            loaded = load_saved_model(path)
            key = keys.get("signature") or "serving_default"
            if key not in loaded.signatures:
                raise TfcalError(f"{path}: signature {key!r} not found (has "
                                 f"{sorted(loaded.signatures)})")
            sig = loaded.signatures[key]
            _, inputs = sig.structured_input_signature
            if len(inputs) != 1:
                raise TfcalError(f"{path}: signature {key!r}: must have one input, got "
                                 f"{sorted(inputs)}")
            (name, spec), = inputs.items()
            self.model = loaded
            self.input_size = tuple(spec.shape)[1:3]

            def fn(x):
                return _pick(sig(**{name: tf.cast(x, spec.dtype)}), output, path)
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


def _pick(out, output: str | None, path: Path):
    """The one raw output of a model call (a tensor, or a dict/list holding `output`)."""
    if isinstance(out, Mapping):
        if output is None:
            if len(out) != 1:
                raise TfcalError(f"{path}: outputs {sorted(out)}: name one with "
                                 f"model.yolo.output")
            (out,) = out.values()
        elif output not in out:
            raise TfcalError(f"{path}: output {output!r} not found (has {sorted(out)})")
        else:
            out = out[output]
    elif isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise TfcalError(f"{path}: the model returns {len(out)} outputs; a YOLO head has one")
        out = out[0]
    return out


# --- the adapter ---------------------------------------------------------------------------

class YoloDetector(Detector):
    """A YOLO-style detector (see the module docstring) behind the `Detector` seam.

    Args:
      description: the `DetectorDescription`: `saved_model` is the model path (``.tflite``,
        ``.keras`` or a SavedModel folder), `layout` the keys of `resolve_layout`.
    """

    def __init__(self, description):
        if description.saved_model is None:
            raise TfcalError("model.path: a YOLO detector needs a model file or folder")
        self.description = description
        self.path = Path(description.saved_model)
        if not self.path.exists():
            raise TfcalError(f"{self.path}: no such model file or folder")
        self.keys = dict(description.layout)
        self._backend = None

    def fingerprint(self) -> str:
        return self.description.fingerprint()

    def _load(self):
        if self._backend is not None:
            return self._backend
        keys = self.keys
        if keys["backend"] == "tflite":
            backend = _Tflite(self.path)
            out_shape = backend.output_shape
        else:
            backend = _Graph(self.path, keys["backend"], keys)
            out_shape = None
        size = keys.get("input_size") or backend.input_size
        if size is None or len(size) != 2 or any(v is None for v in size):
            raise TfcalError(f"{self.path}: the model input has no fixed size "
                             f"{list(backend.input_size or [])}; set model.yolo.input_size")
        self.input_size = (int(size[0]), int(size[1]))
        if out_shape is None:  # run once on a blank input to learn the output shape
            import tensorflow as tf

            probe = tf.zeros([1, *self.input_size, 3], tf.float32)
            out_shape = tuple(backend(probe).shape)
        if len(out_shape) != 3:
            raise TfcalError(f"{self.path}: the YOLO output must be rank 3 ({keys['layout']}), "
                             f"got {list(out_shape)}")
        k, n = num_classes_of(out_shape, keys["layout"])
        if k is None or k < 1:
            raise TfcalError(f"{self.path}: output {list(out_shape)} has no class columns in "
                             f"layout {keys['layout']}")
        self._k, self._n = k, n
        self.raw_shape = out_shape
        self._backend = backend
        return backend

    @property
    def num_score_columns(self) -> int:  # type: ignore[override]
        self._load()
        return self._k

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return self._load().batchable

    def __call__(self, images):
        import tensorflow as tf

        backend = self._load()
        batch = tf.stack([tf.convert_to_tensor(im) for im in images])
        hw = (int(batch.shape[1]), int(batch.shape[2]))
        x = preprocess(batch, self.keys, self.input_size)
        raw = backend(x.numpy() if isinstance(backend, _Tflite) else x)
        boxes, scores = decode(tf.convert_to_tensor(raw), hw, self.keys, self.input_size)
        return check_outputs(str(self.path), boxes.numpy(), scores.numpy(), len(images))

    def raw_fn(self, x):
        """tf.function-safe: uint8/float32 images `[B, H, W, 3]` -> `(boxes, scores)`."""
        import tensorflow as tf

        with tf.init_scope():  # load eagerly, even when first called inside a trace
            backend = self._load()
        x = tf.convert_to_tensor(x)
        shape = tf.shape(x)
        raw = backend(preprocess(x, self.keys, self.input_size))
        return decode(raw, (shape[1], shape[2]), self.keys, self.input_size)

    def serving_graph(self, *, input_type: str | None = None, prune: bool = True
                      ) -> ServingGraph:
        if isinstance(self._load(), _Tflite):
            return super().serving_graph(input_type=input_type, prune=prune)
        d = self.description
        return image_serving_graph(self.raw_fn, path=str(self.path),
                                   signature_key=f"yolo:{self.keys['backend']}",
                                   raw_boxes_key=d.raw_boxes, raw_scores_key=d.raw_scores,
                                   input_type=input_type)
