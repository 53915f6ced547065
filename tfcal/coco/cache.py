"""Raw detector outputs on disk: the `RawOutputs` record, fingerprints, the cache, and npz loading.

Precomputed raw outputs (user-supplied, documented format) are an npz of three arrays:

- ``image_ids``: int64 `[I]`, the COCO image id of each row (every dataset image must be
  present; rows for other images are ignored);
- ``boxes``: float32 `[I, N, 4]`, pre-NMS boxes ``[ymin, xmin, ymax, xmax]`` normalized to
  [0, 1], or per class `[I, N, K, 4]`: a box for each of the K class columns (background
  excluded; Faster R-CNN second stages give these);
- ``scores``: float32 `[I, N, C]`, pre-NMS scores in the model's C raw score columns
  (background column included when the model has one), before any score conversion.

`load_raw_outputs` also accepts a cache directory (below) in place of the npz. An npz is read
without loading it whole (`tfcal.coco.npz`): saved uncompressed (`np.savez`) with float32 rows
in the dataset's order, it is memory-mapped at its zip offset; otherwise (compressed, float64,
other rows) it is converted once, batch by batch, into a cache directory (`_convert_rows`,
logged, reused while the npz and the image list are unchanged). `convert_raw_outputs` does
that conversion for a user, and `RawOutputsWriter` writes the cache directory directly from a
detector loop: that directory is the streaming format for user-produced outputs.

The raw-output cache is a directory ``<cache_dir>/raw_outputs-<fingerprint[:16]>/``:

- ``boxes.npy``: float32 `[I, N, 4]` (or `[I, N, K, 4]`) and ``scores.npy``: float32 `[I, N, C]`, the arrays above
  in the dataset's image order (little-endian, C order, plain ``.npy`` files);
- ``meta.json``: ``format`` and ``version``; ``fingerprint`` (sha256 of the model and the data,
  see `combined_fingerprint`), ``model_fingerprint``, ``data_fingerprint``; ``image_ids``,
  ``image_heights``, ``image_widths`` (`[I]` each); ``finite`` (every value was checked for
  NaN/inf when written); ``value_ranges`` (``[min, max]`` of ``boxes`` and of ``scores`` as
  written, for `check_value_ranges`; absent in caches of tfcal before it); per array its ``file``, ``dtype``, ``shape``, ``header_bytes``,
  ``file_bytes`` and the ``sha256`` of its data bytes; and ``meta_sha256``, the sha256 of the
  canonical JSON of all the other keys.

Memory. `RawOutputsWriter` writes detector outputs batch by batch: each batch goes through a
memory map of just its rows (`np.memmap`, unmapped right after), so writing holds one batch,
never `[I, N, C]` (about 6.5 GB for COCO val2017 with 3,549 boxes and 91 columns). The cache
is read with ``np.load(..., mmap_mode="r")``: `RawOutputs.boxes` and `.scores` are then
read-only memory maps (`ReleasingMemmap`), and indexing them with an index array copies only
those rows into memory. Pages read through a map belong to the kernel's file cache but count
in the process RSS while mapped, so after each such copy the map's pages are unmapped again
(``madvise(MADV_DONTNEED)``; they stay cached): reading the whole cache batch by batch keeps
the RSS at about one batch, not the file size.

Atomic writes. The files go to a hidden sibling directory
``.raw_outputs-<fp>.tmp-<host>-<pid>-<random>``, are fsynced, and the directory is renamed into
place; a cache directory therefore exists only when complete. An exception or Ctrl-C removes
the temporary directory; one left by a killed process is never read, and is deleted by the
next writer in the same folder on the same host once that process is gone. The ``.npy`` files
are preallocated, so a full disk fails at the start with `OSError`.

Validation on load. A cache is used only when ``meta.json`` parses and matches
``meta_sha256``, the fingerprint matches, each ``.npy`` header gives the recorded dtype and
shape, each file has exactly the length its header implies (a truncated or extended file is
caught), the shapes agree, the image ids and sizes equal the dataset's, ``finite`` is true,
and the sha256 of each array's data bytes equals the one recorded when it was written (every
batch was checked for NaN/inf then, so equal bytes are finite bytes). The hash catches any
change of the data in place: a flipped bit, an edited value, a NaN. It reads the whole cache
once per load: for a COCO-val-sized cache (5,000 x 3,549 x 91 float32 scores plus boxes,
6.7 GB, in the page cache) hashing took 4.2 s against 1.3 s for one pass of reading it batch
by batch as the tuner does (ratio 3.3, `benchmarks/cache_verify.py`, 2-core machine with
SHA-NI); a tuning run reads the cache several times and spends minutes in the search.
`load_cache` logs a damaged cache and returns None, so the runner rebuilds it;
`load_raw_outputs` refuses a damaged cache folder given as precomputed outputs (there is no
model to rebuild it from). ``verify=False`` skips the hash (the other checks read a few
kilobytes), for tools that know the files are intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import tfcal
from tfcal import TfcalError, TfcalWarning, atomic
from tfcal.coco.npz import NpzStream, open_members

logger = logging.getLogger(__name__)

BOX_TOLERANCE = 0.1  # boxes this far outside [0, 1] are clipped with a warning; further: error
CACHE_FORMAT = "tfcal-raw-outputs"
CACHE_VERSION = 2
META_NAME = "meta.json"
_ARRAY_NAMES = ("boxes", "scores")
_NPZ_NAMES = ("image_ids", "boxes", "scores")
_FLOAT = np.dtype("<f4")
_CHUNK = 1 << 20  # bytes per read when hashing files
_SCAN_BYTES = 1 << 24  # bytes per slice when scanning arrays for NaN/inf or box range


@dataclasses.dataclass(frozen=True, eq=False)
class RawOutputs:
    """Pre-NMS detector outputs for a dataset's images, in the dataset's image order.

    `boxes` and `scores` are read-only memory maps (`ReleasingMemmap`) when they come from the
    cache (see the module docstring): read them by rows, e.g. ``scores[idx]`` with an int index
    array, which copies only those rows into memory. Never write to them.

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
        the cache as written; see `check_value_ranges`), else None.
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

    def boxes_xywh(self, boxes: np.ndarray | None = None,
                   rows: np.ndarray | None = None) -> np.ndarray:
        """Normalized ``[ymin, xmin, ymax, xmax]`` boxes to COCO ``[x, y, width, height]`` pixels.

        Args:
          boxes: float `[I, M, 4]` normalized boxes for these images (e.g. after NMS); default
            the raw `boxes` (all of them, in memory: pass a few rows for a large record).
          rows: int `[I]` rows of `boxes` within this record (default all, in order).

        Returns:
          float64 `[I, M, 4]`.
        """
        boxes = self.boxes if boxes is None else boxes
        rows = np.arange(self.num_images) if rows is None else np.asarray(rows)
        return normalized_to_coco_xywh(boxes, self.image_heights[rows], self.image_widths[rows])


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
            _release_pages(self)
        return out


