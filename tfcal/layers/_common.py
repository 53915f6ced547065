"""Weight and dtype helpers shared by the tfcal Keras layers (checks: `tfcal.validation`)."""

from __future__ import annotations

import keras
import numpy as np

from tfcal import validation


def check_num_classes(num_classes) -> int | None:
    """`None` or an int >= 1."""
    if num_classes is None:
        return None
    if not validation.is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1 or None, got {num_classes!r}")
    return int(num_classes)


def constant_weight(layer: keras.layers.Layer, name: str, value) -> keras.Variable:
    """A non-trainable float32 weight initialised to `value` (its shape is `value`'s)."""
    array = np.asarray(value, dtype=np.float32)
    return layer.add_weight(
        shape=array.shape, dtype="float32", trainable=False, name=name,
        initializer=lambda shape, dtype=None: np.asarray(array, dtype=np.float32).reshape(shape))


def float32_by_default(kwargs: dict) -> dict:
    """Layers compute in float32 whatever the global policy is (casts are explicit)."""
    kwargs.setdefault("dtype", "float32")
    return kwargs
