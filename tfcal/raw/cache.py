"""The raw-output cache: a verified directory of ``.npy`` files, written atomically batch by
batch (`RawOutputsWriter`) and read back as memory maps (`load_cache`).

The raw-output cache is a directory ``<cache_dir>/raw_outputs-<fingerprint[:16]>/``:

- ``boxes.npy``: float32 `[I, N, 4]` (or `[I, N, K, 4]`) and ``scores.npy``: float32 `[I, N, C]`,
  the arrays of `RawOutputs` in the dataset's image order (little-endian, C order, plain
  ``.npy`` files);
- ``meta.json``: ``format`` and ``version``; ``fingerprint`` (sha256 of the model and the data,
  see `tfcal.raw.fingerprint.combined_fingerprint`), ``model_fingerprint``,
  ``data_fingerprint``; ``image_ids``, ``image_heights``, ``image_widths`` (`[I]` each);
  ``finite`` (every value was checked for NaN/inf when written); ``value_ranges`` (``[min,
  max]`` of ``boxes`` and of ``scores`` as written, for `tfcal.raw.checks.check_value_ranges`;
  absent in caches of tfcal before it); per array its ``file``, ``dtype``, ``shape``,
  ``header_bytes``, ``file_bytes`` and the ``sha256`` of its data bytes; and ``meta_sha256``,
  the sha256 of the canonical JSON of all the other keys.

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
`tfcal.raw.precomputed.load_raw_outputs` refuses a damaged cache folder given as precomputed
outputs (there is no model to rebuild it from). ``verify=False`` skips the hash (the other
checks read a few kilobytes), for tools that know the files are intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

import tfcal
from tfcal import atomic
from tfcal.raw import checks
from tfcal.raw.record import RawOutputs, ReleasingMemmap

logger = logging.getLogger(__name__)

CACHE_FORMAT = "tfcal-raw-outputs"
CACHE_VERSION = 2
META_NAME = "meta.json"
ARRAY_NAMES = ("boxes", "scores")
_FLOAT = np.dtype("<f4")


def cache_path(cache_dir: str | Path, fingerprint: str) -> Path:
    """The cache directory for `fingerprint` inside `cache_dir`."""
    return Path(cache_dir) / f"raw_outputs-{fingerprint[:16]}"



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
            bad = checks.first_non_finite(arr)
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
            preallocate(file, self._headers[name] + math.prod(shape) * _FLOAT.itemsize)

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
        for name in ARRAY_NAMES:
            atomic.fsync_file(self._tmp / f"{name}.npy")
        with open(self._tmp / META_NAME, "w", encoding="utf-8") as f:
            f.write(meta_text(meta))
            f.flush()
            os.fsync(f.fileno())
        atomic.fsync_dir(self._tmp)
        atomic.replace_directory(self._tmp, self.path)
        self._closed = True
        atomic.fsync_dir(self.path.parent)
        legacy = self.path.with_name(self.path.name + ".npz")  # the single-file format before v2
        if legacy.is_file():
            legacy.unlink()
            logger.info("removed the old-format raw-output cache %s", legacy)
        return open_cache(self.path, meta, verify=False)  # just written and hashed

    def abort(self) -> None:
        """Drops what was written (removes the temporary directory)."""
        self._closed = True
        self._memory = {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _value_ranges(self) -> dict:
        return {n: list(self._ranges.get(n, [0.0, 0.0])) for n in ARRAY_NAMES}

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
        return {**body, "meta_sha256": meta_checksum(body)}


def save_cache(path: str | Path, raw: RawOutputs) -> Path:
    """Writes `raw` (with its fingerprints) as a cache directory at `path`, atomically."""
    with RawOutputsWriter(path, image_ids=raw.image_ids, image_heights=raw.image_heights,
                          image_widths=raw.image_widths, fingerprint=raw.fingerprint,
                          model_fingerprint=raw.model_fingerprint,
                          data_fingerprint=raw.data_fingerprint) as writer:
        step = checks.rows_per_slice(raw.scores)
        for start in range(0, raw.num_images, step):
            writer.append(raw.boxes[start:start + step], raw.scores[start:start + step])
        writer.commit()
    return Path(path)



def meta_checksum(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def meta_text(meta: dict) -> str:
    """One key per line (values compact), so the small fields are easy to read."""
    lines = (f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in meta.items())
    return "{\n" + ",\n".join(lines) + "\n}\n"


def preallocate(path: Path, size: int) -> None:
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



def read_meta(path: Path) -> dict:
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
    if meta.get("meta_sha256") != meta_checksum(body):
        raise ValueError(f"{META_NAME}: meta_sha256 does not match the content (edited or "
                         "damaged)")
    if (meta.get("format"), meta.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
        raise ValueError(f"{META_NAME}: format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}, expected {CACHE_FORMAT!r} version "
                         f"{CACHE_VERSION}")
    return meta


def open_npy(path: Path, name: str, rec: dict) -> np.ndarray:
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
        buf = bytearray(checks._SCAN_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    if h.hexdigest() != rec["sha256"]:
        raise ValueError(f"{name}.npy: data bytes changed since written (sha256 "
                         f"{h.hexdigest()[:16]}..., {META_NAME} arrays.{name}.sha256 "
                         f"{str(rec['sha256'])[:16]}...)")


def open_cache(path: Path, meta: dict, num_score_columns: int | None = None, *,
                verify: bool = True) -> RawOutputs:
    """The cache directory `path` described by `meta` as `RawOutputs` (ValueError if corrupt)."""
    try:
        if meta["finite"] is not True:
            raise ValueError(f"{META_NAME}: finite: must be true, got {meta['finite']!r}")
        ids = np.array(meta["image_ids"], dtype=np.int64)
        heights = np.array(meta["image_heights"], dtype=np.int64)
        widths = np.array(meta["image_widths"], dtype=np.int64)
        arrays = {n: open_npy(path, n, meta["arrays"][n]) for n in ARRAY_NAMES}
        if heights.shape != ids.shape or widths.shape != ids.shape:
            raise ValueError(f"{META_NAME}: image_heights/image_widths: must be [I="
                             f"{ids.shape[0]}], got {list(heights.shape)}, "
                             f"{list(widths.shape)}")
        checks.check_arrays({"image_ids": ids, **arrays}, num_score_columns, scan_values=False)
        if verify:
            for n in ARRAY_NAMES:
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
        meta = read_meta(path)
        stored = str(meta.get("fingerprint"))
        if stored != fingerprint:
            logger.warning("stale raw-output cache %s (fingerprint %s, expected %s): recomputing",
                           path, stored[:16], fingerprint[:16])
            return None
        raw = open_cache(path, meta, num_score_columns, verify=verify)
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

