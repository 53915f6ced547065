"""Argument checks and weight helpers shared by the tfcal Keras layers."""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np


def float_list(name: str, value, *, allow_scalar: bool = True, lo=None, hi=None,
               positive: bool = False, lengths: tuple[int, ...] | None = None) -> list[float]:
    """Validates a scalar or a list of finite numbers and returns it as a list of floats."""
    if allow_scalar and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        values = [value]
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name}: expected a number or a list of numbers, got {value!r}")
    else:
        try:
            values = np.asarray(value).reshape(-1).tolist()
        except ValueError:
            raise ValueError(f"{name}: expected a flat list of numbers, got {value!r}") from None
    out = []
    for v in values:
        if (not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_))
                or not math.isfinite(v)):
            raise ValueError(f"{name}: expected finite numbers, got {value!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (positive and v <= 0):
            rng = "> 0" if positive else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}: each value must be {rng}, got {value!r}")
        out.append(float(v))
    if lengths is not None and len(out) not in lengths:
        want = " or ".join(str(n) for n in sorted(set(lengths)))
        raise ValueError(f"{name}: expected {want} values, got {len(out)}: {out}")
    return out


def check_num_classes(num_classes) -> int | None:
    """`None` or an int >= 1."""
    if num_classes is None:
        return None
    if (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, (bool, np.bool_))
            or num_classes < 1):
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
