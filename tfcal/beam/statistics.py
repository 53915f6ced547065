"""Mergeable per-image statistics of the Beam runner: shards on disk, their accumulator and merge.

What is kept per image, and why. Every later step runs unchanged on the merged statistics, and
each needs the image's raw (pre-NMS) outputs: the calibration fit post-processes the tune
images at the default IoU; the search post-processes them once per NMS IoU *after*
calibration, so which boxes pass `tuning.min_candidate_thresh` and which survive the
per-image cap `max_total_detections` depend on the fitted maps (per-class temperatures move
classes against each other; softmax temperature couples the columns); the holdout check runs
the serving graph. Matched (score, TP) records at calibrated scores can therefore only be
made after the merge, and the record that keeps every answer exact is the image's raw
outputs: boxes float32 `[N, 4]` and scores float32 `[N, C]`, keyed by image (`image_key`).
Image identity is kept, not a per-split summary, because the tune/holdout split, the
learn/certify split and the k folds are drawn by image from the whole set at tuning time,
and new labelled images change them.

Cost: `N * (4 + C) * 4` bytes per image (NanoDet-g at 320x320: 2,125 boxes x 81 columns, 705
KiB; COCO val2017, 5,000 images: 3.4 GiB). Records never pile up in memory: a
`ShardAccumulator` holds at most `shard_images` records and spills them to an immutable shard
folder, so a worker's memory is one shard, and merging accumulators joins lists of shard
names. `merge_into_cache` streams the shards into the standard raw-output cache
(`tfcal.raw.cache`), one image batch at a time, in the data set's image order: the merged
cache is the one the local runner writes (same fingerprint, same bytes).

Store layout, ``<model.cache_dir>/beam-<model fingerprint[:16]>/``:

- ``shards/<name>/``: ``boxes.npy`` float32 `[S, N, 4]`, ``scores.npy`` float32 `[S, N, C]`,
  ``shard.json`` (``image_keys``, ``image_ids``, shapes, sha256 of each file); written to a
  temporary sibling and renamed, so a shard exists only whole;
- ``index.json``: every committed shard (name, image keys), replaced atomically after each
  run. Shards not in the index (a run that failed, a retried bundle) are never read, and are
  deleted after the next run commits (`remove_unindexed`);
- ``.tfcal.lock``: held by the run writing the store (`tfcal.locks`).

Incremental data: a new run looks the data set's image keys up in the index and runs the
detector on the missing images only; old and new shards then merge into the new cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tfcal import TfcalError, atomic
from tfcal.raw import RawOutputs, RawOutputsWriter, ReleasingMemmap, file_sha256

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_META = "shard.json"
STORE_FORMAT = "tfcal-beam-statistics"
STORE_VERSION = 1
_FLOAT = np.dtype("<f4")


def image_keys(dataset) -> list[str]:
    """One key per image of `dataset`: its id, file name, size in the JSON and the file's byte
    size and mtime (as `tfcal.raw.fingerprint.data_fingerprint` hashes them), so an image whose
    file changed is run again."""
    paths = dataset.image_paths or (None,) * dataset.num_images
    keys = []
    for i, name, h, w, p in zip(dataset.image_ids, dataset.file_names, dataset.image_heights,
                                dataset.image_widths, paths):
        stat = "" if p is None else _stat(p)
        keys.append(hashlib.sha256(f"{int(i)}\0{name}\0{int(h)}x{int(w)}\0{stat}".encode())
                    .hexdigest()[:32])
    return keys


def _stat(path) -> str:
    st = os.stat(path)
    return f"{st.st_size}\0{st.st_mtime_ns}"


def store_path(cache_dir: str | Path, model_fingerprint: str) -> Path:
    """The statistics store of one detector inside `cache_dir`."""
    return Path(cache_dir) / f"beam-{model_fingerprint[:16]}"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image's statistics: its key, COCO id, raw boxes float32 `[N, 4]` and raw scores
    float32 `[N, C]`."""

    key: str
    image_id: int
    boxes: np.ndarray
    scores: np.ndarray


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """A committed shard: its folder name under ``shards/`` and the image keys it holds."""

    name: str
    image_keys: tuple[str, ...]


