"""Precomputed raw outputs: reading a user's ``.npz`` (or raw-output folder) for a data set, and
converting it to a raw-output folder (`tfcal convert-raw-outputs`).

Precomputed raw outputs (user-supplied, documented format) are an npz of three arrays:

- ``image_ids``: int64 `[I]`, the COCO image id of each row (every dataset image must be
  present; rows for other images are ignored);
- ``boxes``: float32 `[I, N, 4]`, pre-NMS boxes ``[ymin, xmin, ymax, xmax]`` normalized to
  [0, 1], or per class `[I, N, K, 4]`: a box for each of the K class columns (background
  excluded; Faster R-CNN second stages give these);
- ``scores``: float32 `[I, N, C]`, pre-NMS scores in the model's C raw score columns
  (background column included when the model has one), before any score conversion.

`load_raw_outputs` also accepts a cache directory (`tfcal.raw.cache`) in place of the npz. An
npz is read without loading it whole (`tfcal.raw.npz`): saved uncompressed (`np.savez`) with
float32 rows in the dataset's order, it is memory-mapped at its zip offset; otherwise
(compressed, float64, other rows) it is converted once, batch by batch, into a cache directory
(`_convert_rows`, logged, reused while the npz and the image list are unchanged).
`convert_raw_outputs` does that conversion for a user, and `tfcal.raw.cache.RawOutputsWriter`
writes the cache directory directly from a detector loop: that directory is the streaming
format for user-produced outputs.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from tfcal import TfcalError, TfcalWarning, atomic
from tfcal.raw import checks
from tfcal.raw.cache import (ARRAY_NAMES, RawOutputsWriter, cache_path, load_cache, open_cache,
                             read_meta)
from tfcal.raw.fingerprint import combined_fingerprint, data_fingerprint, file_sha256
from tfcal.raw.npz import NpzStream, open_members
from tfcal.raw.record import RawOutputs, ReleasingMemmap

logger = logging.getLogger(__name__)

_NPZ_NAMES = ("image_ids", "boxes", "scores")
_FLOAT = np.dtype("<f4")


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Writes an uncompressed npz atomically (temporary sibling, fsync, `os.replace`)."""
    return atomic.write_with(path, lambda f: np.savez(f, **arrays))



def _open_npz(path: Path) -> dict[str, np.ndarray | NpzStream]:
    """``image_ids`` in memory; ``boxes`` and ``scores`` memory-mapped (`ReleasingMemmap`)
    when stored uncompressed, else `NpzStream` (see `tfcal.raw.npz`); ValueError."""
    a = open_members(path, _NPZ_NAMES, in_memory=("image_ids",))
    return {n: v.view(ReleasingMemmap) if isinstance(v, np.memmap) else v for n, v in a.items()}


def _direct(a: dict) -> bool:
    """The boxes and scores of `a` are float32 C-order memory maps (usable as they are)."""
    return all(isinstance(a[n], np.memmap) and a[n].dtype == _FLOAT for n in ARRAY_NAMES)


def _row_batches(a: dict, rows: np.ndarray | None):
    """``(boxes, scores)`` batches of about `_SCAN_BYTES` of scores: the rows `rows` of memory
    maps (None: all rows, also from `NpzStream` members), in that order."""
    scores = a["scores"]
    step = checks.rows_per_slice(scores)
    if rows is None and isinstance(scores, NpzStream):
        yield from zip(a["boxes"].batches(step), scores.batches(step))
        return
    if rows is None:
        rows = np.arange(scores.shape[0])
    for start in range(0, len(rows), step):
        r = rows[start:start + step]
        yield a["boxes"][r], scores[r]


def _write_rows(dest: Path, a: dict, rows: np.ndarray | None, *, image_ids, heights, widths,
                fingerprint: str = "", data_fp: str = "") -> RawOutputs:
    """Writes the rows as a cache folder; boxes outside [0, 1] by more than
    `checks.BOX_TOLERANCE` are refused before anything is committed (ValueError)."""
    with RawOutputsWriter(dest, image_ids=image_ids, image_heights=heights,
                          image_widths=widths, fingerprint=fingerprint,
                          data_fingerprint=data_fp) as writer:
        for boxes, scores in _row_batches(a, rows):
            writer.append(boxes, scores)
        checks.check_box_range(*writer.value_ranges["boxes"])
        return writer.commit()


