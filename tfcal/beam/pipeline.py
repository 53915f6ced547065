"""The detector pass as an Apache Beam pipeline: RunInference over the detector, per-image
statistics combined into shards (`tfcal.beam.statistics`).

    ReadFromText(images to run) -> Reshuffle -> decode (tf.io, as the local runner)
      -> RunInference(KeyedModelHandler(DetectorModelHandler)), keyed by (image key, image id)
      -> per-image record (shape, finiteness and box-range checks)
      -> CombineGlobally(ShardCombineFn): shards written by the workers, entries merged
    failed decodes, inferences and records -> one list of (image id, reason)

Only this module imports `apache_beam`; `tfcal.beam.run_detector` imports it when
`runner.kind` is ``beam``. Beam schedules, batches, retries and parallelizes; tfcal adds no
scheduler, pool or queue of its own.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from tfcal import atomic
from tfcal.beam.statistics import ImageRecord, ShardAccumulator, ShardEntry
from tfcal.config import ModelConfig
from tfcal.detectors import open_detector
from tfcal.raw.checks import check_boxes_normalized

log = logging.getLogger(__name__)

_FAILED = "failed"
#: Beam flags used when `runner.beam_options` is empty: the DirectRunner, in this process.
DEFAULT_OPTIONS = ("--runner=DirectRunner",)


class DetectorModelHandler(ModelHandler):
    """A Beam `ModelHandler` over the tfcal `Detector` of a `ModelConfig`.

    `load_model` opens the detector on the worker (`tfcal.detectors.open_detector`: an OD
    API SavedModel with `tf.saved_model.load`, or a YOLO / Keras adapter). A batch is the uint8 `[H, W, 3]` images Beam grouped (at most
    `model.batch_size`); images of one size go to the detector together when it is batchable,
    else one by one. Each prediction is `(boxes float32 [N, 4], scores float32 [N, C])`.
    """

    def __init__(self, model: ModelConfig):
        super().__init__(min_batch_size=1, max_batch_size=model.batch_size)
        self._model = model

    def load_model(self):
        return open_detector(self._model)

    def run_inference(self, batch: Sequence[np.ndarray], model, inference_args=None):
        out: list[Any] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(batch):
            groups.setdefault(image.shape, []).append(i)
        for rows in groups.values():
            calls = [rows] if model.batchable else [[i] for i in rows]
            for call in calls:
                boxes, scores = model([batch[i] for i in call])
                for j, i in enumerate(call):
                    out[i] = (np.asarray(boxes[j], np.float32), np.asarray(scores[j], np.float32))
        return out

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return int(sum(image.nbytes for image in batch))

    def get_metrics_namespace(self) -> str:
        return "tfcal"


class _Decode(beam.DoFn):
    """`(key, image_id, path, height, width)` -> `((key, image_id), uint8 [H, W, 3])`; an image
    that cannot be read or whose size differs from the JSON goes to the failed output."""

    def process(self, element):
        import tensorflow as tf

        key, image_id, path, height, width = element
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False).numpy()
        except (tf.errors.OpError, OSError) as e:
            yield beam.pvalue.TaggedOutput(_FAILED, (image_id, f"cannot decode {path}: "
                                                               f"{str(e).splitlines()[0]}"))
            return
        if image.shape[:2] != (height, width):
            yield beam.pvalue.TaggedOutput(
                _FAILED, (image_id, f"decoded size {image.shape[0]}x{image.shape[1]} differs "
                                    f"from the JSON height x width {height}x{width} ({path})"))
            return
        beam.metrics.Metrics.counter("tfcal", "images_decoded").inc()
        yield (key, image_id), image


class _ToRecord(beam.DoFn):
    """`((key, image_id), (boxes, scores))` -> `ImageRecord`, after the checks the local runner
    makes (shapes, finite values, normalized boxes)."""

    def process(self, element):
        (key, image_id), (boxes, scores) = element
        problem = None
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 2 or \
                scores.shape[0] != boxes.shape[0]:
            problem = (f"raw outputs must be [N, 4] and [N, C], got {list(boxes.shape)} and "
                       f"{list(scores.shape)}")
        elif not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            problem = "raw outputs hold NaN or inf"
        else:
            try:
                check_boxes_normalized(boxes)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            yield beam.pvalue.TaggedOutput(_FAILED, (image_id, problem))
            return
        beam.metrics.Metrics.counter("tfcal", "images_kept").inc()
        yield ImageRecord(key, int(image_id), boxes, scores)


class ShardCombineFn(beam.CombineFn):
    """Combines `ImageRecord`s into shards on disk (`ShardAccumulator`: bounded memory, exact
    merge by concatenation); the output is every `ShardEntry`."""

    def __init__(self, store: str, shard_images: int):
        self.store = store
        self.shard_images = shard_images

    def create_accumulator(self):
        return ShardAccumulator(self.store, self.shard_images)

    def add_input(self, accumulator, record):
        return accumulator.add(record)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for other in accumulators:
            merged.merge(other)
        return merged

    def compact(self, accumulator):
        # Before an accumulator leaves its worker: its records go to a shard, only names travel.
        accumulator.spill()
        return accumulator

    def extract_output(self, accumulator):
        return accumulator.finish()


def _failed_batch(element):
    """A dead-letter batch of RunInference -> `(image id, reason)` per image of it. Beam gives
    the error as `(exception class, repr, traceback lines)` (or the exception itself)."""
    batch, error = element
    if isinstance(error, tuple) and len(error) >= 2:
        reason = str(error[1])
    else:
        reason = repr(error)
    return [(image_id, f"detector failed: {reason.splitlines()[0] if reason else '?'}")
            for (_, image_id), _ in batch]


def _write_result(value, path: str):
    atomic.write_json(path, value)


def build(p, todo_path: Path, model: ModelConfig, store: Path, shard_images: int,
          result_path: Path) -> None:
    """Adds the detector pass to the pipeline `p`.

    `todo_path` is a JSON-lines file of `[key, image_id, path, height, width]`, one image a
    line (read by the workers, split by Beam: the job graph stays small however many images
    there are). When the pipeline has run, ``<result_path>.shards`` holds the committed shard
    entries `[[name, [key, ...]], ...]` and ``<result_path>.failed`` the failures
    `[[image id, reason], ...]`.
    """
    decoded = (p | "images" >> beam.io.ReadFromText(str(todo_path))
               | "parse" >> beam.Map(lambda line: tuple(json.loads(line)))
               | "spread" >> beam.Reshuffle()
               | "decode" >> beam.ParDo(_Decode()).with_outputs(_FAILED, main="images"))
    inferred, dead = (decoded.images
                      | "detector" >> RunInference(KeyedModelHandler(DetectorModelHandler(model)))
                      .with_exception_handling())
    records = inferred | "record" >> beam.ParDo(_ToRecord()).with_outputs(_FAILED, main="records")
    (records.records
     | "shards" >> beam.CombineGlobally(ShardCombineFn(str(store), shard_images))
     | "shard entries" >> beam.Map(lambda entries: [[e.name, list(e.image_keys)]
                                                    for e in entries])
     | "write shards" >> beam.Map(_write_result, str(result_path) + ".shards"))
    failed_inference = dead.failed_inferences | "failed batches" >> beam.FlatMap(_failed_batch)
    ((decoded[_FAILED], records[_FAILED], failed_inference)
     | "failures" >> beam.Flatten()
     | "failure list" >> beam.combiners.ToList()
     | "write failures" >> beam.Map(_write_result, str(result_path) + ".failed"))


def _counters(result) -> dict[str, int]:
    """tfcal's Beam counters of a finished pipeline (runners that report none give {})."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("tfcal"))
    except (AttributeError, NotImplementedError):  # pragma: no cover - runner-dependent
        return {}
    return {c.key.metric.name: int(c.committed if c.committed is not None else c.attempted)
            for c in query["counters"]}


