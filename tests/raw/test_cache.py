"""Tests for tfcal.raw: precomputed raw outputs, atomic npz writes, and
the memory-mapped cache directory (layout, validation on load, atomic and interrupted writes)."""

import json
import os
import re

import numpy as np
import pytest

from tfcal import TfcalError, TfcalWarning, atomic
from tfcal.raw import (RawOutputs, RawOutputsWriter, cache_path, load_cache, load_raw_outputs,
                       save_cache, save_npz_atomic)

from coco.cocogen import edit_cache_meta


def _smaller_second_image(gt):
    gt["images"][1]["width"], gt["images"][1]["height"] = 100, 50
    # Its boxes were drawn for 640 x 480: they would lie outside the smaller image.
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != gt["images"][1]["id"]]


#: The `dataset` fixture (tests/conftest.py): 4 images, the second one smaller than the others.
COCO_SET = {"seed": 0, "num_images": 4, "num_categories": 3, "edit": _smaller_second_image}


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


FP = "f" * 64


def _raw(ds, seed=0, **kw):
    a = _arrays(ds, seed, **kw)
    return RawOutputs(a["image_ids"], a["boxes"], a["scores"], ds.image_heights,
                      ds.image_widths, FP, "m" * 64, "d" * 64)


def _writer(path, ds, **kw):
    return RawOutputsWriter(path, image_ids=ds.image_ids, image_heights=ds.image_heights,
                            image_widths=ds.image_widths, fingerprint=FP, **kw)