@contextlib.contextmanager
def _made_dirs(path: Path):
    """Removes the folders up to `path` that this block created, if it fails and they are
    empty (bad input leaves no output folder behind)."""
    new = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        new.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for d in new:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _convert_rows(path: Path, a: dict, rows: np.ndarray, dataset, cache_dir: Path,
                 npz_sha: str, num_score_columns: int | None) -> dict[str, np.ndarray]:
    """The dataset's rows of the npz (or raw-output folder) `path` as a cache folder in
    `cache_dir` (written once, streaming; reused while `npz_sha`, the npz's sha256 or the
    folder's ``meta_sha256``, and the image list are unchanged): memory maps."""
    data_fp = data_fingerprint(dataset)
    fp = combined_fingerprint(f"raw_outputs:{npz_sha}", data_fp)
    dest = cache_path(cache_dir, fp)
    with _made_dirs(dest.parent):
        cached = _load_or_convert(path, a, rows, dataset, dest, fp, data_fp, num_score_columns)
    return {"image_ids": cached.image_ids, "boxes": cached.boxes, "scores": cached.scores}


def _load_or_convert(path, a, rows, dataset, dest, fp, data_fp, num_score_columns):
    cached = load_cache(dest, fp, dataset, num_score_columns)
    if cached is None:
        why = ("compressed" if any(isinstance(a[n], NpzStream) for n in ARRAY_NAMES)
               else "not float32 rows in the data set's order")
        logger.info("%s: %s; converting it once, batch by batch, to the raw-output folder %s",
                    path, why, dest)
        sizes = dict(image_ids=dataset.image_ids, heights=dataset.image_heights,
                     widths=dataset.image_widths, fingerprint=fp, data_fp=data_fp)
        identity = np.array_equal(rows, np.arange(a["image_ids"].shape[0]))
        if identity or not isinstance(a["scores"], NpzStream):
            cached = _write_rows(dest, a, None if identity else rows, **sizes)
        else:  # decompress in file order once, then pick the dataset's rows
            n = a["image_ids"].shape[0]
            scratch = dest.with_name(dest.name + ".unordered")
            shutil.rmtree(scratch, ignore_errors=True)  # left by a process killed here
            try:
                full = _write_rows(scratch, a, None, image_ids=a["image_ids"],
                                   heights=np.zeros(n, np.int64), widths=np.zeros(n, np.int64))
                cached = _write_rows(dest, {"boxes": full.boxes, "scores": full.scores}, rows,
                                     **sizes)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return cached


def convert_raw_outputs(npz_path: str | Path, dest: str | Path, *, image_heights=None,
                        image_widths=None, overwrite: bool = False) -> Path:
    """Converts precomputed raw outputs (an ``.npz``, compressed or not) to a raw-output folder
    (the cache format above), reading a batch of rows at a time; atomic.

    The folder keeps the npz's rows in its order and can be given as ``model.raw_outputs``.

    Args:
      npz_path: the npz (``image_ids``, ``boxes``, ``scores`` as in the module docstring).
      dest: the folder to create.
      image_heights, image_widths: int `[I]` pixels, recorded in ``meta.json`` (default 0:
        unknown; `load_raw_outputs` takes the sizes from the dataset).
      overwrite: replace an existing `dest` (default: refuse it).

    Returns:
      `dest`.

    Raises:
      TfcalError: one line naming the file, as `load_raw_outputs`; `dest` exists.
    """
    path = Path(npz_path)
    if Path(dest).exists() and not overwrite:
        raise TfcalError(f"{dest}: already exists (give a new folder)")
    try:
        a = _open_npz(path)
        checks.check_arrays(a, None, scan_values=False)
        n = a["image_ids"].shape[0]
        zeros = np.zeros(n, np.int64)
        _write_rows(Path(dest), a, None, image_ids=a["image_ids"],
                    heights=zeros if image_heights is None else image_heights,
                    widths=zeros if image_widths is None else image_widths,
                    fingerprint=file_sha256(path))
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    return Path(dest)



def _select(a: dict[str, np.ndarray], dataset) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the dataset's images in `a` (ValueError naming missing ids), plus extras count."""
    lookup = {int(v): r for r, v in enumerate(a["image_ids"])}
    missing = [int(i) for i in dataset.image_ids if int(i) not in lookup]
    if missing:
        raise ValueError(f"image_ids: {len(missing)} dataset images missing, e.g. {missing[:5]}")
    rows = np.array([lookup[int(i)] for i in dataset.image_ids], dtype=np.int64)
    return rows, len(lookup) - len(rows)


