"""The Beam runner: the detector pass sharded over Apache Beam workers, its per-image statistics
merged into the raw-output cache that every later step reads unchanged.

`run_detector` is what `tuning.prepare` calls with `runner.kind: beam` in place of
`tfcal.coco.runner.run_detector`, with the same result (the same cache, fingerprint and
bytes). It runs the detector only on images the statistics store does not hold yet
(incremental data), commits what succeeded, and reports the images that failed by id.
`apache_beam` (the ``tfcal[beam]`` extra) is imported only here, when a pipeline runs, so
``import tfcal`` works without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tfcal import TfcalError, locks
from tfcal.beam import statistics
from tfcal.config import ModelConfig, RunnerConfig
from tfcal.detectors import open_detector
from tfcal.raw import (RawOutputs, cache_path, combined_fingerprint, data_fingerprint,
                       load_cache)

log = logging.getLogger(__name__)

#: How many failed image ids an error message lists.
SHOWN_FAILURES = 10


def run_detector(model: ModelConfig, runner: RunnerConfig, dataset, *, cache_dir: Path,
                 source: str = "config") -> RawOutputs:
    """Raw outputs of `model` for every image of `dataset`, computed on Beam where missing.

    Stages (one log line each): 1. look the images up in the cache and the statistics store;
    2. run the Beam pipeline (`tfcal.beam.pipeline`) on the missing images; 3. merge the
    shards into the raw-output cache.

    Args:
      model: the config's model section (any format `tfcal.detectors.open_detector` opens;
        each worker opens it itself).
      runner: the config's runner section (Beam flags, shard size).
      dataset: a `CocoDataset` loaded with its images.
      cache_dir: the cache folder; the statistics store is ``beam-<model fp>/`` inside it.
      source: the config file, for error messages.

    Returns:
      `RawOutputs` in the dataset's image order, memory-mapped from the cache.

    Raises:
      TfcalError: no Beam installed, a bad model, or images that failed (by id; what
        succeeded is kept, so running again retries only those).
    """
    detector = open_detector(model)  # checks the files; loads nothing yet
    model_fp = detector.fingerprint()
    data_fp = data_fingerprint(dataset)
    fingerprint = combined_fingerprint(model_fp, data_fp)
    target = cache_path(cache_dir, fingerprint)
    cached = load_cache(target, fingerprint, dataset)
    if cached is not None:
        log.info("beam 1/3: every image's raw outputs are cached in %s", target)
        return cached
    store = statistics.store_path(cache_dir, model_fp)
    # One run writes a store at a time (a second one stops at once, naming the holder).
    with locks.hold(store, locks.command_line(), what="the Beam statistics store"):
        return _run_and_merge(model, runner, dataset, detector, store, target,
                              fingerprint=fingerprint, data_fp=data_fp, source=source)


def _run_and_merge(model, runner, dataset, detector, store: Path, target: Path, *,
                   fingerprint: str, data_fp: str, source: str) -> RawOutputs:
    index = statistics.load_index(store, detector.fingerprint())
    image_keys = statistics.image_keys(dataset)
    held = index.location
    todo = [(k, int(i), str(p), int(h), int(w)) for k, i, p, h, w in zip(
        image_keys, dataset.image_ids, dataset.image_paths, dataset.image_heights,
        dataset.image_widths) if k not in held]
    log.info("beam 1/3: %d of %d images need the detector (%d held in %s)", len(todo),
             len(image_keys), len(image_keys) - len(todo), store)
    if todo:
        detector.batchable  # loads it: a bad model fails here, in one line, before any pipeline
        try:  # apache_beam (the tfcal[beam] extra): imported only when a pipeline runs
            from tfcal.beam import pipeline
        except ImportError as e:
            raise TfcalError(f"{source}: runner.kind: beam needs Apache Beam ({e}); install "
                             "it with pip install 'tfcal[beam]'") from None
        log.info("beam 2/3: running the detector on %d images in shards of %d", len(todo),
                 runner.shard_images)
        entries, failed = pipeline.run(todo, model, store, shard_images=runner.shard_images,
                                       beam_options=runner.beam_options)
        index = index.with_entries(entries)
        index.save()  # what succeeded is kept, failures or not
        removed = statistics.remove_unindexed(index)
        if removed:
            log.info("beam: removed %d shards no run committed (retried or failed bundles)",
                     removed)
        if failed:
            shown = ", ".join(f"{i} ({r})" for i, r in failed[:SHOWN_FAILURES])
            rest = len(failed) - SHOWN_FAILURES
            more = f" and {rest} more" if rest > 0 else ""
            raise TfcalError(f"{dataset.path}: {len(failed)} images failed in the Beam detector "
                             f"pass: {shown}{more}; the other {len(todo) - len(failed)} are kept "
                             f"in {store}, so running again retries only these")
    log.info("beam 3/3: merging %d shards into %s", len(index.entries), target)
    raw = statistics.merge_into_cache(index, dataset, image_keys, target,
                                      fingerprint=fingerprint, data_fingerprint=data_fp)
    return raw
