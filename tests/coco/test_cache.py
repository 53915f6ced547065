"""Tests for tfcal.coco.cache: precomputed raw outputs, box conversion, atomic npz writes."""

import numpy as np
import pytest

from tfcal import TfcalError, TfcalWarning
from tfcal.coco.cache import (RawOutputs, load_cache, load_raw_outputs, normalized_to_coco_xywh,
                              save_cache, save_npz_atomic)
from tfcal.coco.dataset import load_coco

from .cocogen import make_gt, write_json


@pytest.fixture
def dataset(tmp_path):
    gt = make_gt(0, num_images=4, num_categories=3)
    gt["images"][1]["width"], gt["images"][1]["height"] = 100, 50
    return load_coco(write_json(tmp_path / "instances.json", gt))


def _arrays(ds, seed=0, n=5, c=4):
    rng = np.random.default_rng(seed)
    i = ds.num_images
    y0, x0 = rng.uniform(0, 0.5, (2, i, n))
    boxes = np.stack([y0, x0, y0 + 0.3, x0 + 0.4], axis=-1).astype(np.float32)
    scores = rng.random((i, n, c)).astype(np.float32)
    return {"image_ids": ds.image_ids.copy(), "boxes": boxes, "scores": scores}


def test_load_precomputed_in_dataset_order(tmp_path, dataset):
    a = _arrays(dataset)
    perm = np.array([2, 0, 3, 1])
    extra = {"image_ids": np.append(a["image_ids"][perm], 999),  # one image not in the dataset
             "boxes": np.concatenate([a["boxes"][perm], a["boxes"][:1]]),
             "scores": np.concatenate([a["scores"][perm], a["scores"][:1]])}
    path = save_npz_atomic(tmp_path / "raw.npz", **extra)
    raw = load_raw_outputs(path, dataset, num_score_columns=4)
    assert raw.image_ids.tolist() == dataset.image_ids.tolist()
    np.testing.assert_array_equal(raw.boxes, a["boxes"])
    np.testing.assert_array_equal(raw.scores, a["scores"])
    assert raw.image_widths[1] == 100 and raw.image_heights[1] == 50
    assert len(raw.fingerprint) == 64
    sub = raw.subset([dataset.image_ids[3], dataset.image_ids[1]])
    np.testing.assert_array_equal(sub.scores, a["scores"][[3, 1]])


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.pop("scores"), r"missing arrays \['scores'\]"),
    (lambda a: a["scores"].__setitem__((1, 2, 3), np.nan), r"scores: non-finite value nan"),
    (lambda a: a["boxes"].__setitem__((0, 0, 0), np.inf), r"boxes: non-finite value inf"),
    (lambda a: a.__setitem__("image_ids", a["image_ids"][:3]), r"boxes: must be \[I=3, N, 4\]"),
    (lambda a: a.__setitem__("scores", a["scores"][:, :3]), r"scores: must be \[I=4, N=5, C\]"),
    (lambda a: a.__setitem__("scores", a["scores"][..., :3]),
     "expected 4 score columns, got 3"),
    (lambda a: a["image_ids"].__setitem__(0, 12345), r"1 dataset images missing, e\.g\. \[100\]"),
    (lambda a: a["image_ids"].__setitem__(1, a["image_ids"][0]), "repeated ids"),
    (lambda a: a["boxes"].__setitem__((0, 0), [10.0, 20.0, 300.0, 400.0]), "pixel coordinates"),
])
def test_bad_precomputed(tmp_path, dataset, edit, message):
    a = _arrays(dataset)
    edit(a)
    path = save_npz_atomic(tmp_path / "raw.npz", **a)
    with pytest.raises(TfcalError, match=message) as err:
        load_raw_outputs(path, dataset, num_score_columns=4)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_not_an_npz(tmp_path, dataset):
    path = tmp_path / "raw.npz"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(TfcalError, match="not a readable npz"):
        load_raw_outputs(path, dataset)


def test_slightly_out_of_range_boxes_are_clipped_with_warning(tmp_path, dataset):
    a = _arrays(dataset)
    a["boxes"][0, 0] = [-0.01, 0.2, 0.5, 1.02]
    path = save_npz_atomic(tmp_path / "raw.npz", **a)
    with pytest.warns(TfcalWarning, match="clipped"):
        raw = load_raw_outputs(path, dataset)
    np.testing.assert_array_equal(raw.boxes[0, 0], np.float32([0.0, 0.2, 0.5, 1.0]))


def test_normalized_to_coco_xywh():
    # ymin, xmin, ymax, xmax = 0.1, 0.2, 0.5, 0.6 on a 200 (h) x 100 (w) image:
    # x = 20, y = 20, width = 40, height = 80.
    out = normalized_to_coco_xywh(np.array([[[0.1, 0.2, 0.5, 0.6]]]), np.array([200]),
                                  np.array([100]))
    np.testing.assert_allclose(out, [[[20.0, 20.0, 40.0, 80.0]]])


def test_cache_round_trip_and_rejections(tmp_path, dataset):
    a = _arrays(dataset)
    raw = RawOutputs(a["image_ids"], a["boxes"], a["scores"], dataset.image_heights,
                     dataset.image_widths, "f" * 64, "m" * 64, "d" * 64)
    path = save_cache(tmp_path / "c" / "raw.npz", raw)
    back = load_cache(path, "f" * 64, dataset, num_score_columns=4)
    np.testing.assert_array_equal(back.scores, raw.scores)
    assert (back.model_fingerprint, back.data_fingerprint) == ("m" * 64, "d" * 64)
    assert load_cache(path, "e" * 64, dataset) is None  # stale
    assert load_cache(path, "f" * 64, dataset, num_score_columns=5) is None  # wrong columns
    assert load_cache(tmp_path / "none.npz", "f" * 64, dataset) is None  # absent
    other = RawOutputs(a["image_ids"][::-1].copy(), a["boxes"], a["scores"],
                       dataset.image_heights, dataset.image_widths, "f" * 64)
    save_cache(path, other)
    assert load_cache(path, "f" * 64, dataset) is None  # rows not in the dataset's order
