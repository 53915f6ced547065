"""The `RawOutputs` record (pre-NMS detector outputs of a data set's images) and the read-only
memory map that holds its arrays when they come from a cache (`ReleasingMemmap`)."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class RawOutputs:
    """Pre-NMS detector outputs for a dataset's images, in the dataset's image order.

    `boxes` and `scores` are read-only memory maps (`ReleasingMemmap`) when they come from the
    cache (see `tfcal.raw`): read them by rows, e.g. ``scores[idx]`` with an int index array,
    which copies only those rows into memory. Never write to them.

    Attributes:
      image_ids: int64 `[I]`.
      boxes: float32 `[I, N, 4]` ``[ymin, xmin, ymax, xmax]`` normalized to [0, 1], or per
        class `[I, N, K, 4]` (box `[i, n, k]` goes with class column `k`, background excluded).
      scores: float32 `[I, N, C]` raw score columns (as the model emits them).
      image_heights: int64 `[I]` pixels. image_widths: int64 `[I]` pixels.
      fingerprint: sha256 hex of model + data (of the npz file for precomputed outputs;
        ``meta_sha256`` for a cache directory given as precomputed outputs).
      model_fingerprint: sha256 hex of the SavedModel and keys ('' if not from a model).
      data_fingerprint: sha256 hex of the image list.
      value_ranges: ``{"boxes": [min, max], "scores": [min, max]}`` when known (recorded in
        the cache as written; see `tfcal.raw.checks.check_value_ranges`), else None.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    image_heights: np.ndarray
    image_widths: np.ndarray
    fingerprint: str = ""
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    value_ranges: dict | None = None

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_score_columns(self) -> int:
        return int(self.scores.shape[-1])

    def rows_of(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 row of each id in `image_ids`; ValueError on an id not held."""
        lookup = {int(i): r for r, i in enumerate(self.image_ids)}
        try:
            return np.array([lookup[int(i)] for i in image_ids], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"image id {e.args[0]} not in the raw outputs") from None

    def subset(self, image_ids: Sequence[int] | np.ndarray) -> "RawOutputs":
        """The rows of `image_ids`, in that order (copied into memory)."""
        r = self.rows_of(image_ids)
        return dataclasses.replace(self, image_ids=self.image_ids[r], boxes=self.boxes[r],
                                   scores=self.scores[r], image_heights=self.image_heights[r],
                                   image_widths=self.image_widths[r])


class ReleasingMemmap(np.memmap):
    """A read-only `np.memmap` that gives its pages back to the kernel after each copying read.

    Reading rows with an index array (``scores[idx]``) or a mask copies them into memory; the
    pages read through the map would then stay mapped, so a pass over a large cache would grow
    the process RSS to the file's size (clean page cache, reclaimable, but counted). After such
    a read, the whole mapping is released with ``madvise(MADV_DONTNEED)``: the pages stay in the
    kernel's page cache, and the next read maps them again without disk I/O. Views (basic
    slices) are themselves `ReleasingMemmap`; reductions over the whole array (``.max()``) map
    all of it, as for any memmap.
    """

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(out, np.memmap) and getattr(out, "_mmap", None) is None:  # a copy
            out = out.view(np.ndarray)
            release_pages(self)
        return out


def release_pages(arr: np.ndarray) -> None:
    """Unmaps the resident pages of `arr`'s memory map (no-op where madvise is unavailable)."""
    mapped = getattr(arr, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED)