def _release_pages(arr: np.ndarray) -> None:
    """Unmaps the resident pages of `arr`'s memory map (no-op where madvise is unavailable)."""
    mapped = getattr(arr, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED)


def normalized_to_coco_xywh(boxes: np.ndarray, heights: np.ndarray,
                            widths: np.ndarray) -> np.ndarray:
    """float `[I, M, 4]` ``[ymin, xmin, ymax, xmax]`` in [0, 1] -> float64 `[I, M, 4]` pixel
    ``[x, y, width, height]`` using each image's int `[I]` `heights` and `widths`."""
    b = np.asarray(boxes, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)[:, None]
    w = np.asarray(widths, dtype=np.float64)[:, None]
    x0, y0 = b[..., 1] * w, b[..., 0] * h
    return np.stack([x0, y0, b[..., 3] * w - x0, b[..., 2] * h - y0], axis=-1)


# ----------------------------------------------------------------------------------------------
# Fingerprints


def _hash_file(h, path: Path) -> None:
    buf = bytearray(_CHUNK)  # one buffer, reused: memory stays at _CHUNK
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])


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


# ----------------------------------------------------------------------------------------------
# Writing the cache


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    """The cache directory for `fingerprint` inside `cache_dir`."""
    return Path(cache_dir) / f"raw_outputs-{fingerprint[:16]}"


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """Writes an uncompressed npz atomically (temporary sibling, fsync, `os.replace`)."""
    return atomic.write_with(path, lambda f: np.savez(f, **arrays))


