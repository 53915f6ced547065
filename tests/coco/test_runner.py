"""Tests for tfcal.coco.runner: a tiny OD API-form SavedModel built here, batching, signature
checks, the cache round trip and its memory bound, and (where present) the shared NanoDet
model."""

import json
import logging
import tracemalloc

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.coco import runner
from tfcal.coco.dataset import CategoryMapping, load_coco
from tfcal.coco.boxes import normalized_to_coco_xywh
from tfcal.coco.runner import SignatureKeys, run_detector
from tfcal.raw import data_fingerprint, load_cache, model_fingerprint

from .cocogen import SHARED, edit_cache_meta, write_images, write_json

tf = pytest.importorskip("tensorflow")

NUM_BOXES = 6
NUM_COLUMNS = 4  # background + 3 classes
_GRID = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5],
                  [0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75], [0.1, 0.1, 0.3, 0.9]],
                 dtype=np.float32)


def reference_outputs(image: np.ndarray):
    """What the tiny detector computes for one uint8 `[H, W, 3]` image (NumPy mirror)."""
    mean = image.astype(np.float32).mean(axis=(0, 1)) / 255.0  # [3]
    boxes = np.clip(_GRID * 0.9 + 0.05 * mean[0], 0.0, 1.0)
    k = np.arange(NUM_BOXES, dtype=np.float32)[:, None]
    logits = (k - 2.5) * mean[None, :] * 4.0 + np.arange(3, dtype=np.float32) * 0.1
    scores = 1.0 / (1.0 + np.exp(-logits))
    return boxes, np.concatenate([np.zeros((NUM_BOXES, 1), np.float32), scores], axis=1)


