"""Fingerprints that key the raw-output cache: sha256 of a model's files, of a data set's image
list, and of the two together."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20  # bytes per read when hashing files


def hash_file(h, path: Path) -> None:
    """Feeds the bytes of the file `path` to the hash object `h`, `_CHUNK` bytes at a time."""
    buf = bytearray(_CHUNK)  # one buffer, reused: memory stays at _CHUNK
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    hash_file(h, Path(path))
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
        hash_file(h, p)
    for k in keys:
        h.update(b"key\0" + str(k).encode() + b"\0")
    return h.hexdigest()


def data_fingerprint(dataset, *, content_hash: bool = False) -> str:
    """sha256 hex of the image list of `dataset` (a `tfcal.coco.CocoDataset`): ids, file names,
    sizes from the JSON, and each file's byte size and mtime (or, with `content_hash`, its
    bytes)."""
    h = hashlib.sha256(b"tfcal-data-v1\0")
    paths = dataset.image_paths or (None,) * dataset.num_images
    for i, name, hh, ww, p in zip(dataset.image_ids, dataset.file_names, dataset.image_heights,
                                  dataset.image_widths, paths):
        h.update(f"{int(i)}\0{name}\0{int(hh)}x{int(ww)}\0".encode())
        if p is not None:
            if content_hash:
                hash_file(h, p)
            else:
                st = os.stat(p)
                h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def combined_fingerprint(model_fp: str, data_fp: str) -> str:
    """sha256 hex of a model fingerprint and a data fingerprint: the cache key."""
    return hashlib.sha256(f"{model_fp}\0{data_fp}".encode()).hexdigest()
