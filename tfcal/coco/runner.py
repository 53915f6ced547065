"""Runs any `Detector` over a COCO dataset's images and caches its raw outputs.

The detector comes through the seam (`tfcal.detectors.open_detector`): decoded RGB images in,
normalized pre-NMS boxes float32 `[B, N, 4]` and scores float32 `[B, N, C]` out. Images are
decoded in parallel with tf.data and prefetched; they are batched when the detector is
`batchable` and every image has the same size. Outputs are cached by `tfcal.raw.cache` under
a fingerprint of the model (`Detector.fingerprint`) and the data, so re-tuning never re-runs
the detector, and a cache hit never loads it. With a cache folder, each batch of outputs is
written straight into the cache's memory-mapped ``.npy`` files, so memory stays at one batch
however many images there are (never `[I, N, C]` in memory); the result is read back
memory-mapped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from tfcal import TfcalError
from tfcal.detectors.base import Detector
from tfcal.detectors.odapi import OdapiDetector
from tfcal.handoff import DetectorDescription
from tfcal.raw import RawOutputs, RawOutputsWriter, cache_path, checks, load_cache
from tfcal.raw.fingerprint import combined_fingerprint, data_fingerprint

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SignatureKeys:
    """Names of the signature and tensors to use (OD API export defaults)."""

    signature: str = "serving_default"
    input: str = "input_tensor"
    raw_boxes: str = "raw_detection_boxes"
    raw_scores: str = "raw_detection_scores"

    def as_tuple(self) -> tuple[str, str, str, str]:
        return (self.signature, self.input, self.raw_boxes, self.raw_scores)


def run_detector(
    detector: Detector | str | Path,
    dataset,
    *,
    keys: SignatureKeys = SignatureKeys(),
    num_score_columns: int | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    content_hash: bool = False,
    progress: bool = True,
) -> RawOutputs:
    """Raw outputs of a detector for every image of `dataset`, from the cache when valid.

    Args:
      detector: a `Detector` (`tfcal.detectors.open_detector`), or an OD API SavedModel folder
        read with `keys`.
      dataset: a `CocoDataset` loaded with `images_dir`.
      keys: signature, input and output names, for a SavedModel folder.
      num_score_columns: C expected by the category mapping (raw columns, background included);
        None: not checked.
      batch_size: images per call when the detector is batchable and all images share a
        size; otherwise 1.
      cache_dir: where to cache; None: no cache, and the outputs are held in memory
        (float32 `[I, N, C]`: fine for small sets; give a folder for large ones).
      content_hash: fingerprint the images by their bytes instead of size and mtime.
      progress: show a tqdm bar (images/s).

    Returns:
      `RawOutputs` in the dataset's image order; with `cache_dir`, its `boxes` and `scores`
      are read-only memory maps of the cache.

    Raises:
      TfcalError: a bad model or signature (naming the path and key), images without paths,
        non-finite outputs, or an image whose decoded size differs from the JSON.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(detector, Detector):
        detector = OdapiDetector(DetectorDescription(
            saved_model=str(detector), signature=keys.signature, input=keys.input,
            raw_boxes=keys.raw_boxes, raw_scores=keys.raw_scores), num_score_columns)
    if dataset.image_paths is None:
        raise TfcalError(f"{dataset.path}: images folder not given; cannot run the detector")
    model_fp = detector.fingerprint()
    data_fp = data_fingerprint(dataset, content_hash=content_hash)
    fingerprint = combined_fingerprint(model_fp, data_fp)
    target = None
    if cache_dir is not None:
        target = cache_path(cache_dir, fingerprint)
        cached = load_cache(target, fingerprint, dataset, num_score_columns)
        if cached is not None:
            return cached

    columns = detector.num_score_columns
    if num_score_columns is not None and columns is not None and columns != num_score_columns:
        raise TfcalError(f"{detector.source}: {columns} score columns, expected "
                         f"{num_score_columns}")
    sizes = set(zip(dataset.image_heights.tolist(), dataset.image_widths.tolist()))
    batch = batch_size if detector.batchable and len(sizes) == 1 else 1
    with RawOutputsWriter(
            target, image_ids=dataset.image_ids, image_heights=dataset.image_heights,
            image_widths=dataset.image_widths, fingerprint=fingerprint,
            model_fingerprint=model_fp, data_fingerprint=data_fp) as writer:
        _run(detector, dataset, batch, progress, writer)
        raw = writer.commit()
    if target is not None:
        logger.info("cached raw outputs in %s", target)
    return raw


def _image_pipeline(paths: list[str], batch: int):
    import tensorflow as tf

    def decode(p):
        img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        return img

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def _run(detector: Detector, dataset, batch: int, progress: bool,
         writer: RawOutputsWriter) -> None:
    """Runs `detector` over the dataset's images, appending each batch's checked outputs to
    `writer`."""
    import tensorflow as tf
    from tqdm.auto import tqdm

    path = detector.source
    paths = [str(p) for p in dataset.image_paths]
    n = len(paths)
    done = 0
    start = time.perf_counter()
    with tqdm(total=n, unit="img", desc="detector", disable=not progress) as bar:
        try:
            for images in _image_pipeline(paths, batch):
                k = int(images.shape[0])
                for j in range(k):
                    h, w = int(images.shape[1]), int(images.shape[2])
                    if (h, w) != (dataset.image_heights[done + j], dataset.image_widths[done + j]):
                        raise TfcalError(
                            f"{dataset.path}: images[{done + j}]: decoded size {h}x{w} differs "
                            f"from the JSON height x width {dataset.image_heights[done + j]}x"
                            f"{dataset.image_widths[done + j]} ({paths[done + j]})")
                arrays = list(images.numpy())
                b, s = detector(arrays)
                try:  # found at once, before anything is written
                    checks.check_boxes_normalized(
                        b, f"output {detector.description.raw_boxes!r}")
                except ValueError as e:
                    raise TfcalError(f"{path}: {e} for {paths[done:done + k]}") from None
                try:  # the writer checks row shapes against the first batch, and finiteness
                    writer.append(b, s)
                except ValueError as e:
                    raise TfcalError(f"{path}: raw outputs for {paths[done:done + k]}: "
                                     f"{e}") from None
                done += k
                bar.update(k)
        except tf.errors.InvalidArgumentError as e:
            raise TfcalError(f"{dataset.path}: images[{done}]: cannot decode or run "
                             f"({paths[min(done, n - 1)]}): {str(e).splitlines()[0]}") from None
    elapsed = time.perf_counter() - start
    logger.info("ran %s on %d images in %.1f s (%.1f images/s, batch %d)", path, n, elapsed,
                n / max(elapsed, 1e-9), batch)
