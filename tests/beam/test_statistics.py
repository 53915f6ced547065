"""The Beam runner's mergeable statistics without Beam: shards, the bounded accumulator, its
merge (exact: the merged cache equals the records stacked in data set order, whatever the
order and grouping of the merges), the index, and damaged or missing statistics."""

from __future__ import annotations

import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.beam import statistics as st

N, C = 5, 3


def _records(num, seed=0):
    rng = np.random.default_rng(seed)
    return [st.ImageRecord(f"k{i}", 100 + i, rng.random((N, 4), dtype=np.float32),
                           rng.random((N, C), dtype=np.float32)) for i in range(num)]


def _dataset(records):
    ids = np.array([r.image_id for r in records], np.int64)
    return SimpleNamespace(image_ids=ids, image_heights=np.full(len(ids), 32, np.int64),
                           image_widths=np.full(len(ids), 48, np.int64))


def _merged(tmp_path, store, entries, records, name="cache"):
    index = st.StoreIndex(store, "fp", tuple(entries))
    return st.merge_into_cache(index, _dataset(records), [r.key for r in records],
                               tmp_path / name, fingerprint="f", data_fingerprint="d", batch=3)


def test_accumulator_spills_full_shards_and_keeps_at_most_one_shard_in_memory(tmp_path):
    acc = st.ShardAccumulator(tmp_path, shard_images=4)
    for r in _records(10):
        acc.add(r)
        assert len(acc.pending) < 4
    entries = acc.finish()
    assert [len(e.image_keys) for e in entries] == [4, 4, 2]
    written = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert written == sorted(e.name for e in entries)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_merge_in_any_order_gives_the_records_in_data_set_order(tmp_path, order):
    records = _records(11)
    parts = [records[0:5], records[5:6], records[6:]]
    accs = []
    for part in parts:
        acc = st.ShardAccumulator(tmp_path / "store", shard_images=3)
        for r in part:
            acc.add(r)
        accs.append(acc)
    merged = accs[order[0]]
    for i in order[1:]:
        merged.merge(accs[i])
    raw = _merged(tmp_path, tmp_path / "store", merged.finish(), records)
    np.testing.assert_array_equal(raw.boxes, np.stack([r.boxes for r in records]))
    np.testing.assert_array_equal(raw.scores, np.stack([r.scores for r in records]))
    np.testing.assert_array_equal(raw.image_ids, [r.image_id for r in records])


def test_empty_accumulator_has_no_shards_and_an_empty_shard_is_refused(tmp_path):
    assert st.ShardAccumulator(tmp_path, 2).finish() == []
    with pytest.raises(ValueError, match="at least one record"):
        st.write_shard(tmp_path, [])
    with pytest.raises(ValueError, match="shard_images must be >= 1, got 0"):
        st.ShardAccumulator(tmp_path, 0)


def test_records_of_other_shapes_go_to_their_own_shard(tmp_path):
    small = st.ImageRecord("s", 1, np.zeros((2, 4), np.float32), np.zeros((2, C), np.float32))
    acc = st.ShardAccumulator(tmp_path, 10)
    for r in [*_records(2), small]:
        acc.add(r)
    assert sorted(len(e.image_keys) for e in acc.finish()) == [1, 2]


def test_index_round_trip_and_a_key_in_two_shards_resolves_to_the_newest(tmp_path):
    records = _records(3)
    first = st.write_shard(tmp_path, records[:2])
    index = st.load_index(tmp_path, "fp").with_entries([first])
    index.save()
    again = st.load_index(tmp_path, "fp")
    assert again.entries == (first,)
    newer = st.write_shard(tmp_path, records[1:])
    assert again.with_entries([newer]).location["k1"] == (newer.name, 0)
    with pytest.raises(TfcalError, match=r"index.json: model_fingerprint: belongs to another"):
        st.load_index(tmp_path, "other")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(TfcalError, match=r"index.json: not a Beam statistics index"):
        st.load_index(tmp_path, "fp")


def test_shards_no_run_committed_are_removed(tmp_path):
    records = _records(3)
    kept = st.write_shard(tmp_path, records[:2])
    orphan = st.write_shard(tmp_path, records[2:])  # e.g. a bundle the runner retried
    index = st.StoreIndex(tmp_path, "fp", (kept,))
    assert st.remove_unindexed(index) == 1
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [kept.name]
    assert orphan.name != kept.name and st.remove_unindexed(index) == 0


def test_missing_images_and_damaged_shards_are_refused_without_a_cache(tmp_path):
    records = _records(4)
    entry = st.write_shard(tmp_path / "store", records[:3])
    with pytest.raises(TfcalError, match=r"no statistics for 1 images \(ids \[103\]\)"):
        _merged(tmp_path, tmp_path / "store", [entry], records)
    scores = tmp_path / "store" / "shards" / entry.name / "scores.npy"
    data = bytearray(scores.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of the last score
    scores.write_bytes(bytes(data))
    with pytest.raises(TfcalError, match="damaged Beam statistics shard"):
        _merged(tmp_path, tmp_path / "store", [entry], records[:3])
    assert not (tmp_path / "cache").exists()


def test_shard_files_record_what_they_hold(tmp_path):
    records = _records(2)
    entry = st.write_shard(tmp_path, records)
    meta = json.loads((tmp_path / "shards" / entry.name / "shard.json").read_text())
    assert meta["image_ids"] == [100, 101] and meta["image_keys"] == ["k0", "k1"]
    assert meta["arrays"]["scores"]["shape"] == [2, N, C]


def test_image_keys_change_with_the_file(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        p.write_bytes(b"x")
    ds = SimpleNamespace(image_ids=np.array([1, 2]), file_names=["a.png", "b.png"],
                         image_heights=np.array([4, 4]), image_widths=np.array([4, 4]),
                         image_paths=paths, num_images=2)
    before = st.image_keys(ds)
    assert len(set(before)) == 2
    os.utime(paths[1], ns=(0, 0))
    after = st.image_keys(ds)
    assert after[0] == before[0] and after[1] != before[1]
