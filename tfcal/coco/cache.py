"""Raw detector outputs on disk: the `RawOutputs` record, fingerprints, the cache, and npz loading.

Layout of a raw-outputs npz (both the cache and user-supplied precomputed outputs):

- ``image_ids``: int64 `[I]`, the COCO image id of each row (every dataset image must be
  present; rows for other images are ignored);
- ``boxes``: float32 `[I, N, 4]`, pre-NMS boxes ``[ymin, xmin, ymax, xmax]`` normalized to
  [0, 1];
- ``scores``: float32 `[I, N, C]`, pre-NMS scores in the model's C raw score columns
  (background column included when the model has one), before any score conversion.

A cache file also holds ``fingerprint`` (a 0-d unicode array): the sha256 of the model and the
data it was computed from. A cache is used only when that fingerprint matches and every array
passes the checks below; a stale or corrupt cache is logged and recomputed, never trusted.
Writes are atomic (temporary sibling, then `os.replace`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tfcal import TfcalError, TfcalWarning

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 0.1  # boxes this far outside [0, 1] are clipped with a warning; further: error
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class RawOutputs:
    """Pre-NMS detector outputs for a dataset's images, in the dataset's image order.

    Attributes:
      image_ids: int64 `[I]`.
      boxes: float32 `[I, N, 4]` ``[ymin, xmin, ymax, xmax]`` normalized to [0, 1].
      scores: float32 `[I, N, C]` raw score columns (as the model emits them).
      image_heights: int64 `[I]` pixels. image_widths: int64 `[I]` pixels.
      fingerprint: sha256 hex of model + data (of the npz file for precomputed outputs).
      model_fingerprint: sha256 hex of the SavedModel and keys ('' if not from a model).
      data_fingerprint: sha256 hex of the image list.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    image_heights: np.ndarray
    image_widths: np.ndarray
    fingerprint: str = ""
    model_fingerprint: str = ""
    data_fingerprint: str = ""

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
        """The rows of `image_ids`, in that order."""
        r = self.rows_of(image_ids)
        return dataclasses.replace(self, image_ids=self.image_ids[r], boxes=self.boxes[r],
                                   scores=self.scores[r], image_heights=self.image_heights[r],
                                   image_widths=self.image_widths[r])

    def boxes_xywh(self, boxes: np.ndarray | None = None,
                   rows: np.ndarray | None = None) -> np.ndarray:
        """Normalized ``[ymin, xmin, ymax, xmax]`` boxes to COCO ``[x, y, width, height]`` pixels.

        Args:
          boxes: float `[I, M, 4]` normalized boxes for these images (e.g. after NMS); default
            the raw `boxes`.
          rows: int `[I]` rows of `boxes` within this record (default all, in order).

        Returns:
          float64 `[I, M, 4]`.
        """
        boxes = self.boxes if boxes is None else boxes
        rows = np.arange(self.num_images) if rows is None else np.asarray(rows)
        return normalized_to_coco_xywh(boxes, self.image_heights[rows], self.image_widths[rows])


def normalized_to_coco_xywh(boxes: np.ndarray, heights: np.ndarray,
                            widths: np.ndarray) -> np.ndarray:
    """float `[I, M, 4]` ``[ymin, xmin, ymax, xmax]`` in [0, 1] -> float64 `[I, M, 4]` pixel
    ``[x, y, width, height]`` using each image's int `[I]` `heights` and `widths`."""
    b = np.asarray(boxes, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)[:, None]
    w = np.asarray(widths, dtype=np.float64)[:, None]
    x0, y0 = b[..., 1] * w, b[..., 0] * h
    return np.stack([x0, y0, b[..., 3] * w - x0, b[..., 2] * h - y0], axis=-1)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()