class TinyDetector(tf.Module):
    """OD API-form outputs, deterministic from each image's mean colour."""

    def _outputs(self, images):
        mean = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2]) / 255.0  # [B, 3]
        grid = tf.constant(_GRID)[None]  # [1, N, 4]
        boxes = tf.clip_by_value(grid * 0.9 + 0.05 * mean[:, None, :1], 0.0, 1.0)
        k = tf.range(NUM_BOXES, dtype=tf.float32)[None, :, None]
        logits = (k - 2.5) * mean[:, None, :] * 4.0 + tf.range(3, dtype=tf.float32) * 0.1
        scores = tf.sigmoid(logits)
        background = tf.zeros_like(scores[..., :1])
        return boxes, tf.concat([background, scores], axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve(self, input_tensor):
        boxes, scores = self._outputs(input_tensor)
        return {"raw_detection_boxes": boxes, "raw_detection_scores": scores,
                "detection_boxes": boxes[:, :2]}

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve_one(self, input_tensor):
        boxes, scores = self._outputs(input_tensor)
        return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve_flat_boxes(self, input_tensor):
        boxes, scores = self._outputs(input_tensor)
        return {"raw_detection_boxes": tf.reshape(boxes, [-1, 4]),
                "raw_detection_scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                name="input_tensor")])
    def serve_float(self, input_tensor):
        boxes, scores = self._outputs(input_tensor)
        return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve_pixel_boxes(self, input_tensor):
        # The fault corpus' "pixel boxes" model: [ymin, xmin, ymax, xmax] times the image size.
        boxes, scores = self._outputs(input_tensor)
        size = tf.cast(tf.shape(input_tensor)[1:3], tf.float32)
        return {"raw_detection_boxes": boxes * tf.tile(size, [2])[None, None],
                "raw_detection_scores": scores}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny_detector"
    m = TinyDetector()
    tf.saved_model.save(m, str(path), signatures={
        "serving_default": m.serve.get_concrete_function(),
        "batch_one": m.serve_one.get_concrete_function(),
        "flat_boxes": m.serve_flat_boxes.get_concrete_function(),
        "float_input": m.serve_float.get_concrete_function(),
        "pixel_boxes": m.serve_pixel_boxes.get_concrete_function(),
    })
    return path


def _gt(sizes):
    images = [{"id": 10 + i, "file_name": f"im{i}.png", "width": w, "height": h}
              for i, (h, w) in enumerate(sizes)]
    return {"images": images, "annotations": [],
            "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]}


def _dataset(tmp_path, sizes, fmt=("PNG",), seed=0):
    gt = _gt(sizes)
    write_images(tmp_path / "images", gt, seed, fmt_cycle=fmt)
    return load_coco(write_json(tmp_path / "instances.json", gt), tmp_path / "images")


def _pixels(ds):
    from PIL import Image
    return [np.asarray(Image.open(p).convert("RGB")) for p in ds.image_paths]


@pytest.mark.parametrize("signature,sizes", [
    ("serving_default", [(20, 30)] * 5),  # batched (batch 2: 2 + 2 + 1)
    ("serving_default", [(20, 30), (24, 16), (20, 30)]),  # mixed sizes: batch 1
    ("batch_one", [(20, 30)] * 3),  # the signature forces batch 1
    ("float_input", [(20, 30)] * 2),  # float32 images in [0, 255]: the same outputs
])
def test_outputs_match_reference(tmp_path, saved_model, signature, sizes):
    ds = _dataset(tmp_path, sizes)
    raw = run_detector(saved_model, ds, keys=SignatureKeys(signature=signature), batch_size=2,
                       num_score_columns=NUM_COLUMNS, progress=False)
    assert raw.boxes.shape == (len(sizes), NUM_BOXES, 4) and raw.boxes.dtype == np.float32
    assert raw.scores.shape == (len(sizes), NUM_BOXES, NUM_COLUMNS)
    assert raw.image_ids.tolist() == ds.image_ids.tolist()
    for i, img in enumerate(_pixels(ds)):
        boxes, scores = reference_outputs(img)
        np.testing.assert_allclose(raw.boxes[i], boxes, atol=1e-6)
        np.testing.assert_allclose(raw.scores[i], scores, atol=1e-6)
    xywh = normalized_to_coco_xywh(raw.boxes, raw.image_heights, raw.image_widths)
    np.testing.assert_allclose(xywh[0, 0, 2], (raw.boxes[0, 0, 3] - raw.boxes[0, 0, 1]) * 30,
                               rtol=1e-6)


def test_batching_choice(tmp_path, saved_model, monkeypatch):
    seen = []
    real = runner._image_pipeline
    monkeypatch.setattr(runner, "_image_pipeline",
                        lambda paths, batch: seen.append(batch) or real(paths, batch))
    ds = _dataset(tmp_path, [(16, 16)] * 3, fmt=("PNG", "JPEG"))
    run_detector(saved_model, ds, batch_size=4, progress=False)
    run_detector(saved_model, ds, keys=SignatureKeys(signature="batch_one"), batch_size=4,
                 progress=False)
    assert seen == [4, 1]


@pytest.mark.parametrize("keys,num_columns,message", [
    (SignatureKeys(signature="nope"), None, r"signature 'nope' not found \(has \['batch_one'"),
    (SignatureKeys(input="images"), None, r"input 'images' not found"),
    (SignatureKeys(raw_scores="scores"), None, r"output 'scores' not found"),
    (SignatureKeys(signature="flat_boxes"), None,
     r"output 'raw_detection_boxes' must be \[B, N, 4\]"),
    (SignatureKeys(), 91, r"has 4 score columns, expected 91"),
])
def test_bad_signature(tmp_path, saved_model, keys, num_columns, message):
    ds = _dataset(tmp_path, [(16, 16)])
    with pytest.raises(TfcalError, match=message) as err:
        run_detector(saved_model, ds, keys=keys, num_score_columns=num_columns, progress=False)
    assert str(err.value).startswith(str(saved_model))


def test_not_a_saved_model(tmp_path):
    ds = _dataset(tmp_path, [(16, 16)])
    with pytest.raises(TfcalError, match="not a SavedModel folder"):
        run_detector(tmp_path, ds, progress=False)


def test_decoded_size_must_match_json(tmp_path, saved_model):
    ds = _dataset(tmp_path, [(16, 16), (20, 16)])
    gt = json.loads(ds.path.read_text())
    gt["images"][1]["height"] = 21
    bad = load_coco(write_json(tmp_path / "bad.json", gt), tmp_path / "images")
    with pytest.raises(TfcalError, match=r"images\[1\]: decoded size 20x16 differs"):
        run_detector(saved_model, bad, progress=False)


class _CountingLoads:
    """Counts model loads (a cache hit must load nothing)."""

    def __init__(self, monkeypatch):
        from tfcal.detectors import odapi

        self.calls = 0
        real = odapi.load_saved_model

        def load(path):
            self.calls += 1
            return real(path)
        monkeypatch.setattr(odapi, "load_saved_model", load)


def _cache_entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir())



@pytest.mark.slow
def test_cache_hit_stale_and_corrupt(tmp_path, saved_model, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="tfcal.coco")
    loads = _CountingLoads(monkeypatch)
    ds = _dataset(tmp_path, [(16, 16), (20, 12)], fmt=("PNG", "JPEG"))
    cache_dir = tmp_path / "cache"
    first = run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    entries = _cache_entries(cache_dir)
    assert loads.calls == 1 and len(entries) == 1  # no temporary left beside the cache
    path = cache_dir / entries[0]
    assert entries[0].startswith("raw_outputs-") and first.fingerprint.startswith(entries[0][12:])
    assert isinstance(first.scores, np.memmap) and not first.scores.flags.writeable

    hit = run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    assert loads.calls == 1  # the detector was not re-run
    np.testing.assert_array_equal(hit.scores, first.scores)
    np.testing.assert_array_equal(hit.boxes, first.boxes)
    assert hit.fingerprint == first.fingerprint and len(hit.fingerprint) == 64

    # Stale: the cache holds another fingerprint.
    edit_cache_meta(path, fingerprint="0" * 64)
    run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    assert loads.calls == 2 and "stale raw-output cache" in caplog.text

    # Corrupt: a truncated .npy file, then missing metadata.
    data = (path / "scores.npy").read_bytes()
    (path / "scores.npy").write_bytes(data[: len(data) // 2])
    run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    assert loads.calls == 3 and "corrupt raw-output cache" in caplog.text
    assert "scores.npy: " in caplog.text and "(truncated or overwritten)" in caplog.text
    (path / "meta.json").unlink()
    run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    assert loads.calls == 4 and "meta.json: missing" in caplog.text
    final = run_detector(saved_model, ds, cache_dir=cache_dir, progress=False)
    assert loads.calls == 4 and _cache_entries(cache_dir) == entries
    np.testing.assert_array_equal(final.scores, first.scores)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_no_cache(tmp_path, saved_model, monkeypatch, error):
    ds = _dataset(tmp_path, [(16, 16)] * 4)
    cache_dir = tmp_path / "cache"
    real = runner._image_pipeline

    def interrupted(paths, batch):
        for i, images in enumerate(real(paths, batch)):
            if i == 1:  # after one batch is written into the cache's files
                assert len(_cache_entries(cache_dir)) == 1  # only the temporary directory
                raise error("interrupted")
            yield images
    monkeypatch.setattr(runner, "_image_pipeline", interrupted)
    with pytest.raises(error):
        run_detector(saved_model, ds, batch_size=2, cache_dir=cache_dir, progress=False)
    assert _cache_entries(cache_dir) == []
    monkeypatch.setattr(runner, "_image_pipeline", real)
    raw = run_detector(saved_model, ds, batch_size=2, cache_dir=cache_dir, progress=False)
    assert raw.scores.shape == (4, NUM_BOXES, NUM_COLUMNS)
    assert len(_cache_entries(cache_dir)) == 1


# A detector with wide outputs, so that [I, N, C] is large while each image stays tiny.
WIDE_BOXES, WIDE_COLUMNS, WIDE_IMAGES = 1600, 128, 256  # scores: 256 * 1600 * 128 * 4 B = 210 MB


class WideDetector(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                name="input_tensor")])
    def serve(self, input_tensor):
        mean = tf.reduce_mean(tf.cast(input_tensor, tf.float32), axis=[1, 2, 3]) / 255.0  # [B]
        b = tf.shape(input_tensor)[0]
        ramp = tf.range(WIDE_BOXES * WIDE_COLUMNS, dtype=tf.float32) / (WIDE_BOXES * WIDE_COLUMNS)
        scores = tf.reshape(tf.sigmoid(mean[:, None] - ramp[None]),
                            [b, WIDE_BOXES, WIDE_COLUMNS])
        boxes = tf.broadcast_to(tf.constant([0.1, 0.2, 0.6, 0.7]) * mean[:, None, None],
                                [b, WIDE_BOXES, 4])
        return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}


def _resident_mb() -> float:
    """Current resident set size (MB) from /proc, or 0.0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except OSError:
        return 0.0


@pytest.mark.slow
def test_memory_is_bounded_by_a_batch(tmp_path):
    model_dir = tmp_path / "wide_detector"
    m = WideDetector()
    tf.saved_model.save(m, str(model_dir), signatures={"serving_default": m.serve})
    ds = _dataset(tmp_path, [(4, 4)] * WIDE_IMAGES)
    full = WIDE_IMAGES * WIDE_BOXES * WIDE_COLUMNS * 4
    batch = 16 * WIDE_BOXES * WIDE_COLUMNS * 4  # one batch of scores: 13 MB

    # tracemalloc sees every NumPy allocation; the old runner held the whole [I, N, C] array.
    tracemalloc.start()
    try:
        raw = run_detector(model_dir, ds, batch_size=16, cache_dir=tmp_path / "cache",
                           progress=False)
        _, written_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        rss_before = _resident_mb()
        total = 0.0
        for start in range(0, WIDE_IMAGES, 32):  # the tuner's access pattern: rows by index
            idx = np.arange(start, min(start + 32, WIDE_IMAGES))
            total += float(raw.scores[idx][:, 0, 0].sum())
        _, read_peak = tracemalloc.get_traced_memory()
        rss_growth = _resident_mb() - rss_before
    finally:
        tracemalloc.stop()
    assert raw.scores.shape == (WIDE_IMAGES, WIDE_BOXES, WIDE_COLUMNS)
    assert raw.scores.nbytes == full
    # Measured: about 27 MB writing and 27 MB reading (old runner: 450 MB writing), of 210 MB.
    assert written_peak < 3 * batch < full / 5, (written_peak, full)
    assert read_peak < 3 * batch, (read_peak, full)
    # Pages read through the map are unmapped after each read (else RSS grows by 210 MB).
    assert rss_growth < 3 * batch / 2**20, rss_growth
    means = np.array([img.astype(np.float32).mean() / 255.0 for img in _pixels(ds)])
    np.testing.assert_allclose(total, (1.0 / (1.0 + np.exp(-means))).sum(), rtol=1e-5)
    np.testing.assert_allclose(raw.boxes[-1, -1], np.float32([0.1, 0.2, 0.6, 0.7]) * means[-1],
                               rtol=1e-5)


def test_fingerprint_follows_model_keys_and_data(tmp_path, saved_model):
    ds = _dataset(tmp_path, [(16, 16)])
    base = model_fingerprint(saved_model, keys=SignatureKeys().as_tuple())
    other = model_fingerprint(saved_model,
                                        keys=SignatureKeys(signature="batch_one").as_tuple())
    assert base != other
    d0 = data_fingerprint(ds)
    c0 = data_fingerprint(ds, content_hash=True)
    ds.image_paths[0].write_bytes(ds.image_paths[0].read_bytes() + b"\0")  # touched image
    assert data_fingerprint(ds) != d0
    assert data_fingerprint(ds, content_hash=True) != c0


NANODET = SHARED / "models" / "nanodet_odapi"
TINY = SHARED / "data" / "coco_val2017_tiny"


@pytest.mark.slow
def test_nanodet_on_three_real_images(tmp_path):
    if not (NANODET.is_dir() and TINY.is_dir()):
        pytest.skip(f"shared model or data not present ({NANODET}, {TINY})")
    gt = json.loads((TINY / "instances_val2017.json").read_text())
    gt["images"] = gt["images"][:3]
    keep = {img["id"] for img in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    ds = load_coco(write_json(tmp_path / "three.json", gt), TINY / "images")
    mapping = CategoryMapping.odapi(ds, num_classes=90)
    raw = run_detector(NANODET, ds, num_score_columns=mapping.num_classes + 1,
                       cache_dir=tmp_path / "cache", progress=False)
    assert raw.boxes.shape == (3, 3549, 4) and raw.scores.shape == (3, 3549, 91)
    assert np.all(raw.scores[..., 0] == 0.0)  # background column
    assert 0.0 <= raw.scores.min() and raw.scores.max() <= 1.0
    # The best-scoring raw box of some annotated class overlaps its ground truth.
    from tfcal.coco.matching import Detections, match_detections
    best = raw.scores[..., 1:].reshape(3, -1).argmax(axis=1)
    box_row, col = np.divmod(best, 90)
    xywh = normalized_to_coco_xywh(raw.boxes, raw.image_heights,
                                   raw.image_widths)[np.arange(3), box_row]
    dets = Detections.from_arrays(raw.image_ids, mapping.columns_to_category_ids(col), xywh,
                                  raw.scores[np.arange(3), box_row, col + 1])
    assert match_detections(ds, dets, iou_threshold=0.5).tp.sum() >= 2


def test_pixel_boxes_are_refused_at_the_first_batch(tmp_path, saved_model):
    # Fault corpus: a model returning pixel boxes used to tune to TP 0 with exit 0.
    ds = _dataset(tmp_path, [(20, 30)] * 3)
    with pytest.raises(TfcalError, match=r"tiny_detector: output 'raw_detection_boxes': must "
                                         r"be normalized .*pixel coordinates.*got values in "
                                         r"\[\d.*, 2\d\.?\d*\]"):
        run_detector(saved_model, ds, keys=SignatureKeys(signature="pixel_boxes"),
                     cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())  # no cache of the bad outputs


def test_cache_changed_in_place_is_rebuilt(tmp_path, saved_model, caplog):
    # Fault corpus: 50 scores set to 0.99 and one NaN inside scores.npy (same length) were
    # read back silently. Now every load rehashes the data: the damage is seen and the
    # detector runs again, giving the true outputs.
    ds = _dataset(tmp_path, [(20, 30)] * 4)
    first = run_detector(saved_model, ds, cache_dir=tmp_path / "cache", progress=False)
    expected = np.array(first.scores)
    (path,) = (tmp_path / "cache").iterdir()
    header = json.loads((path / "meta.json").read_text())["arrays"]["scores"]["header_bytes"]
    with open(path / "scores.npy", "r+b") as f:
        f.seek(header)
        f.write(np.full(50, 0.99, np.float32).tobytes())
        f.write(np.float32(np.nan).tobytes())
    del first
    caplog.set_level(logging.INFO)
    again = run_detector(saved_model, ds, cache_dir=tmp_path / "cache", progress=False)
    assert "scores.npy: data bytes changed since written" in caplog.text
    assert "recomputing" in caplog.text
    np.testing.assert_array_equal(again.scores, expected)
    assert load_cache(path, json.loads((path / "meta.json").read_text())[
        "fingerprint"], ds) is not None  # the rebuilt cache verifies