def write_shard(store: str | Path, records: Sequence[ImageRecord]) -> ShardEntry:
    """Writes `records` as one new shard folder, atomically; returns its entry.

    Raises:
      ValueError: no records, or records whose row shapes differ.
    """
    if not records:
        raise ValueError("a shard needs at least one record")
    shapes = {(r.boxes.shape, r.scores.shape) for r in records}
    if len(shapes) != 1:
        raise ValueError(f"records of one shard must share their shapes, got {sorted(shapes)}")
    name = f"shard-{secrets.token_hex(8)}"
    meta = {"image_keys": [r.key for r in records],
            "image_ids": [int(r.image_id) for r in records], "arrays": {}}
    with atomic.directory(Path(store) / "shards" / name) as tmp:
        for array in ("boxes", "scores"):
            data = np.ascontiguousarray(np.stack([getattr(r, array) for r in records]),
                                        dtype=_FLOAT)
            np.save(tmp / f"{array}.npy", data)
            meta["arrays"][array] = {"shape": list(data.shape),
                                     "file_sha256": file_sha256(tmp / f"{array}.npy")}
        atomic.write_json(tmp / SHARD_META, meta)
    return ShardEntry(name, tuple(meta["image_keys"]))


class ShardAccumulator:
    """Bounded-memory accumulator of `ImageRecord`s: at most `shard_images` records in memory;
    when full they are written as a shard (`write_shard`) and only its entry is kept.

    `merge` joins the entries of both sides and adds the other side's pending records, so
    merging is exact (concatenation) and associative; `spill` writes the pending records now
    (before an accumulator is sent elsewhere); `finish` spills the rest and returns every
    entry.
    """

    def __init__(self, store: str | Path, shard_images: int):
        if shard_images < 1:
            raise ValueError(f"shard_images must be >= 1, got {shard_images}")
        self.store = Path(store)
        self.shard_images = int(shard_images)
        self.entries: list[ShardEntry] = []
        self.pending: list[ImageRecord] = []

    def add(self, record: ImageRecord) -> "ShardAccumulator":
        self.pending.append(record)
        if len(self.pending) >= self.shard_images:
            self.spill()
        return self

    def merge(self, other: "ShardAccumulator") -> "ShardAccumulator":
        self.entries.extend(other.entries)
        for record in other.pending:
            self.add(record)
        return self

    def finish(self) -> list[ShardEntry]:
        self.spill()
        return list(self.entries)

    def spill(self) -> None:
        """Writes the pending records as shards (one per row shape)."""
        by_shape: dict = {}
        for r in self.pending:
            by_shape.setdefault((r.boxes.shape, r.scores.shape), []).append(r)
        for records in by_shape.values():
            self.entries.append(write_shard(self.store, records))
        self.pending = []


# ----------------------------------------------------------------------------------------------
# The index and the merge


@dataclasses.dataclass(frozen=True)
class StoreIndex:
    """The committed shards of a store and where each image key lives."""

    path: Path
    model_fingerprint: str
    entries: tuple[ShardEntry, ...]

    @property
    def location(self) -> dict[str, tuple[str, int]]:
        """`{image key: (shard name, row)}`; a key in several shards resolves to the last."""
        out = {}
        for e in self.entries:
            for row, k in enumerate(e.image_keys):
                out[k] = (e.name, row)
        return out

    def with_entries(self, new: Iterable[ShardEntry]) -> "StoreIndex":
        return dataclasses.replace(self, entries=self.entries + tuple(new))

    def save(self) -> Path:
        return atomic.write_json(self.path / INDEX_NAME, {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "shards": [{"name": e.name, "image_keys": list(e.image_keys)}
                       for e in self.entries]})