class RawOutputsWriter:
    """Writes raw outputs batch by batch: a cache directory (atomically), or arrays in memory.

    Rows are appended in order. With a `path`, each batch is written through a memory map of
    its own rows and unmapped, so memory stays at one batch; `commit` fsyncs, writes
    ``meta.json`` and renames the temporary directory to `path`, replacing an old cache there.
    Used as a context manager, leaving the block without `commit` (an exception, Ctrl-C)
    removes the temporary directory: no cache appears.

    Example:
      with RawOutputsWriter(path, image_ids=ids, image_heights=h, image_widths=w) as writer:
          for boxes, scores in batches:
              writer.append(boxes, scores)
          raw = writer.commit()

    Args:
      path: the cache directory to create (see `cache_path`); None: keep the arrays in memory
        (`[I, N, C]` float32; for small sets only).
      image_ids: int `[I]`. image_heights, image_widths: int `[I]` pixels.
      fingerprint, model_fingerprint, data_fingerprint: sha256 hex strings, recorded as is.
    """

    def __init__(self, path: str | Path | None, *, image_ids, image_heights, image_widths,
                 fingerprint: str = "", model_fingerprint: str = "",
                 data_fingerprint: str = ""):
        self.path = None if path is None else Path(path)
        self.image_ids = np.asarray(image_ids, dtype=np.int64).copy()
        self.image_heights = np.asarray(image_heights, dtype=np.int64).copy()
        self.image_widths = np.asarray(image_widths, dtype=np.int64).copy()
        n = self.image_ids.shape[0]
        if self.image_ids.ndim != 1 or self.image_heights.shape != (n,) or \
                self.image_widths.shape != (n,):
            raise ValueError(f"image_ids, image_heights, image_widths must be [I], got "
                             f"{list(self.image_ids.shape)}, {list(self.image_heights.shape)}, "
                             f"{list(self.image_widths.shape)}")
        self.fingerprints = {"fingerprint": str(fingerprint),
                             "model_fingerprint": str(model_fingerprint),
                             "data_fingerprint": str(data_fingerprint)}
        self.rows_written = 0
        self._ranges: dict[str, list[float]] = {}
        self._row_shapes: dict[str, tuple[int, ...]] | None = None
        self._memory: dict[str, np.ndarray] = {}
        self._headers: dict[str, int] = {}
        self._hashes: dict = {}
        self._closed = False
        self._tmp: Path | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale(self.path.parent, what="an interrupted cache write")
            self._tmp = atomic.mkdtemp(self.path.parent, self.path.name)

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def value_ranges(self) -> dict[str, list[float]]:
        """``{"boxes": [min, max], "scores": [min, max]}`` of the rows written so far."""
        return self._value_ranges()

    def __enter__(self) -> "RawOutputsWriter":
        return self

    def __exit__(self, *exc) -> bool:
        if not self._closed:
            self.abort()
        return False

    def append(self, boxes: np.ndarray, scores: np.ndarray) -> None:
        """Writes the next rows.

        Args:
          boxes: float `[B, N, 4]`, or per class `[B, N, K, 4]` (a box per class column, as
            Faster R-CNN heads give). scores: float `[B, N, C]`. `N`, `K` and `C` as in the
            first batch; cast to float32.

        Raises:
          ValueError: bad or changed shapes, more rows than images, or NaN/inf values.
        """
        if self._closed:
            raise ValueError("the writer is already committed or aborted")
        b = np.ascontiguousarray(boxes, dtype=_FLOAT)
        s = np.ascontiguousarray(scores, dtype=_FLOAT)
        if b.ndim not in (3, 4) or b.shape[-1] != 4 or s.ndim != 3 or \
                s.shape[:2] != b.shape[:2]:
            raise ValueError(f"boxes {list(b.shape)} and scores {list(s.shape)} must be "
                             f"[B, N, 4] (or per class [B, N, K, 4]) and [B, N, C]")
        if self._row_shapes is None:
            self._start(b.shape[1:], s.shape[1:])
        elif (b.shape[1:], s.shape[1:]) != (self._row_shapes["boxes"],
                                            self._row_shapes["scores"]):
            raise ValueError(f"boxes {list(b.shape)} and scores {list(s.shape)}: rows must be "
                             f"{list(self._row_shapes['boxes'])} and "
                             f"{list(self._row_shapes['scores'])} as in the first batch")
        start, k = self.rows_written, b.shape[0]
        if start + k > self.num_images:
            raise ValueError(f"{start + k} rows written for {self.num_images} images")
        for name, arr in (("boxes", b), ("scores", s)):
            bad = _first_non_finite(arr)
            if bad is not None:
                raise ValueError(f"{name}: non-finite value {arr[bad]} at "
                                 f"{[start + bad[0], *bad[1:]]}")
        for name, arr in (("boxes", b), ("scores", s)):
            if arr.size:
                lo, hi = float(arr.min()), float(arr.max())
                r = self._ranges.setdefault(name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            self._write(name, start, arr)
        self.rows_written = start + k

    def _start(self, box_shape: tuple[int, ...], score_shape: tuple[int, ...]) -> None:
        self._row_shapes = {"boxes": tuple(box_shape), "scores": tuple(score_shape)}
        n = self.num_images
        for name, row_shape in self._row_shapes.items():
            shape = (n,) + row_shape
            if self._tmp is None:
                self._memory[name] = np.empty(shape, _FLOAT)
                continue
            self._hashes[name] = hashlib.sha256()
            file = self._tmp / f"{name}.npy"
            mm = np.lib.format.open_memmap(file, mode="w+", dtype=_FLOAT, shape=shape)
            self._headers[name] = int(mm.offset)
            del mm  # nothing was touched: the header is on disk, the rest is a hole
            _preallocate(file, self._headers[name] + math.prod(shape) * _FLOAT.itemsize)

    def _write(self, name: str, start: int, arr: np.ndarray) -> None:
        if self._tmp is None:
            self._memory[name][start:start + arr.shape[0]] = arr
            return
        self._hashes[name].update(arr)  # rows arrive in order: this is the file's data hash
        if arr.size == 0:
            return
        row_bytes = arr.nbytes // arr.shape[0]
        mm = np.memmap(self._tmp / f"{name}.npy", dtype=_FLOAT, mode="r+",
                       offset=self._headers[name] + start * row_bytes, shape=arr.shape)
        mm[...] = arr
        del mm  # unmapped: the pages leave this process; the kernel writes them back

    def commit(self) -> RawOutputs:
        """Finishes the cache (or the in-memory arrays) and returns it as `RawOutputs`.

        Raises:
          ValueError: fewer rows than images were written.
          OSError: the directory could not be written or renamed.
        """
        if self._closed:
            raise ValueError("the writer is already committed or aborted")
        if self.rows_written != self.num_images:
            raise ValueError(f"{self.rows_written} of {self.num_images} rows written")
        if self._row_shapes is None:  # no images
            self._start((0, 4), (0, 0))
        if self._tmp is None:
            self._closed = True
            return RawOutputs(self.image_ids, self._memory["boxes"], self._memory["scores"],
                              self.image_heights, self.image_widths, **self.fingerprints,
                              value_ranges=self._value_ranges())
        meta = self._meta()
        for name in _ARRAY_NAMES:
            _fsync_file(self._tmp / f"{name}.npy")
        with open(self._tmp / META_NAME, "w", encoding="utf-8") as f:
            f.write(_meta_text(meta))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self._tmp)
        atomic.replace_directory(self._tmp, self.path)
        self._closed = True
        _fsync_dir(self.path.parent)
        legacy = self.path.with_name(self.path.name + ".npz")  # the single-file format before v2
        if legacy.is_file():
            legacy.unlink()
            logger.info("removed the old-format raw-output cache %s", legacy)
        return _open_cache(self.path, meta, verify=False)  # just written and hashed

    def abort(self) -> None:
        """Drops what was written (removes the temporary directory)."""
        self._closed = True
        self._memory = {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _value_ranges(self) -> dict:
        return {n: list(self._ranges.get(n, [0.0, 0.0])) for n in _ARRAY_NAMES}

    def _meta(self) -> dict:
        arrays = {}
        for name, row_shape in self._row_shapes.items():
            shape = [self.num_images, *row_shape]
            header = self._headers[name]
            arrays[name] = {"file": f"{name}.npy", "dtype": _FLOAT.str, "shape": shape,
                            "header_bytes": header,
                            "file_bytes": header + math.prod(shape) * _FLOAT.itemsize,
                            "sha256": self._hashes[name].hexdigest()}
        body = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                "tfcal_version": tfcal.__version__, **self.fingerprints,
                "num_images": self.num_images, "finite": True, "arrays": arrays,
                "value_ranges": self._value_ranges(),
                "image_ids": self.image_ids.tolist(),
                "image_heights": self.image_heights.tolist(),
                "image_widths": self.image_widths.tolist()}
        return {**body, "meta_sha256": _meta_checksum(body)}


