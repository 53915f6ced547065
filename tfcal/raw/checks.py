"""Value checks of raw outputs: shapes and dtypes, NaN/inf, the one box-range check (boxes must
be normalized to [0, 1]), and the score range a config's score converter implies.

Large arrays (memory maps of a cache) are scanned a slice of rows at a time
(`rows_per_slice`), giving each slice's pages back to the kernel after reading it.
"""

from __future__ import annotations

import math

import numpy as np

from tfcal import TfcalError
from tfcal.raw.record import RawOutputs, release_pages
from tfcal.vocabulary import ScoreConverter

#: Boxes this far outside [0, 1] are refused as pixel coordinates; closer ones are clipped
#: with a warning when precomputed outputs are loaded.
BOX_TOLERANCE = 0.1
#: Slack of the probability check (float32 rounding in a detector's sigmoid or softmax).
SCORE_TOLERANCE = 1e-3
_SCAN_BYTES = 1 << 24  # bytes per slice when scanning arrays for NaN/inf or box range


def rows_per_slice(arr: np.ndarray) -> int:
    """Rows of `arr` in about `_SCAN_BYTES`, at least 1."""
    row_bytes = arr.itemsize * math.prod(arr.shape[1:]) if arr.ndim else arr.itemsize
    return max(1, _SCAN_BYTES // max(row_bytes, 1))


def first_non_finite(arr: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN/inf of `arr`, scanned a slice of rows at a time, or None."""
    if arr.ndim == 0:
        return None if np.isfinite(arr) else ()
    step = rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        ok = np.isfinite(arr[start:start + step])
        release_pages(arr)
        if not ok.all():
            bad = np.argwhere(~ok)[0]
            bad[0] += start
            return tuple(int(i) for i in bad)
    return None


def check_finite(name: str, arr: np.ndarray) -> None:
    """ValueError naming `name` and the first NaN/inf of `arr`, if any."""
    bad = first_non_finite(arr)
    if bad is not None:
        raise ValueError(f"{name}: non-finite value {arr[bad]} at {list(bad)}")


def value_range(arr: np.ndarray) -> tuple[float, float]:
    """``(min(arr, 0), max(arr, 1))``, scanned a slice of rows at a time."""
    lo, hi = 0.0, 1.0
    step = rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        part = arr[start:start + step]
        lo = min(lo, float(part.min(initial=0.0)))
        hi = max(hi, float(part.max(initial=1.0)))
        release_pages(arr)
    return lo, hi


def min_max(arr: np.ndarray) -> list[float]:
    """``[min, max]`` of `arr`, scanned a slice of rows at a time ([0, 0] when empty)."""
    if arr.size == 0:
        return [0.0, 0.0]
    lo, hi = math.inf, -math.inf
    step = rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        part = arr[start:start + step]
        if part.size:
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        release_pages(arr)
    return [lo, hi]


def check_box_range(lo: float, hi: float, name: str = "boxes") -> None:
    """Refuses boxes whose values span ``[lo, hi]`` when that reaches further than
    `BOX_TOLERANCE` outside [0, 1] (pixel coordinates, most likely).

    Raises:
      ValueError: ``"<name>: must be normalized [ymin, xmin, ymax, xmax] in [0, 1] (pixel
        coordinates?), got values in [lo, hi]"``.
    """
    if lo < -BOX_TOLERANCE or hi > 1.0 + BOX_TOLERANCE:
        raise ValueError(f"{name}: must be normalized [ymin, xmin, ymax, xmax] in [0, 1] "
                         f"(pixel coordinates?), got values in [{lo:.4g}, {hi:.4g}]")


def check_boxes_normalized(boxes: np.ndarray, name: str = "boxes") -> None:
    """`check_box_range` of the values of a batch of boxes (nothing to check when empty)."""
    if boxes.size:
        check_box_range(float(boxes.min()), float(boxes.max()), name)


def check_arrays(a: dict[str, np.ndarray], num_score_columns: int | None, *,
                 scan_values: bool = True) -> None:
    """Shape (and, with `scan_values`, finiteness) checks shared by the cache and precomputed
    outputs (ValueError).

    Args:
      a: ``image_ids`` int `[I]`, ``boxes`` float `[I, N, 4]` or `[I, N, K, 4]`, ``scores``
        float `[I, N, C]` (arrays, memory maps or `tfcal.raw.npz.NpzStream`s).
      num_score_columns: C expected; None: not checked.
    """
    ids, boxes, scores = a["image_ids"], a["boxes"], a["scores"]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image_ids: must be int [I], got {ids.dtype} {list(ids.shape)}")
    i = ids.shape[0]
    if boxes.ndim not in (3, 4) or boxes.shape[0] != i or boxes.shape[-1] != 4 or (
            boxes.ndim == 4 and boxes.shape[2] < 1):
        raise ValueError(f"boxes: must be [I={i}, N, 4] or per class [I={i}, N, K, 4], got "
                         f"{list(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores: must be [I={i}, N={boxes.shape[1]}, C], got "
                         f"{list(scores.shape)}")
    for name, arr in (("boxes", boxes), ("scores", scores)):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name}: must be float, got {arr.dtype}")
        if scan_values:
            check_finite(name, arr)
    if num_score_columns is not None and scores.shape[2] != num_score_columns:
        raise ValueError(f"scores: expected {num_score_columns} score columns, got "
                         f"{scores.shape[2]}")
    if len(np.unique(ids)) != i:
        raise ValueError("image_ids: repeated ids")


def check_value_ranges(raw: RawOutputs, *, score_converter: ScoreConverter, source: str,
                       boxes_key: str = "boxes", scores_key: str = "scores") -> None:
    """Refuses raw outputs whose values cannot be what the config says they are.

    Boxes must be normalized (`check_box_range`); with `score_converter` ``sigmoid`` or
    ``softmax`` (the detector already converted its scores) the scores must be probabilities
    in [0, 1] (within `SCORE_TOLERANCE`); ``identity`` means logits, any value.

    Args:
      raw: the outputs; their recorded `value_ranges`, else a scan of the arrays.
      score_converter: the config's `model.score_converter`.
      source: the model folder or raw-outputs file, named in the message.
      boxes_key, scores_key: the output names, named in the message.

    Raises:
      TfcalError: one line naming `source`, the output and ``model.score_converter``.
    """
    ranges = raw.value_ranges or {}
    boxes = ranges.get("boxes") or min_max(raw.boxes)
    scores = ranges.get("scores") or min_max(raw.scores)
    if raw.num_images:
        try:
            check_box_range(boxes[0], boxes[1], boxes_key)
        except ValueError as e:
            raise TfcalError(f"{source}: {e}") from None
    if raw.num_images and score_converter in ("sigmoid", "softmax") and (
            scores[0] < -SCORE_TOLERANCE or scores[1] > 1.0 + SCORE_TOLERANCE):
        raise TfcalError(f"{source}: {scores_key}: values in [{scores[0]:.4g}, {scores[1]:.4g}] "
                         f"are not probabilities, but model.score_converter: {score_converter} "
                         f"says the detector already applied its {score_converter}; for logits "
                         f"set model.score_converter: identity")
