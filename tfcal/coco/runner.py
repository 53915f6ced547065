"""Runs a TF OD API-style SavedModel over a COCO dataset's images and caches its raw outputs.

The signature (default ``serving_default``) takes one uint8 image tensor
`[1 or None, None, None, 3]` (default key ``input_tensor``) and returns pre-NMS boxes
float32 `[B, N, 4]` (``raw_detection_boxes``) and scores float32 `[B, N, C]`
(``raw_detection_scores``). Images are decoded in parallel with tf.data and prefetched; they
are batched when the signature's batch dimension is None and every image has the same size.
Outputs are cached by `tfcal.coco.cache` under a fingerprint of the model and the data, so
re-tuning never re-runs the detector. With a cache folder, each batch of outputs is written
straight into the cache's memory-mapped ``.npy`` files, so memory stays at one batch however
many images there are (never `[I, N, C]` in memory); the result is read back memory-mapped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from tfcal import TfcalError
from tfcal.coco import cache as cache_lib
from tfcal.coco.cache import RawOutputs
from tfcal.detectors.odapi import load_saved_model, read_signature

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


def check_signature(model: Any, path: Path, keys: SignatureKeys,
                    num_score_columns: int | None = None):
    """Returns ``(signature_fn, batchable)`` after checking names (`read_signature`, shared
    with the exporter) and what the runner can run: dtypes and ranks.

    Raises:
      TfcalError: naming the model path and key, for a missing signature, input or output, a
        wrong dtype or rank, or a score-column count different from `num_score_columns`.
    """
    sig = read_signature(model, path, signature_key=keys.signature, raw_boxes_key=keys.raw_boxes,
                         raw_scores_key=keys.raw_scores, input_key=keys.input)
    fn, where, spec = sig.fn, sig.where, sig.input_spec
    shape = spec.shape
    if spec.dtype.name != "uint8" or shape.rank != 4 or shape[3] not in (None, 3):
        raise TfcalError(f"{where}: input {keys.input!r} must be uint8 [1|None, None, None, 3], "
                         f"got {spec.dtype.name} {shape}")
    if shape[0] not in (None, 1):
        raise TfcalError(f"{where}: input {keys.input!r} batch dimension must be 1 or None, got "
                         f"{shape[0]}")
    b, s = sig.raw_boxes_shape, sig.raw_scores_shape
    if b.rank != 3 or b[2] not in (None, 4):
        raise TfcalError(f"{where}: output {keys.raw_boxes!r} must be [B, N, 4], got {b}")
    if s.rank != 3:
        raise TfcalError(f"{where}: output {keys.raw_scores!r} must be [B, N, C], got {s}")
    if b[1] is not None and s[1] is not None and b[1] != s[1]:
        raise TfcalError(f"{where}: outputs {keys.raw_boxes!r} {b} and {keys.raw_scores!r} {s} "
                         f"disagree on N")
    if num_score_columns is not None and s[2] is not None and s[2] != num_score_columns:
        raise TfcalError(f"{where}: output {keys.raw_scores!r} has {s[2]} score columns, "
                         f"expected {num_score_columns}")
    return fn, shape[0] is None


def run_detector(
    saved_model_dir: str | Path,
    dataset,
    *,
    keys: SignatureKeys = SignatureKeys(),
    num_score_columns: int | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    content_hash: bool = False,
    progress: bool = True,
) -> RawOutputs:
    """Raw outputs of a SavedModel for every image of `dataset`, from the cache when valid.

    Args:
      saved_model_dir: the SavedModel folder.
      dataset: a `CocoDataset` loaded with `images_dir`.
      keys: signature, input and output names.
      num_score_columns: C expected by the category mapping (raw columns, background included);
        None: not checked.
      batch_size: images per call when the signature allows batching and all images share a
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
    path = Path(saved_model_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (path / "saved_model.pb").is_file():
        raise TfcalError(f"{path}: not a SavedModel folder (no saved_model.pb)")
    if dataset.image_paths is None:
        raise TfcalError(f"{dataset.path}: images folder not given; cannot run the detector")
    model_fp = cache_lib.model_fingerprint(path, keys=keys.as_tuple())
    data_fp = cache_lib.data_fingerprint(dataset, content_hash=content_hash)
    fingerprint = cache_lib.combined_fingerprint(model_fp, data_fp)
    target = None
    if cache_dir is not None:
        target = cache_lib.cache_path(cache_dir, fingerprint)
        cached = cache_lib.load_cache(target, fingerprint, dataset, num_score_columns)
        if cached is not None:
            return cached

    model = load_saved_model(path)
    fn, batchable = check_signature(model, path, keys, num_score_columns)
    sizes = set(zip(dataset.image_heights.tolist(), dataset.image_widths.tolist()))
    batch = batch_size if batchable and len(sizes) == 1 else 1
    with cache_lib.RawOutputsWriter(
            target, image_ids=dataset.image_ids, image_heights=dataset.image_heights,
            image_widths=dataset.image_widths, fingerprint=fingerprint,
            model_fingerprint=model_fp, data_fingerprint=data_fp) as writer:
        _run(fn, path, dataset, keys, batch, progress, writer)
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


def _run(fn, path: Path, dataset, keys: SignatureKeys, batch: int, progress: bool,
         writer: cache_lib.RawOutputsWriter) -> None:
    """Runs `fn` over the dataset's images, appending each batch's checked outputs to
    `writer`."""
    import tensorflow as tf
    from tqdm.auto import tqdm

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
                out = fn(**{keys.input: images})
                b = out[keys.raw_boxes].numpy()
                s = out[keys.raw_scores].numpy()
                if b.ndim != 3 or s.ndim != 3 or b.shape[2] != 4 or b.shape[:2] != s.shape[:2] \
                        or b.shape[0] != k:
                    raise TfcalError(f"{path}: outputs {keys.raw_boxes!r} {list(b.shape)} and "
                                     f"{keys.raw_scores!r} {list(s.shape)} must be [{k}, N, 4] "
                                     f"and [{k}, N, C]")
                if b.size and (b.min() < -cache_lib.BOX_TOLERANCE or
                               b.max() > 1.0 + cache_lib.BOX_TOLERANCE):  # found at once
                    raise TfcalError(f"{path}: output {keys.raw_boxes!r}: must be normalized "
                                     f"[ymin, xmin, ymax, xmax] in [0, 1] (pixel coordinates?), "
                                     f"got values in [{b.min():.4g}, {b.max():.4g}] for "
                                     f"{paths[done:done + k]}")
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