def _siblings(folder):
    """Names in `folder` other than the finished cache directories."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("raw_outputs-"))


def test_cache_layout_and_round_trip(tmp_path, dataset):
    raw = _raw(dataset)
    path = save_cache(cache_path(tmp_path / "c", FP), raw)
    assert path.name == "raw_outputs-ffffffffffffffff"
    assert sorted(p.name for p in path.iterdir()) == ["boxes.npy", "meta.json", "scores.npy"]
    assert _siblings(path.parent) == []  # no temporary left
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["finite"]) == ("tfcal-raw-outputs", 2, True)
    assert meta["image_ids"] == dataset.image_ids.tolist()
    assert meta["arrays"]["scores"]["shape"] == [4, 5, 4]
    np.testing.assert_array_equal(np.load(path / "scores.npy"), raw.scores)  # plain .npy files

    back = load_cache(path, FP, dataset, num_score_columns=4)
    assert isinstance(back.scores, np.memmap) and not back.scores.flags.writeable
    np.testing.assert_array_equal(back.boxes, raw.boxes)
    np.testing.assert_array_equal(back.scores, raw.scores)
    assert (back.model_fingerprint, back.data_fingerprint) == ("m" * 64, "d" * 64)
    rows = back.scores[np.array([3, 1])]  # fancy indexing: an in-memory copy of those rows
    assert type(rows) is np.ndarray and rows.flags.writeable
    np.testing.assert_array_equal(rows, raw.scores[[3, 1]])
    assert load_cache(path, FP, dataset, verify=False) is not None


def test_cache_rejections(tmp_path, dataset, caplog):
    path = save_cache(tmp_path / "raw", _raw(dataset))
    assert load_cache(path, "e" * 64, dataset) is None
    assert "stale raw-output cache" in caplog.text
    assert load_cache(path, FP, dataset, num_score_columns=5) is None
    assert "expected 5 score columns" in caplog.text
    assert load_cache(tmp_path / "none", FP, dataset) is None  # absent
    a = _arrays(dataset)
    save_cache(path, RawOutputs(a["image_ids"][::-1].copy(), a["boxes"], a["scores"],
                                dataset.image_heights, dataset.image_widths, FP))
    assert load_cache(path, FP, dataset) is None  # rows not in the dataset's order
    assert "image_ids: differ from the dataset's" in caplog.text



def _truncate(path, name):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) - 7])


def _wrong_header(path):
    np.save(path / "scores.npy", np.zeros((4, 5, 3), np.float32))


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: _truncate(p, "scores.npy"), r"scores\.npy: \d+ bytes, expected \d+"),
    (lambda p: _truncate(p, "boxes.npy"), r"boxes\.npy: \d+ bytes, expected"),
    (lambda p: (p / "boxes.npy").open("ab").write(b"\0" * 8), r"boxes\.npy: \d+ bytes"),
    (lambda p: (p / "scores.npy").write_bytes(b""), r"scores\.npy: bad \.npy header"),
    (lambda p: (p / "scores.npy").unlink(), r"scores\.npy: missing"),
    (lambda p: (p / "meta.json").unlink(), r"meta\.json: missing"),
    (lambda p: (p / "meta.json").write_text("{"), r"meta\.json: not JSON"),
    (lambda p: (p / "meta.json").write_text(
        (p / "meta.json").read_text().replace('"num_images": 4', '"num_images": 5')),
     r"meta\.json: meta_sha256 does not match"),
    (_wrong_header, r"scores\.npy: header says <f4 \[4, 5, 3\]"),
    (lambda p: edit_cache_meta(p, finite=False), r"finite: must be true"),
    (lambda p: edit_cache_meta(p, version=1), r"version 1, expected 'tfcal-raw-outputs' version 2"),
    (lambda p: edit_cache_meta(p, image_widths=[1, 2, 3, 4]), r"image_heights/image_widths: differ"),
    (lambda p: edit_cache_meta(p, arrays={}), r"meta\.json: malformed \(KeyError"),
])
def test_corrupt_cache_is_not_trusted(tmp_path, dataset, caplog, corrupt, message):
    path = save_cache(tmp_path / "raw", _raw(dataset))
    corrupt(path)
    assert load_cache(path, FP, dataset) is None
    assert "corrupt raw-output cache" in caplog.text
    assert re.search(message, caplog.text), caplog.text


def test_data_bytes_changed_in_place_are_caught(tmp_path, dataset, caplog):
    # A same-length change of the data (an edited value, a NaN) keeps every size and header
    # check happy; only the recorded data sha256 sees it, and every load checks it.
    path = save_cache(tmp_path / "raw", _raw(dataset))
    header = json.loads((path / "meta.json").read_text())["arrays"]["scores"]["header_bytes"]
    original = (path / "scores.npy").read_bytes()
    for value in (np.float32(0.123), np.float32(np.nan)):
        with open(path / "scores.npy", "r+b") as f:
            f.seek(header + 4 * 7)
            f.write(value.tobytes())
        caplog.clear()
        assert load_cache(path, FP, dataset) is None
        assert "scores.npy: data bytes changed since written" in caplog.text
    (path / "scores.npy").write_bytes(original)
    assert load_cache(path, FP, dataset) is not None
    # verify=False (for callers that know the files are intact) skips only the hash.
    with open(path / "scores.npy", "r+b") as f:
        f.seek(header)
        f.write(np.float32(0.5).tobytes())
    assert load_cache(path, FP, dataset, verify=False) is not None


def test_changed_cache_given_as_raw_outputs_is_refused(tmp_path, dataset):
    path = save_cache(tmp_path / "raw", _raw(dataset))
    header = json.loads((path / "meta.json").read_text())["arrays"]["boxes"]["header_bytes"]
    with open(path / "boxes.npy", "r+b") as f:
        f.seek(header + 4)
        f.write(np.float32(0.3).tobytes())
    with pytest.raises(TfcalError, match=r"raw.*boxes\.npy: data bytes changed since written"):
        load_raw_outputs(path, dataset)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_cache(tmp_path, dataset, error):
    raw = _raw(dataset)
    path = tmp_path / "c" / "raw_outputs-ffffffffffffffff"
    with pytest.raises(error):
        with _writer(path, dataset) as writer:
            writer.append(raw.boxes[:2], raw.scores[:2])
            assert len(_siblings(path.parent)) == 1  # the temporary directory
            raise error("interrupted")
    assert not path.exists() and _siblings(path.parent) == []
    with _writer(path, dataset) as writer:  # leaving the block without commit: no cache either
        writer.append(raw.boxes[:2], raw.scores[:2])
    assert not path.exists() and _siblings(path.parent) == []


def test_writer_rejects_bad_batches(tmp_path, dataset):
    raw = _raw(dataset)
    with _writer(tmp_path / "raw", dataset) as writer:
        bad = raw.scores[:1].copy()
        bad[0, 2, 1] = np.inf
        with pytest.raises(ValueError, match=r"scores: non-finite value inf at \[0, 2, 1\]"):
            writer.append(raw.boxes[:1], bad)
        writer.append(raw.boxes[:1], raw.scores[:1])
        with pytest.raises(ValueError, match=r"rows must be \[5, 4\] and \[5, 4\]"):
            writer.append(raw.boxes[1:2, :3], raw.scores[1:2, :3])
        with pytest.raises(ValueError, match="must be \\[B, N, 4\\]"):
            writer.append(raw.boxes[1:2, :, :3], raw.scores[1:2])
        with pytest.raises(ValueError, match="5 rows written for 4 images"):
            writer.append(raw.boxes, raw.scores)
        with pytest.raises(ValueError, match="1 of 4 rows written"):
            writer.commit()
    assert not (tmp_path / "raw").exists()


def test_commit_replaces_an_old_cache_and_the_legacy_npz(tmp_path, dataset):
    folder = tmp_path / "c"
    path = folder / "raw_outputs-ffffffffffffffff"
    save_cache(path, _raw(dataset, seed=1))
    (path / "scores.npy").write_bytes(b"junk")  # a corrupt cache being recomputed
    legacy = folder / "raw_outputs-ffffffffffffffff.npz"
    legacy.write_bytes(b"old format")
    raw = _raw(dataset, seed=2)
    save_cache(path, raw)
    np.testing.assert_array_equal(load_cache(path, FP, dataset).scores, raw.scores)
    assert not legacy.exists() and _siblings(folder) == []


@pytest.mark.skipif(os.name != "posix", reason="stale temporaries are found by process id")
def test_stale_temporaries_are_ignored_then_removed(tmp_path, dataset):
    folder = tmp_path / "c"
    host = atomic.host_tag()
    dead = 4194304 + 17  # above Linux's largest pid_max (2**22): no such process
    stale = [folder / f".raw_outputs-0123456789abcdef.tmp-{host}-{dead}-abc_12",
             folder / f".raw_outputs-ffffffffffffffff.old-{host}-{dead}-9f8e"]
    kept = [folder / f".raw_outputs-ffffffffffffffff.tmp-{host}-{os.getppid()}-x1",  # alive
            folder / f".raw_outputs-ffffffffffffffff.tmp-otherhost-{dead}-x2",  # other host
            folder / "notes"]
    for p in stale + kept:
        p.mkdir(parents=True)
        (p / "scores.npy").write_bytes(b"half")
    path = folder / "raw_outputs-ffffffffffffffff"
    assert load_cache(path, FP, dataset) is None  # readers never look at temporaries
    save_cache(path, _raw(dataset))
    assert _siblings(folder) == sorted(p.name for p in kept)


def test_in_memory_writer(dataset):
    raw = _raw(dataset)
    with _writer(None, dataset, model_fingerprint="m" * 64) as writer:
        writer.append(raw.boxes[:3], raw.scores[:3])
        writer.append(raw.boxes[3:], raw.scores[3:])
        back = writer.commit()
    assert type(back.scores) is np.ndarray
    np.testing.assert_array_equal(back.scores, raw.scores)
    assert (back.fingerprint, back.model_fingerprint) == (FP, "m" * 64)


def test_no_images(tmp_path, dataset):
    empty = dataset.image_ids[:0]
    with RawOutputsWriter(tmp_path / "raw", image_ids=empty, image_heights=empty,
                          image_widths=empty) as writer:
        raw = writer.commit()
    assert raw.boxes.shape == (0, 0, 4) and raw.scores.shape == (0, 0, 0)


def test_cache_directory_as_precomputed_outputs(tmp_path, dataset):
    raw = _raw(dataset)
    path = save_cache(tmp_path / "raw", raw)
    back = load_raw_outputs(path, dataset, num_score_columns=4)
    assert isinstance(back.scores, np.memmap)  # same images in the same order: mapped
    np.testing.assert_array_equal(back.scores, raw.scores)
    assert back.model_fingerprint == "m" * 64 and len(back.fingerprint) == 64
    perm = np.array([2, 0, 3, 1])
    save_cache(path, RawOutputs(raw.image_ids[perm], raw.boxes[perm], raw.scores[perm],
                                raw.image_heights[perm], raw.image_widths[perm], FP))
    back = load_raw_outputs(path, dataset)
    np.testing.assert_array_equal(back.scores, raw.scores)  # rows put in the dataset's order
    mapped = load_raw_outputs(path, dataset, cache_dir=tmp_path / "cache")  # converted once
    assert isinstance(mapped.scores, np.memmap) and mapped.fingerprint == back.fingerprint
    np.testing.assert_array_equal(mapped.scores, raw.scores)
    assert len(list((tmp_path / "cache").glob("raw_outputs-*"))) == 1
    _truncate(path, "scores.npy")
    with pytest.raises(TfcalError, match=r"raw: scores\.npy: \d+ bytes, expected"):
        load_raw_outputs(path, dataset)


def test_per_class_boxes_round_trip_through_the_cache_and_npz(tmp_path, dataset):
    a = _arrays(dataset)  # 4 score columns: background + K = 3 classes
    rng = np.random.default_rng(5)
    per_class = (a["boxes"][:, :, None] + rng.uniform(0, 0.05, (4, 5, 3, 4))).astype(np.float32)
    raw = RawOutputs(a["image_ids"], per_class, a["scores"], dataset.image_heights,
                     dataset.image_widths, FP)
    path = save_cache(cache_path(tmp_path / "c", FP), raw)
    back = load_cache(path, FP, dataset, num_score_columns=4)
    assert back.boxes.shape == (4, 5, 3, 4)
    np.testing.assert_array_equal(back.boxes, per_class)
    np.savez(tmp_path / "raw.npz", **dict(a, boxes=per_class))
    loaded = load_raw_outputs(tmp_path / "raw.npz", dataset)
    assert isinstance(loaded.boxes, np.memmap)
    np.testing.assert_array_equal(loaded.boxes, per_class)
    with _writer(None, dataset) as w, pytest.raises(ValueError, match=r"\[B, N, K, 4\]"):
        w.append(np.zeros((1, 5, 3, 2), np.float32), np.zeros((1, 5, 4), np.float32))
    np.savez(tmp_path / "bad.npz", **dict(a, boxes=np.zeros((4, 5, 3, 4, 1), np.float32)))
    with pytest.raises(TfcalError, match=r"bad.npz: boxes: must be \[I=4, N, 4\] or per class "
                                         r"\[I=4, N, K, 4\], got \[4, 5, 3, 4, 1\]"):
        load_raw_outputs(tmp_path / "bad.npz", dataset)
