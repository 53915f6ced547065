"""Cost of verifying the raw-output cache on load (sha256 of the data) against reading it.

Builds a synthetic cache of COCO val2017 size (5,000 images x 3,549 boxes x 91 score columns,
6.5 GB of float32 scores plus 0.28 GB of boxes) with `RawOutputsWriter`, then times, in one
run and alternately:

- read: one pass over the cache as the tuner reads it (`load_cache(..., verify=False)`, then
  `boxes[idx]` and `scores[idx]` for batches of 32 images, copied into memory);
- verify: `load_cache(...)` with its default check, which rehashes every data byte against the
  sha256 recorded when the cache was written.

Both are measured warm (the file in the kernel's page cache, as right after a run or on a
second run); from a cold disk both are bound by the same disk read. Prints verify / read as a
ratio. Needs about 7 GB free in `--dir` (default: the system temporary folder) and as much
free memory to keep the file cached; `--images` makes a smaller cache.

Run: `python benchmarks/cache_verify.py [--images 5000] [--dir /tmp]` (a few minutes).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tfcal.raw import RawOutputsWriter, load_cache

NUM_BOXES, NUM_COLUMNS, BATCH = 3549, 91, 32


def _build(path: Path, num_images: int):
    ids = np.arange(1, num_images + 1, dtype=np.int64)
    sizes = np.full(num_images, 480, np.int64)
    rng = np.random.default_rng(0)
    block_scores = rng.random((BATCH, NUM_BOXES, NUM_COLUMNS), dtype=np.float32)
    block_boxes = rng.random((BATCH, NUM_BOXES, 4), dtype=np.float32)
    with RawOutputsWriter(path, image_ids=ids, image_heights=sizes, image_widths=sizes,
                          fingerprint="f" * 64) as writer:
        for start in range(0, num_images, BATCH):
            k = min(BATCH, num_images - start)
            block_scores[0, 0, 0] = start  # every batch differs
            writer.append(block_boxes[:k], block_scores[:k])
        writer.commit()
    return SimpleNamespace(image_ids=ids, image_heights=sizes, image_widths=sizes)


def _read(path: Path, dataset) -> float:
    start = time.perf_counter()
    raw = load_cache(path, "f" * 64, dataset, verify=False)
    total = 0.0
    for s in range(0, raw.num_images, BATCH):
        idx = np.arange(s, min(s + BATCH, raw.num_images))
        total += float(raw.boxes[idx][0, 0, 0]) + float(raw.scores[idx][0, 0, 0])
    return time.perf_counter() - start


def _verify(path: Path, dataset) -> float:
    start = time.perf_counter()
    assert load_cache(path, "f" * 64, dataset) is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    need = args.images * NUM_BOXES * (NUM_COLUMNS + 4) * 4
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.05:
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed; "
                         "pass a smaller --images or another --dir")
    root = Path(tempfile.mkdtemp(prefix="tfcal-cache-bench-", dir=args.dir))
    try:
        path = root / "raw_outputs-ffffffffffffffff"
        t = time.perf_counter()
        dataset = _build(path, args.images)
        print(f"[cache verify] {args.images:,} x {NUM_BOXES:,} x {NUM_COLUMNS} float32 scores "
              f"+ boxes: {need / 1e9:.2f} GB, written in {time.perf_counter() - t:.1f} s")
        _read(path, dataset)  # warm the page cache
        reads, verifies = [], []
        for _ in range(args.repeats):
            reads.append(_read(path, dataset))
            verifies.append(_verify(path, dataset))
        read, verify = float(np.median(reads)), float(np.median(verifies))
        print(f"  read pass (batches of {BATCH}, copied): {read:6.2f} s "
              f"({need / read / 1e9:.2f} GB/s)   runs {', '.join(f'{r:.2f}' for r in reads)}")
        print(f"  verify (sha256 of the data):        {verify:6.2f} s "
              f"({need / verify / 1e9:.2f} GB/s)   runs {', '.join(f'{v:.2f}' for v in verifies)}")
        print(f"  verify / read: {verify / read:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