def load_raw_outputs(npz_path: str | Path, dataset, *, num_score_columns: int | None = None,
                     cache_dir: str | Path | None = None) -> RawOutputs:
    """Loads precomputed raw outputs (layout in the module docstring) for `dataset`'s images.

    Rows are returned in the dataset's image order; rows for images not in the dataset are
    dropped (logged). Boxes up to `checks.BOX_TOLERANCE` outside [0, 1] are clipped with a
    `TfcalWarning`. Memory stays at about a batch of rows for large files:

    - an npz saved uncompressed (`np.savez`) with float32 arrays whose rows are the dataset's
      images in order is memory-mapped at its zip offset, as it is (`tfcal.raw.npz`);
    - any other npz (compressed, float64, other rows or order) is converted once, batch by
      batch, into a raw-output folder in `cache_dir` (logged; reused while the npz and the
      image list are unchanged), which is memory-mapped; without `cache_dir` it is loaded in
      memory;
    - a cache directory is memory-mapped when it holds exactly the dataset's images in order
      (otherwise its dataset rows are converted into `cache_dir` the same way, or copied into
      memory without it); it is validated like the cache, data hashes included (a mismatch
      is refused).

    The npz's sha256 identifies the outputs (`RawOutputs.fingerprint`) whichever way it is read.

    Args:
      npz_path: the npz file, or a cache directory.
      dataset: the `CocoDataset` the outputs belong to.
      num_score_columns: C expected by the category mapping (raw columns, background included).
      cache_dir: where outputs that cannot be mapped as they are get converted (None: in
        memory).

    Raises:
      TfcalError: one line naming the file and array, for an unreadable file, a missing array,
        wrong shapes or dtypes, NaN/inf values, a cache folder whose data bytes changed since
        written, repeated or missing image ids, a score-column
        count mismatch, or boxes further outside [0, 1] than `checks.BOX_TOLERANCE` (pixel
        boxes?).
    """
    path = Path(npz_path)
    try:
        if path.is_dir():
            meta = read_meta(path)
            cached = open_cache(path, meta, num_score_columns)
            a = {"image_ids": cached.image_ids, "boxes": cached.boxes, "scores": cached.scores}
            fingerprint, model_fp = str(meta["meta_sha256"]), cached.model_fingerprint
        else:
            a = _open_npz(path)
            checks.check_arrays(a, num_score_columns, scan_values=False)
            for name in ARRAY_NAMES:
                if isinstance(a[name], np.memmap):
                    checks.check_finite(name, a[name])
            fingerprint, model_fp = file_sha256(path), ""
        rows, extra = _select(a, dataset)
        identity = np.array_equal(rows, np.arange(len(a["image_ids"])))
        if not (identity and _direct(a)):
            if cache_dir is not None:
                a = _convert_rows(path, a, rows, dataset, Path(cache_dir), fingerprint,
                                 num_score_columns)
                identity = True
            else:
                a = {n: v.read() if isinstance(v, NpzStream) else v for n, v in a.items()}
                for name in ARRAY_NAMES:
                    checks.check_finite(name, a[name])
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    boxes, scores = a.pop("boxes"), a.pop("scores")
    if not identity:
        boxes, scores = boxes[rows], scores[rows]  # only the dataset's rows, in its order
    boxes = boxes.astype(np.float32, copy=False)
    scores = scores.astype(np.float32, copy=False)
    lo, hi = checks.value_range(boxes)
    try:
        checks.check_box_range(lo, hi)
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    if lo < 0.0 or hi > 1.0:
        warnings.warn(f"{path}: boxes: values in [{lo:.4g}, {hi:.4g}] clipped to [0, 1]",
                      TfcalWarning, stacklevel=2)
        boxes = np.clip(boxes, 0.0, 1.0)
    if extra:
        logger.info("%s: %d rows for images not in %s ignored", path, extra, dataset.path)
    return RawOutputs(dataset.image_ids.copy(), boxes, scores,
                      dataset.image_heights.copy(), dataset.image_widths.copy(),
                      fingerprint=fingerprint, model_fingerprint=model_fp,
                      data_fingerprint=data_fingerprint(dataset),
                      value_ranges={"boxes": [max(lo, 0.0), min(hi, 1.0)],  # after clipping
                                    "scores": checks.min_max(scores)})