def run(todo: Sequence[tuple], model: ModelConfig, store: Path, *, shard_images: int,
        beam_options: Sequence[str]) -> tuple[list[ShardEntry], list[tuple[int, str]]]:
    """Runs the detector pass over `todo` on the runner `beam_options` name.

    Returns:
      `(shard entries committed, [(image id, reason)] of the images that failed)`.
    """
    flags = list(beam_options) or list(DEFAULT_OPTIONS)
    result_path = store / "runs" / f"run-{secrets.token_hex(8)}"
    todo_path = Path(str(result_path) + ".todo.jsonl")
    atomic.write_text(todo_path, "".join(json.dumps(list(t)) + "\n" for t in todo))
    start = time.perf_counter()
    try:
        p = beam.Pipeline(options=PipelineOptions(flags))
        build(p, todo_path, model, store, shard_images, result_path)
        result = p.run()
        result.wait_until_finish()
        counts = _counters(result)
        shards = json.loads(Path(str(result_path) + ".shards").read_text(encoding="utf-8"))
        failed = json.loads(Path(str(result_path) + ".failed").read_text(encoding="utf-8"))
    finally:
        for part in (".todo.jsonl", ".shards", ".failed"):
            Path(str(result_path) + part).unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    log.info("beam 2/3: detector pass (%s): %d images decoded, %d kept, %d failed, %d "
             "shards, in %.1f s (%.1f images/s)", " ".join(flags),
             counts.get("images_decoded", len(todo)), counts.get("images_kept", len(todo)),
             len(failed), len(shards), elapsed, len(todo) / max(elapsed, 1e-9))
    entries = [ShardEntry(str(name), tuple(keys)) for name, keys in shards]
    return entries, sorted((int(i), str(r)) for i, r in failed)