def save_cache(path: str | Path, raw: RawOutputs) -> Path:
    """Writes `raw` (with its fingerprints) as a cache directory at `path`, atomically."""
    with RawOutputsWriter(path, image_ids=raw.image_ids, image_heights=raw.image_heights,
                          image_widths=raw.image_widths, fingerprint=raw.fingerprint,
                          model_fingerprint=raw.model_fingerprint,
                          data_fingerprint=raw.data_fingerprint) as writer:
        step = _rows_per_slice(raw.scores)
        for start in range(0, raw.num_images, step):
            writer.append(raw.boxes[start:start + step], raw.scores[start:start + step])
        writer.commit()
    return Path(path)


def _meta_checksum(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _meta_text(meta: dict) -> str:
    """One key per line (values compact), so the small fields are easy to read."""
    lines = (f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in meta.items())
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _preallocate(path: Path, size: int) -> None:
    """Reserves the file's blocks, so a full disk fails here with OSError, not with a SIGBUS
    while writing through the memory map."""
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):  # not supported here
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Best effort: directories can be fsynced on POSIX only."""
    if os.name == "posix":
        with contextlib.suppress(OSError):
            _fsync_file(path)


# ----------------------------------------------------------------------------------------------
# Reading the cache


def _read_meta(path: Path) -> dict:
    """``meta.json`` of the cache directory `path`, checksum and format checked (ValueError)."""
    if not path.is_dir():
        raise ValueError("not a cache directory")
    try:
        text = (path / META_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{META_NAME}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{META_NAME}: unreadable ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{META_NAME}: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{META_NAME}: must be an object, got {type(meta).__name__}")
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    if meta.get("meta_sha256") != _meta_checksum(body):
        raise ValueError(f"{META_NAME}: meta_sha256 does not match the content (edited or "
                         "damaged)")
    if (meta.get("format"), meta.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
        raise ValueError(f"{META_NAME}: format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}, expected {CACHE_FORMAT!r} version "
                         f"{CACHE_VERSION}")
    return meta


def _open_npy(path: Path, name: str, rec: dict) -> np.ndarray:
    """Checks one ``.npy`` against its `meta.json` record and memory-maps it (read-only)."""
    file = path / f"{name}.npy"
    if rec.get("file") != file.name:
        raise ValueError(f"{META_NAME}: arrays.{name}.file: expected {file.name!r}, got "
                         f"{rec.get('file')!r}")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            header = f.tell()
    except FileNotFoundError:
        raise ValueError(f"{file.name}: missing") from None
    except OSError as e:
        raise ValueError(f"{file.name}: unreadable ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{file.name}: bad .npy header ({e})") from None
    if (dtype.str, list(shape), bool(fortran), header) != \
            (rec["dtype"], list(rec["shape"]), False, rec["header_bytes"]):
        raise ValueError(f"{file.name}: header says {dtype.str} {list(shape)} (fortran_order "
                         f"{fortran}, {header} header bytes), {META_NAME} says {rec['dtype']} "
                         f"{rec['shape']} ({rec['header_bytes']} header bytes)")
    expected = header + math.prod(shape) * dtype.itemsize
    if size != expected or size != rec["file_bytes"]:
        raise ValueError(f"{file.name}: {size} bytes, expected {expected} for {list(shape)} "
                         f"(truncated or overwritten)")
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False).view(ReleasingMemmap)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file.name}: cannot map ({type(e).__name__}: {e})") from None


def verify_data(path: str | Path, name: str, rec: dict) -> None:
    """Rehashes the data bytes of the array `name` of the cache `path` against `rec["sha256"]`
    (its `meta.json` record); ValueError naming the file when they differ."""
    h = hashlib.sha256()
    with open(Path(path) / f"{name}.npy", "rb", buffering=0) as f:
        f.seek(rec["header_bytes"])
        buf = bytearray(_SCAN_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    if h.hexdigest() != rec["sha256"]:
        raise ValueError(f"{name}.npy: data bytes changed since written (sha256 "
                         f"{h.hexdigest()[:16]}..., {META_NAME} arrays.{name}.sha256 "
                         f"{str(rec['sha256'])[:16]}...)")


def _open_cache(path: Path, meta: dict, num_score_columns: int | None = None, *,
                verify: bool = True) -> RawOutputs:
    """The cache directory `path` described by `meta` as `RawOutputs` (ValueError if corrupt)."""
    try:
        if meta["finite"] is not True:
            raise ValueError(f"{META_NAME}: finite: must be true, got {meta['finite']!r}")
        ids = np.array(meta["image_ids"], dtype=np.int64)
        heights = np.array(meta["image_heights"], dtype=np.int64)
        widths = np.array(meta["image_widths"], dtype=np.int64)
        arrays = {n: _open_npy(path, n, meta["arrays"][n]) for n in _ARRAY_NAMES}
        if heights.shape != ids.shape or widths.shape != ids.shape:
            raise ValueError(f"{META_NAME}: image_heights/image_widths: must be [I="
                             f"{ids.shape[0]}], got {list(heights.shape)}, "
                             f"{list(widths.shape)}")
        _check_arrays({"image_ids": ids, **arrays}, num_score_columns, scan_values=False)
        if verify:
            for n in _ARRAY_NAMES:
                verify_data(path, n, meta["arrays"][n])
        ranges = meta.get("value_ranges")  # absent in caches of older tfcal versions
        return RawOutputs(ids, arrays["boxes"], arrays["scores"], heights, widths,
                          str(meta["fingerprint"]), str(meta["model_fingerprint"]),
                          str(meta["data_fingerprint"]),
                          value_ranges=ranges if isinstance(ranges, dict) else None)
    except (KeyError, TypeError, OverflowError) as e:
        raise ValueError(f"{META_NAME}: malformed ({type(e).__name__}: {e})") from None


def load_cache(path: str | Path, fingerprint: str, dataset,
               num_score_columns: int | None = None, *,
               verify: bool = True) -> RawOutputs | None:
    """The cached outputs at `path`, or None (logged) when absent, stale or corrupt.

    Args:
      path: the cache directory (`cache_path`).
      fingerprint: the expected `combined_fingerprint`.
      dataset: the `CocoDataset`; the cache must hold its image ids and sizes in its order.
      num_score_columns: C expected (raw columns, background included); None: not checked.
      verify: rehash every data byte against the recorded sha256 (reads the whole cache once;
        the other checks cost a few kilobytes of reads, see the module docstring).

    Returns:
      `RawOutputs` whose `boxes` and `scores` are read-only memory maps, or None.
    """
    path = Path(path)
    if not path.exists():
        logger.info("no raw-output cache at %s", path)
        return None
    try:
        meta = _read_meta(path)
        stored = str(meta.get("fingerprint"))
        if stored != fingerprint:
            logger.warning("stale raw-output cache %s (fingerprint %s, expected %s): recomputing",
                           path, stored[:16], fingerprint[:16])
            return None
        raw = _open_cache(path, meta, num_score_columns, verify=verify)
        if not np.array_equal(raw.image_ids, dataset.image_ids):
            raise ValueError("image_ids: differ from the dataset's")
        if not (np.array_equal(raw.image_heights, dataset.image_heights)
                and np.array_equal(raw.image_widths, dataset.image_widths)):
            raise ValueError("image_heights/image_widths: differ from the dataset's")
    except ValueError as e:
        logger.warning("corrupt raw-output cache %s (%s): recomputing", path, e)
        return None
    logger.info("using raw-output cache %s", path)
    return raw


# ----------------------------------------------------------------------------------------------
# Precomputed raw outputs


def _open_npz(path: Path) -> dict[str, np.ndarray | NpzStream]:
    """``image_ids`` in memory; ``boxes`` and ``scores`` memory-mapped (`ReleasingMemmap`)
    when stored uncompressed, else `NpzStream` (see `tfcal.coco.npz`); ValueError."""
    a = open_members(path, _NPZ_NAMES, in_memory=("image_ids",))
    return {n: v.view(ReleasingMemmap) if isinstance(v, np.memmap) else v for n, v in a.items()}


def _direct(a: dict) -> bool:
    """The boxes and scores of `a` are float32 C-order memory maps (usable as they are)."""
    return all(isinstance(a[n], np.memmap) and a[n].dtype == _FLOAT for n in _ARRAY_NAMES)


def _row_batches(a: dict, rows: np.ndarray | None):
    """``(boxes, scores)`` batches of about `_SCAN_BYTES` of scores: the rows `rows` of memory
    maps (None: all rows, also from `NpzStream` members), in that order."""
    scores = a["scores"]
    step = _rows_per_slice(scores)
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
    """Writes the rows as a cache folder; boxes outside [0, 1] by more than `BOX_TOLERANCE`
    are refused before anything is committed (ValueError)."""
    with RawOutputsWriter(dest, image_ids=image_ids, image_heights=heights,
                          image_widths=widths, fingerprint=fingerprint,
                          data_fingerprint=data_fp) as writer:
        for boxes, scores in _row_batches(a, rows):
            writer.append(boxes, scores)
        lo, hi = writer.value_ranges["boxes"]
        if lo < -BOX_TOLERANCE or hi > 1.0 + BOX_TOLERANCE:
            raise ValueError(_pixel_boxes(lo, hi))
        return writer.commit()


def _pixel_boxes(lo: float, hi: float) -> str:
    return (f"boxes: must be normalized [ymin, xmin, ymax, xmax] in [0, 1] (pixel "
            f"coordinates?), got values in [{lo:.4g}, {hi:.4g}]")


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
        why = ("compressed" if any(isinstance(a[n], NpzStream) for n in _ARRAY_NAMES)
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
        _check_arrays(a, None, scan_values=False)
        n = a["image_ids"].shape[0]
        zeros = np.zeros(n, np.int64)
        _write_rows(Path(dest), a, None, image_ids=a["image_ids"],
                    heights=zeros if image_heights is None else image_heights,
                    widths=zeros if image_widths is None else image_widths,
                    fingerprint=file_sha256(path))
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    return Path(dest)


def _rows_per_slice(arr: np.ndarray) -> int:
    """Rows of `arr` in about `_SCAN_BYTES`, at least 1."""
    row_bytes = arr.itemsize * math.prod(arr.shape[1:]) if arr.ndim else arr.itemsize
    return max(1, _SCAN_BYTES // max(row_bytes, 1))


def _first_non_finite(arr: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN/inf of `arr`, scanned a slice of rows at a time, or None."""
    if arr.ndim == 0:
        return None if np.isfinite(arr) else ()
    step = _rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        ok = np.isfinite(arr[start:start + step])
        _release_pages(arr)
        if not ok.all():
            bad = np.argwhere(~ok)[0]
            bad[0] += start
            return tuple(int(i) for i in bad)
    return None


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = _first_non_finite(arr)
    if bad is not None:
        raise ValueError(f"{name}: non-finite value {arr[bad]} at {list(bad)}")


