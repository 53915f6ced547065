"""Memory and time of the Beam runner's mergeable statistics on a synthetic job, by size.

For each `--images` count (default 10,000 and 100,000), with `--classes` classes (default 80,
plus a background column) and `--boxes` raw boxes per image (default 100):

1. shard: a Beam pipeline on the DirectRunner with `--workers` processes makes one synthetic
   `ImageRecord` per image (seeded by its index) and combines them with the runner's own
   `ShardCombineFn` (shards of `--shard-images`), as the detector pass does after RunInference.
   Each worker notes its peak RSS (`getrusage`); the stage's wall time is printed;
2. merge: in a fresh process, the shards are streamed into one raw-output cache in image
   order (`merge_into_cache`, as `tfcal tune` does after the pass): its wall time and peak RSS.

Prints per size: the statistics' size (`images * boxes * (4 + columns) * 4` bytes, what an
in-memory concatenation of the records would hold), the peak RSS of the largest worker and of
the merge, both stage times, and the growth factors between the sizes. Needs about twice the
largest size free in `--dir` (3.4 GB of shards plus 3.4 GB of cache at 100,000 images).

Run: `python benchmarks/beam_statistics.py [--images 10000 100000] [--workers 2] [--dir /tmp]`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _note_peak(folder: str) -> None:
    path = Path(folder) / f"peak-{os.getpid()}.txt"
    path.write_text(f"{_peak_mib():.1f}\n")


def _record(index: int, boxes: int, columns: int):
    from tfcal.beam.statistics import ImageRecord

    rng = np.random.default_rng(index)
    lo = rng.random((boxes, 2), dtype=np.float32) * 0.5
    b = np.concatenate([lo, lo + 0.5 * rng.random((boxes, 2), dtype=np.float32)], axis=1)
    s = rng.random((boxes, columns), dtype=np.float32) ** 8  # mostly low scores, as detectors give
    return ImageRecord(f"img{index}", index + 1, b, s)


def stage_shard(args) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from tfcal.beam.pipeline import ShardCombineFn

    peaks = Path(args.store) / "peaks"
    peaks.mkdir(parents=True, exist_ok=True)

    class MakeRecord(beam.DoFn):
        def process(self, i):
            yield _record(int(i), args.boxes, args.classes + 1)

        def finish_bundle(self):
            _note_peak(str(peaks))

    class MeasuredShardCombineFn(ShardCombineFn):
        def compact(self, accumulator):
            out = super().compact(accumulator)
            _note_peak(str(peaks))
            return out

        def extract_output(self, accumulator):
            out = super().extract_output(accumulator)
            _note_peak(str(peaks))
            return out

    flags = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
             f"--direct_num_workers={args.workers}"]
    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(flags)) as p:
        (p | beam.Create(range(args.num_images)) | beam.Reshuffle()
         | beam.ParDo(MakeRecord())
         | beam.CombineGlobally(MeasuredShardCombineFn(args.store, args.shard_images))
         | beam.Map(lambda entries: Path(args.store, "entries.json").write_text(json.dumps(
             [[e.name, list(e.image_keys)] for e in entries]))))
    elapsed = time.perf_counter() - start
    worker_peaks = {p.stem: float(p.read_text()) for p in peaks.glob("peak-*.txt")}
    print(json.dumps({"shard_s": elapsed, "worker_peaks_mib": worker_peaks}))


def stage_merge(args) -> None:
    from tfcal.beam.statistics import ShardEntry, StoreIndex, merge_into_cache

    before = _peak_mib()
    start = time.perf_counter()
    entries = [ShardEntry(n, tuple(k)) for n, k in
               json.loads(Path(args.store, "entries.json").read_text())]
    index = StoreIndex(Path(args.store), "synthetic", tuple(entries))
    ids = np.arange(1, args.num_images + 1, dtype=np.int64)
    dataset = SimpleNamespace(image_ids=ids, image_heights=np.full(len(ids), 480, np.int64),
                              image_widths=np.full(len(ids), 640, np.int64))
    keys = [f"img{i}" for i in range(args.num_images)]
    raw = merge_into_cache(index, dataset, keys, Path(args.store) / "cache",
                           fingerprint="synthetic", data_fingerprint="synthetic")
    elapsed = time.perf_counter() - start
    assert raw.num_images == args.num_images
    check = _record(args.num_images - 1, args.boxes, args.classes + 1)
    assert np.array_equal(raw.scores[args.num_images - 1], check.scores)  # the right row
    print(json.dumps({"merge_s": elapsed, "merge_peak_mib": _peak_mib(),
                      "merge_start_mib": before, "shards": len(entries)}))


def _run_stage(stage: str, num_images: int, store: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--num-images", str(num_images),
           "--store", str(store), "--workers", str(args.workers), "--classes", str(args.classes),
           "--boxes", str(args.boxes), "--shard-images", str(args.shard_images)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-images", type=int, default=512)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--stage", choices=("shard", "merge"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--num-images", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "shard":
        return stage_shard(args)
    if args.stage == "merge":
        return stage_merge(args)
    results = []
    for n in args.images:
        store = Path(tempfile.mkdtemp(prefix="tfcal-beam-stats-", dir=args.dir))
        try:
            load = os.getloadavg()[0]
            shard = _run_stage("shard", n, store, args)
            merge = _run_stage("merge", n, store, args)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        size_mib = n * args.boxes * (4 + args.classes + 1) * 4 / 2**20
        r = {"images": n, "statistics_mib": size_mib, "load": load,
             "worker_peak_mib": max(shard["worker_peaks_mib"].values()),
             "workers_seen": len(shard["worker_peaks_mib"]), **shard, **merge}
        results.append(r)
        print(f"{n:>7} images x {args.classes} classes x {args.boxes} boxes: statistics "
              f"{size_mib:8.0f} MiB | shard stage {r['shard_s']:6.1f} s, peak RSS per worker "
              f"{r['worker_peak_mib']:6.0f} MiB ({r['workers_seen']} processes) | merge "
              f"{r['merge_s']:6.1f} s of {r['shards']} shards, peak RSS {r['merge_peak_mib']:6.0f}"
              f" MiB | 1-min load before {load:.2f}", flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"growth {a['images']} -> {b['images']} images (x{b['images'] / a['images']:.0f}): "
              f"statistics x{b['statistics_mib'] / a['statistics_mib']:.1f}, worker peak RSS "
              f"x{b['worker_peak_mib'] / a['worker_peak_mib']:.2f}, merge peak RSS "
              f"x{b['merge_peak_mib'] / a['merge_peak_mib']:.2f}, shard time "
              f"x{b['shard_s'] / a['shard_s']:.1f}, merge time x{b['merge_s'] / a['merge_s']:.1f}")


if __name__ == "__main__":
    main()
