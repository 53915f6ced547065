"""Tests of tfcal.tuning.split: disjoint cover, stratification, determinism, k-fold, errors."""

import numpy as np
import pytest

from tfcal.tuning.split import kfold, split_images


def _presence(seed, n_img=300, n_cls=12):
    """Zipf-like class frequencies, so some classes are rare (a few images)."""
    rng = np.random.default_rng(seed)
    rate = 0.4 / np.arange(1, n_cls + 1) ** 1.3
    presence = rng.random((n_img, n_cls)) < rate
    presence[rng.integers(0, n_img, 2), n_cls - 1] = True  # a class with exactly ~2 images
    return presence


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_disjoint_cover_and_stratified(seed):
    presence = _presence(seed)
    ids = np.arange(1000, 1000 + presence.shape[0]) * 7
    tune, hold = split_images(ids, presence, holdout_fraction=0.3, seed=seed)
    assert np.intersect1d(tune, hold).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tune, hold])), np.sort(ids))
    # Input order is kept.
    assert np.all(np.diff(np.searchsorted(ids, tune)) > 0)
    assert abs(hold.size - 0.3 * ids.size) <= 0.03 * ids.size
    in_hold = np.isin(ids, hold)
    for c in range(presence.shape[1]):
        n = presence[:, c].sum()
        h = (presence[:, c] & in_hold).sum()
        if n >= 2:  # every class with >= 2 images is in both splits
            assert 0 < h < n, (c, n, h)
        if n >= 40:  # frequent classes keep roughly the holdout share
            assert abs(h / n - 0.3) < 0.08, (c, n, h)


def test_split_deterministic_and_seed_dependent():
    presence = _presence(0)
    ids = np.arange(presence.shape[0])
    a = split_images(ids, presence, holdout_fraction=0.25, seed=5)
    b = split_images(ids, presence, holdout_fraction=0.25, seed=5)
    c = split_images(ids, presence, holdout_fraction=0.25, seed=6)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_tiny_and_empty_images():
    # Two images of one class: one each side. Images without any class are still assigned.
    presence = np.array([[True], [True], [False], [False]])
    tune, hold = split_images([1, 2, 3, 4], presence, holdout_fraction=0.5, seed=0)
    assert len(tune) == 2 and len(hold) == 2
    assert {1, 2} & set(tune) and {1, 2} & set(hold)
    tune, hold = split_images([1, 2], np.zeros((2, 3), bool), holdout_fraction=0.01, seed=0)
    assert len(tune) == 1 and len(hold) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_kfold(seed):
    presence = _presence(seed)
    ids = np.arange(presence.shape[0])
    folds = kfold(ids, presence, 5, seed)
    assert len(folds) == 5
    holds = [h for _, h in folds]
    np.testing.assert_array_equal(np.sort(np.concatenate(holds)), ids)
    for tune, hold in folds:
        np.testing.assert_array_equal(np.sort(np.concatenate([tune, hold])), ids)
        assert abs(hold.size - ids.size / 5) <= 0.05 * ids.size
    for c in range(presence.shape[1]):
        if presence[:, c].sum() >= 5:
            assert all(presence[np.isin(ids, h), c].any() for h in holds), c


@pytest.mark.parametrize("call, match", [
    (lambda: split_images([1, 2], np.ones((2, 1)), holdout_fraction=1.0, seed=0),
     "holdout_fraction"),
    (lambda: split_images([1, 1], np.ones((2, 1)), holdout_fraction=0.5, seed=0), "repeat"),
    (lambda: split_images([1, 2, 3], np.ones((2, 1)), holdout_fraction=0.5, seed=0), "shape"),
    (lambda: split_images([], np.ones((0, 1)), holdout_fraction=0.5, seed=0), "non-empty"),
    (lambda: split_images([1], np.ones((1, 1)), holdout_fraction=0.5, seed=0), "at least 2"),
    (lambda: kfold([1, 2, 3], np.ones((3, 1)), 4, 0), "k must be <="),
    (lambda: kfold([1, 2, 3], np.ones((3, 1)), 1, 0), "k must be an integer"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
