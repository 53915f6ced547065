"""Tests for tfcal.raw.npz and the streaming npz path of tfcal.raw.precomputed: stored members are
memory-mapped at their zip offset, compressed ones streamed, and loading a multi-batch npz keeps
the traced allocations near one batch (the in-memory path, measured the same way, holds the
whole file)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.raw import (RawOutputs, checks, convert_raw_outputs, file_sha256, fingerprint,
                       load_raw_outputs)
from tfcal.raw.npz import NpzStream, open_members

NUM_IMAGES, NUM_BOXES, NUM_COLUMNS = 48, 400, 41  # scores: 48 x 400 x 41 x 4 B = 3.1 MB
SCAN_BYTES = 1 << 17  # 128 KB slices: 2 images of scores per batch, 24 batches
HASH_CHUNK = 1 << 16


#: The `dataset` fixture (tests/conftest.py).
COCO_SET = {"seed": 1, "num_images": NUM_IMAGES, "num_categories": 3}


def _arrays(ds, seed=0):
    rng = np.random.default_rng(seed)
    y0, x0 = rng.uniform(0, 0.5, (2, ds.num_images, NUM_BOXES))
    boxes = np.stack([y0, x0, y0 + 0.3, x0 + 0.4], axis=-1).astype(np.float32)
    scores = rng.random((ds.num_images, NUM_BOXES, NUM_COLUMNS), dtype=np.float32)
    return {"image_ids": ds.image_ids.copy(), "boxes": boxes, "scores": scores}


def test_stored_members_are_mapped_and_compressed_ones_streamed(tmp_path, dataset):
    a = _arrays(dataset)
    np.savez(tmp_path / "s.npz", **a)
    np.savez_compressed(tmp_path / "c.npz", **a)
    stored = open_members(tmp_path / "s.npz", ("image_ids", "boxes", "scores"),
                          in_memory=("image_ids",))
    assert type(stored["image_ids"]) is np.ndarray
    assert isinstance(stored["scores"], np.memmap)
    np.testing.assert_array_equal(stored["scores"], a["scores"])
    np.testing.assert_array_equal(stored["boxes"], a["boxes"])
    packed = open_members(tmp_path / "c.npz", ("boxes", "scores"))
    assert isinstance(packed["scores"], NpzStream)
    assert packed["scores"].shape == a["scores"].shape
    parts = list(packed["scores"].batches(5))
    assert [len(p) for p in parts] == [5] * 9 + [3]
    np.testing.assert_array_equal(np.concatenate(parts), a["scores"])


def test_fortran_order_member_is_a_stream_read_whole(tmp_path):
    arr = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.savez(tmp_path / "f.npz", x=arr)
    x = open_members(tmp_path / "f.npz", ("x",))["x"]
    assert isinstance(x, NpzStream) and x.fortran_order
    np.testing.assert_array_equal(x.read(), arr)
    with pytest.raises(ValueError, match="Fortran-order"):
        next(x.batches(1))


def test_missing_and_unreadable(tmp_path):
    np.savez(tmp_path / "m.npz", boxes=np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"missing arrays \['scores'\] \(has \['boxes'\]\)"):
        open_members(tmp_path / "m.npz", ("boxes", "scores"))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="not a readable npz"):
        open_members(tmp_path / "bad.npz", ("boxes",))


def _traced_load_and_read(path, ds, **kw) -> tuple[int, RawOutputs, float]:
    """Peak traced bytes of loading `path` and reading every row by batches of 2 images."""
    tracemalloc.start()
    try:
        raw = load_raw_outputs(path, ds, **kw)
        total = 0.0
        for start in range(0, raw.num_images, 2):
            idx = np.arange(start, min(start + 2, raw.num_images))
            total += float(raw.scores[idx].sum()) + float(raw.boxes[idx].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, raw, total


@pytest.mark.parametrize("save,reorder", [(np.savez, False), (np.savez_compressed, False),
                                          (np.savez_compressed, True), (np.savez, True)])
def test_memory_stays_near_one_batch(tmp_path, dataset, monkeypatch, save, reorder):
    monkeypatch.setattr(checks, "_SCAN_BYTES", SCAN_BYTES)
    monkeypatch.setattr(fingerprint, "_CHUNK", HASH_CHUNK)
    a = _arrays(dataset)
    expected = float(a["scores"].sum(dtype=np.float64))
    if reorder:  # rows in another order than the dataset's, plus float64 boxes
        a = {"image_ids": a["image_ids"][::-1].copy(), "boxes": a["boxes"][::-1].astype(
             np.float64), "scores": a["scores"][::-1].copy()}
    save(tmp_path / "raw.npz", **a)
    whole = a["scores"].nbytes
    batch = 2 * NUM_BOXES * NUM_COLUMNS * 4
    # Once untraced first (into another folder), so that first-use imports are not counted.
    _traced_load_and_read(tmp_path / "raw.npz", dataset, cache_dir=tmp_path / "warm")
    peak, raw, total = _traced_load_and_read(tmp_path / "raw.npz", dataset,
                                             cache_dir=tmp_path / "cache")
    assert isinstance(raw.scores, np.memmap)
    bound = 8 * batch + HASH_CHUNK  # a few batches in flight, plus the file hash's buffer
    assert peak < bound < whole / 2.5, (peak, bound, whole)
    np.testing.assert_allclose(total, expected + float(_arrays(dataset)["boxes"].sum(
        dtype=np.float64)), rtol=1e-6)
    converted = list((tmp_path / "cache").glob("raw_outputs-*"))
    assert len(converted) == (0 if save is np.savez and not reorder else 1)
    # Without a cache folder the same file is loaded in memory: the bound above means something.
    in_memory, _, _ = _traced_load_and_read(tmp_path / "raw.npz", dataset)
    if converted:
        assert in_memory > whole


def test_converted_folder_is_reused_and_fingerprint_is_the_npz(tmp_path, dataset, caplog):
    a = _arrays(dataset)
    np.savez_compressed(tmp_path / "raw.npz", **a)
    caplog.set_level("INFO", logger="tfcal.raw")
    first = load_raw_outputs(tmp_path / "raw.npz", dataset, cache_dir=tmp_path / "cache")
    assert "converting it once" in caplog.text
    caplog.clear()
    again = load_raw_outputs(tmp_path / "raw.npz", dataset, cache_dir=tmp_path / "cache")
    assert "converting" not in caplog.text and "using raw-output cache" in caplog.text
    in_memory = load_raw_outputs(tmp_path / "raw.npz", dataset)
    sha = file_sha256(tmp_path / "raw.npz")
    assert first.fingerprint == again.fingerprint == in_memory.fingerprint == sha
    np.testing.assert_array_equal(again.scores, in_memory.scores)


def test_compressed_npz_with_nan_is_refused_and_leaves_no_folder(tmp_path, dataset):
    a = _arrays(dataset)
    a["scores"][30, 7, 2] = np.nan
    np.savez_compressed(tmp_path / "raw.npz", **a)
    with pytest.raises(TfcalError, match=r"raw.npz: scores: non-finite value nan at \[30, 7, 2\]"):
        load_raw_outputs(tmp_path / "raw.npz", dataset, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # the folder it made for the conversion too


def test_convert_raw_outputs_writes_a_folder_usable_as_raw_outputs(tmp_path, dataset):
    a = _arrays(dataset)
    np.savez_compressed(tmp_path / "raw.npz", **a)
    dest = convert_raw_outputs(tmp_path / "raw.npz", tmp_path / "folder")
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["fingerprint"] == file_sha256(tmp_path / "raw.npz")
    raw = load_raw_outputs(dest, dataset)
    assert isinstance(raw.scores, np.memmap)
    np.testing.assert_array_equal(raw.scores, a["scores"])
    np.testing.assert_array_equal(raw.boxes, a["boxes"])
    with pytest.raises(TfcalError, match=r"missing\.npz: not a readable npz"):
        convert_raw_outputs(tmp_path / "missing.npz", tmp_path / "other")


def test_convert_command_line(tmp_path, dataset, capsys):
    from tfcal.cli import main

    np.savez_compressed(tmp_path / "raw.npz", **_arrays(dataset))
    assert main(["convert-raw-outputs", str(tmp_path / "raw.npz"), str(tmp_path / "out")]) == 0
    assert "raw outputs:" in capsys.readouterr().out
    assert load_raw_outputs(tmp_path / "out", dataset).num_images == NUM_IMAGES
    for args in ((tmp_path / "raw.npz", tmp_path / "out"),       # exists
                 (tmp_path / "instances.json", tmp_path / "x")):  # not an npz
        assert main(["convert-raw-outputs", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("already exists" in err or "not a readable npz" in err)
    assert not (tmp_path / "x").exists()