def model_fingerprint(saved_model_dir: str | Path, *, keys: Iterable[str] = ()) -> str:
    """sha256 hex of a SavedModel's files (``saved_model.pb``, ``variables/``, ``assets/``; not
    TF's own ``fingerprint.pb``) and the signature/input/output `keys`."""
    root = Path(saved_model_dir)
    h = hashlib.sha256(b"tfcal-model-v1\0")
    files = [root / "saved_model.pb"]
    for sub in ("variables", "assets"):
        if (root / sub).is_dir():
            files += sorted(p for p in (root / sub).rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        _hash_file(h, p)
    for k in keys:
        h.update(b"key\0" + str(k).encode() + b"\0")
    return h.hexdigest()


def data_fingerprint(dataset, *, content_hash: bool = False) -> str:
    """sha256 hex of the image list: ids, file names, sizes from the JSON, and each file's byte
    size and mtime (or, with `content_hash`, its bytes)."""
    h = hashlib.sha256(b"tfcal-data-v1\0")
    paths = dataset.image_paths or (None,) * dataset.num_images
    for i, name, hh, ww, p in zip(dataset.image_ids, dataset.file_names, dataset.image_heights,
                                  dataset.image_widths, paths):
        h.update(f"{int(i)}\0{name}\0{int(hh)}x{int(ww)}\0".encode())
        if p is not None:
            if content_hash:
                _hash_file(h, p)
            else:
                st = os.stat(p)
                h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def combined_fingerprint(model_fp: str, data_fp: str) -> str:
    return hashlib.sha256(f"{model_fp}\0{data_fp}".encode()).hexdigest()


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    """The cache file for `fingerprint` inside `cache_dir`."""
    return Path(cache_dir) / f"raw_outputs-{fingerprint[:16]}.npz"


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Writes an uncompressed npz atomically (temporary sibling, fsync, `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def save_cache(path: str | Path, raw: RawOutputs) -> Path:
    """Writes `raw` (with its fingerprint) as a cache file, atomically."""
    return save_npz_atomic(path, image_ids=raw.image_ids.astype(np.int64),
                           boxes=raw.boxes.astype(np.float32),
                           scores=raw.scores.astype(np.float32),
                           fingerprint=np.array(raw.fingerprint),
                           model_fingerprint=np.array(raw.model_fingerprint),
                           data_fingerprint=np.array(raw.data_fingerprint))


def _read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads `names` from an npz; raises ValueError (message without the path) when it can't."""
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a readable npz (not a zip archive)")
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise ValueError(f"missing arrays {missing} (has {sorted(z.files)})")
            return {n: z[n] for n in names}
    except ValueError as e:
        if str(e).startswith(("not a readable npz", "missing arrays")):
            raise
        raise ValueError(f"not a readable npz (ValueError: {e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ValueError(f"not a readable npz ({type(e).__name__}: {e})") from None


def _check_arrays(a: dict[str, np.ndarray], num_score_columns: int | None) -> None:
    """Shape and finiteness checks shared by the cache and precomputed outputs (ValueError)."""
    ids, boxes, scores = a["image_ids"], a["boxes"], a["scores"]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image_ids: must be int [I], got {ids.dtype} {list(ids.shape)}")
    i = ids.shape[0]
    if boxes.ndim != 3 or boxes.shape[0] != i or boxes.shape[2] != 4:
        raise ValueError(f"boxes: must be [I={i}, N, 4], got {list(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores: must be [I={i}, N={boxes.shape[1]}, C], got "
                         f"{list(scores.shape)}")
    for name, arr in (("boxes", boxes), ("scores", scores)):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name}: must be float, got {arr.dtype}")
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(f"{name}: non-finite value {arr[tuple(bad)]} at {bad.tolist()}")
    if num_score_columns is not None and scores.shape[2] != num_score_columns:
        raise ValueError(f"scores: expected {num_score_columns} score columns, got "
                         f"{scores.shape[2]}")
    if len(np.unique(ids)) != i:
        raise ValueError("image_ids: repeated ids")


def _select(a: dict[str, np.ndarray], dataset) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the dataset's images in `a` (ValueError naming missing ids), plus extras count."""
    lookup = {int(v): r for r, v in enumerate(a["image_ids"])}
    missing = [int(i) for i in dataset.image_ids if int(i) not in lookup]
    if missing:
        raise ValueError(f"image_ids: {len(missing)} dataset images missing, e.g. {missing[:5]}")
    rows = np.array([lookup[int(i)] for i in dataset.image_ids], dtype=np.int64)
    return rows, len(lookup) - len(rows)


def load_cache(path: str | Path, fingerprint: str, dataset,
               num_score_columns: int | None = None) -> RawOutputs | None:
    """The cached outputs at `path`, or None (logged) when absent, stale or corrupt."""
    path = Path(path)
    if not path.exists():
        logger.info("no raw-output cache at %s", path)
        return None
    try:
        a = _read_npz(path, ("image_ids", "boxes", "scores", "fingerprint", "model_fingerprint",
                             "data_fingerprint"))
        stored = str(a["fingerprint"])
        if stored != fingerprint:
            logger.warning("stale raw-output cache %s (fingerprint %s, expected %s): recomputing",
                           path, stored[:16], fingerprint[:16])
            return None
        _check_arrays(a, num_score_columns)
        if not np.array_equal(a["image_ids"], dataset.image_ids):
            raise ValueError("image_ids: differ from the dataset's")
    except ValueError as e:
        logger.warning("corrupt raw-output cache %s (%s): recomputing", path, e)
        return None
    logger.info("using raw-output cache %s", path)
    return RawOutputs(a["image_ids"].astype(np.int64), a["boxes"].astype(np.float32),
                      a["scores"].astype(np.float32), dataset.image_heights.copy(),
                      dataset.image_widths.copy(), stored, str(a["model_fingerprint"]),
                      str(a["data_fingerprint"]))


def load_raw_outputs(npz_path: str | Path, dataset, *,
                     num_score_columns: int | None = None) -> RawOutputs:
    """Loads precomputed raw outputs (layout in the module docstring) for `dataset`'s images.

    Rows are returned in the dataset's image order; rows for images not in the dataset are
    dropped (logged). Boxes up to `BOX_TOLERANCE` outside [0, 1] are clipped with a
    `TfcalWarning`.

    Args:
      npz_path: the npz file.
      dataset: the `CocoDataset` the outputs belong to.
      num_score_columns: C expected by the category mapping (raw columns, background included).

    Raises:
      TfcalError: one line naming the file and array, for an unreadable file, a missing array,
        wrong shapes or dtypes, NaN/inf values, repeated or missing image ids, a score-column
        count mismatch, or boxes further outside [0, 1] than `BOX_TOLERANCE` (pixel boxes?).
    """
    path = Path(npz_path)
    try:
        a = _read_npz(path, ("image_ids", "boxes", "scores"))
        _check_arrays(a, num_score_columns)
        rows, extra = _select(a, dataset)
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    boxes = a["boxes"][rows].astype(np.float32)
    lo, hi = float(boxes.min(initial=0.0)), float(boxes.max(initial=1.0))
    if lo < -BOX_TOLERANCE or hi > 1.0 + BOX_TOLERANCE:
        raise TfcalError(f"{path}: boxes: must be normalized [ymin, xmin, ymax, xmax] in [0, 1] "
                         f"(pixel coordinates?), got values in [{lo:.4g}, {hi:.4g}]")
    if lo < 0.0 or hi > 1.0:
        warnings.warn(f"{path}: boxes: values in [{lo:.4g}, {hi:.4g}] clipped to [0, 1]",
                      TfcalWarning, stacklevel=2)
        boxes = np.clip(boxes, 0.0, 1.0)
    if extra:
        logger.info("%s: %d rows for images not in %s ignored", path, extra, dataset.path)
    return RawOutputs(dataset.image_ids.copy(), boxes, a["scores"][rows].astype(np.float32),
                      dataset.image_heights.copy(), dataset.image_widths.copy(),
                      fingerprint=file_sha256(path), data_fingerprint=data_fingerprint(dataset))