def _value_range(arr: np.ndarray) -> tuple[float, float]:
    """``(min(arr, 0), max(arr, 1))``, scanned a slice of rows at a time."""
    lo, hi = 0.0, 1.0
    step = _rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        part = arr[start:start + step]
        lo = min(lo, float(part.min(initial=0.0)))
        hi = max(hi, float(part.max(initial=1.0)))
        _release_pages(arr)
    return lo, hi


def _check_arrays(a: dict[str, np.ndarray], num_score_columns: int | None, *,
                  scan_values: bool = True) -> None:
    """Shape (and, with `scan_values`, finiteness) checks shared by the cache and precomputed
    outputs (ValueError)."""
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
            _check_finite(name, arr)
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


def load_raw_outputs(npz_path: str | Path, dataset, *, num_score_columns: int | None = None,
                     cache_dir: str | Path | None = None) -> RawOutputs:
    """Loads precomputed raw outputs (layout in the module docstring) for `dataset`'s images.

    Rows are returned in the dataset's image order; rows for images not in the dataset are
    dropped (logged). Boxes up to `BOX_TOLERANCE` outside [0, 1] are clipped with a
    `TfcalWarning`. Memory stays at about a batch of rows for large files:

    - an npz saved uncompressed (`np.savez`) with float32 arrays whose rows are the dataset's
      images in order is memory-mapped at its zip offset, as it is (`tfcal.coco.npz`);
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
        count mismatch, or boxes further outside [0, 1] than `BOX_TOLERANCE` (pixel boxes?).
    """
    path = Path(npz_path)
    try:
        if path.is_dir():
            meta = _read_meta(path)
            cached = _open_cache(path, meta, num_score_columns)
            a = {"image_ids": cached.image_ids, "boxes": cached.boxes, "scores": cached.scores}
            fingerprint, model_fp = str(meta["meta_sha256"]), cached.model_fingerprint
        else:
            a = _open_npz(path)
            _check_arrays(a, num_score_columns, scan_values=False)
            for name in _ARRAY_NAMES:
                if isinstance(a[name], np.memmap):
                    _check_finite(name, a[name])
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
                for name in _ARRAY_NAMES:
                    _check_finite(name, a[name])
    except ValueError as e:
        raise TfcalError(f"{path}: {e}") from None
    boxes, scores = a.pop("boxes"), a.pop("scores")
    if not identity:
        boxes, scores = boxes[rows], scores[rows]  # only the dataset's rows, in its order
    boxes = boxes.astype(np.float32, copy=False)
    scores = scores.astype(np.float32, copy=False)
    lo, hi = _value_range(boxes)
    if lo < -BOX_TOLERANCE or hi > 1.0 + BOX_TOLERANCE:
        raise TfcalError(f"{path}: {_pixel_boxes(lo, hi)}")
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
                                    "scores": _min_max(scores)})