def remove_unindexed(index: StoreIndex) -> int:
    """Deletes the shard folders `index` does not list (written by bundles a runner retried or
    by a run that failed before committing); returns how many. Call it only while holding the
    store's lock, after saving the index."""
    keep = {e.name for e in index.entries}
    shards = index.path / "shards"
    removed = 0
    for folder in (sorted(shards.iterdir()) if shards.is_dir() else []):
        if folder.name.startswith("shard-") and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def load_index(store: str | Path, model_fingerprint: str) -> StoreIndex:
    """The store's index (empty when there is none yet).

    Raises:
      TfcalError: an index that does not parse, is of another format, or belongs to
        another detector.
    """
    store = Path(store)
    path = store / INDEX_NAME
    if not path.is_file():
        return StoreIndex(store, model_fingerprint, ())
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != STORE_FORMAT or raw.get("version") != STORE_VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        entries = tuple(ShardEntry(str(s["name"]), tuple(str(k) for k in s["image_keys"]))
                        for s in raw["shards"])
    except (ValueError, KeyError, TypeError) as e:
        raise TfcalError(f"{path}: not a Beam statistics index ({e}); remove the folder "
                         f"{store} to start again") from None
    if raw.get("model_fingerprint") != model_fingerprint:
        raise TfcalError(f"{path}: model_fingerprint: belongs to another detector")
    return StoreIndex(store, model_fingerprint, entries)


class _Shard:
    """A committed shard, checked against its recorded file hashes once (streamed) and
    memory-mapped; reading rows copies them and gives the pages back (`ReleasingMemmap`), so
    the merge's RSS stays at a batch however many shards it reads."""

    def __init__(self, store: Path, name: str):
        folder = store / "shards" / name
        try:
            meta = json.loads((folder / SHARD_META).read_text(encoding="utf-8"))
            self.arrays = {}
            for array in ("boxes", "scores"):
                file = folder / f"{array}.npy"
                rec = meta["arrays"][array]
                if file_sha256(file) != rec["file_sha256"]:
                    raise ValueError(f"{array}.npy changed since written")
                data = np.load(file, mmap_mode="r").view(ReleasingMemmap)
                if data.dtype != _FLOAT or list(data.shape) != rec["shape"]:
                    raise ValueError(f"{array}.npy is {data.dtype} {list(data.shape)}, "
                                     f"{SHARD_META} says {rec['shape']}")
                self.arrays[array] = data
        except (OSError, ValueError, KeyError) as e:
            raise TfcalError(f"{folder}: damaged Beam statistics shard ({e}); remove "
                             f"{store} and run again") from None


def merge_into_cache(index: StoreIndex, dataset, keys: Sequence[str], target: Path, *,
                     fingerprint: str, data_fingerprint: str, batch: int = 32
                     ) -> RawOutputs:
    """Streams the shards holding `keys` (one per image of `dataset`, in its order) into the
    raw-output cache `target` (`tfcal.raw.cache.RawOutputsWriter`: atomic, one batch of rows
    in memory); returns it, memory-mapped.

    Raises:
      TfcalError: an image missing from the store, a damaged shard, or shards whose shapes
        disagree.
    """
    where = index.location
    missing = [int(i) for i, k in zip(dataset.image_ids, keys) if k not in where]
    if missing:
        raise TfcalError(f"{index.path}: no statistics for {len(missing)} images "
                         f"(ids {missing[:10]})")
    shards: dict[str, _Shard] = {}
    with RawOutputsWriter(
            target, image_ids=dataset.image_ids, image_heights=dataset.image_heights,
            image_widths=dataset.image_widths, fingerprint=fingerprint,
            model_fingerprint=index.model_fingerprint,
            data_fingerprint=data_fingerprint) as writer:
        for start in range(0, len(keys), batch):
            rows = [where[k] for k in keys[start:start + batch]]
            for name, _ in rows:
                if name not in shards:
                    shards[name] = _Shard(index.path, name)
            try:
                writer.append(*(_gather(shards, rows, array) for array in ("boxes", "scores")))
            except ValueError as e:
                raise TfcalError(f"{index.path}: shards of images {start}..{start + len(rows)}"
                                 f": {e}") from None
        return writer.commit()


def _gather(shards: dict, rows: list[tuple[str, int]], array: str) -> np.ndarray:
    """The rows `(shard name, row)` of `array`, in order: one copying read per shard."""
    by_shard: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(rows):
        by_shard.setdefault(name, []).append(i)
    first = shards[rows[0][0]].arrays[array]
    shapes = {shards[n].arrays[array].shape[1:] for n in by_shard}
    if len(shapes) != 1:
        raise ValueError(f"{array} rows of shapes {sorted(shapes)} cannot share a cache")
    out = np.empty((len(rows), *first.shape[1:]), first.dtype)
    for name, positions in by_shard.items():
        out[positions] = shards[name].arrays[array][np.array([rows[i][1] for i in positions])]
    return out