#: Slack of the probability check (float32 rounding in a detector's sigmoid or softmax).
SCORE_TOLERANCE = 1e-3


def _min_max(arr: np.ndarray) -> list[float]:
    """``[min, max]`` of `arr`, scanned a slice of rows at a time ([0, 0] when empty)."""
    if arr.size == 0:
        return [0.0, 0.0]
    lo, hi = math.inf, -math.inf
    step = _rows_per_slice(arr)
    for start in range(0, arr.shape[0], step):
        part = arr[start:start + step]
        if part.size:
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        _release_pages(arr)
    return [lo, hi]


def check_value_ranges(raw: RawOutputs, *, score_converter: str, source: str,
                       boxes_key: str = "boxes", scores_key: str = "scores") -> None:
    """Refuses raw outputs whose values cannot be what the config says they are.

    Boxes must be normalized (within `BOX_TOLERANCE` of [0, 1]); with `score_converter`
    ``sigmoid`` or ``softmax`` (the detector already converted its scores) the scores must be
    probabilities in [0, 1] (within `SCORE_TOLERANCE`); ``identity`` means logits, any value.

    Args:
      raw: the outputs; their recorded `value_ranges`, else a scan of the arrays.
      score_converter: the config's `model.score_converter`.
      source: the model folder or raw-outputs file, named in the message.
      boxes_key, scores_key: the output names, named in the message.

    Raises:
      TfcalError: one line naming `source`, the output and ``model.score_converter``.
    """
    ranges = raw.value_ranges or {}
    boxes = ranges.get("boxes") or _min_max(raw.boxes)
    scores = ranges.get("scores") or _min_max(raw.scores)
    if raw.num_images and (boxes[0] < -BOX_TOLERANCE or boxes[1] > 1.0 + BOX_TOLERANCE):
        raise TfcalError(f"{source}: {boxes_key}: must be normalized [ymin, xmin, ymax, xmax] "
                         f"in [0, 1] (pixel coordinates?), got values in [{boxes[0]:.4g}, "
                         f"{boxes[1]:.4g}]")
    if raw.num_images and score_converter in ("sigmoid", "softmax") and (
            scores[0] < -SCORE_TOLERANCE or scores[1] > 1.0 + SCORE_TOLERANCE):
        raise TfcalError(f"{source}: {scores_key}: values in [{scores[0]:.4g}, {scores[1]:.4g}] "
                         f"are not probabilities, but model.score_converter: {score_converter} "
                         f"says the detector already applied its {score_converter}; for logits "
                         f"set model.score_converter: identity")
