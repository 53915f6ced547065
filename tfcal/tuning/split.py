"""Tune/holdout and k-fold splits of image ids, stratified by class presence.

Algorithm (iterative stratification, Sechidis et al. 2011, made deterministic):

1. Each part `j` has a desired share `r_j` (holdout: `(1 - f, f)`; k-fold: `1/k` each), so it
   wants `r_j * n_c` images of each class `c` and `r_j * I` images in all.
2. Repeatedly take the class with the fewest unassigned images (ties: lowest column) and deal
   its unassigned images, in a seeded random order, each to the part that still wants the most
   of that class (ties: the part that wants the most images overall, then a seeded random draw).
   Each assignment lowers the wants of every class in the image. Images with no class go last,
   to the part that wants the most images.
3. Repair: while some class with at least as many images as parts is missing from a part, move
   one of its images there from a part holding >= 2 of them, choosing an image whose move
   empties no class in the donor (fewest classes first, then the seeded order).

The result depends only on `(image_ids, class_presence, fraction or k, seed)`; a different seed
gives a different split (when there is any freedom). Every class with >= 2 images (>= k for
k-fold) lands in every part whenever the repair can achieve it.
"""

from __future__ import annotations

import numpy as np


def _validate(image_ids, class_presence):
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"image_ids must be a non-empty 1-D array, got shape {list(ids.shape)}")
    if np.unique(ids).size != ids.size:
        raise ValueError("image_ids must not repeat an id")
    presence = np.asarray(class_presence)
    if presence.ndim != 2 or presence.shape[0] != ids.size:
        raise ValueError(f"class_presence must have shape [{ids.size}, num_classes], "
                         f"got {list(presence.shape)}")
    return ids, presence.astype(bool)


def _stratify(presence: np.ndarray, shares: np.ndarray, seed: int) -> np.ndarray:
    """Returns int `[I]`: the part of each image."""
    rng = np.random.default_rng(seed)
    n_img, n_cls = presence.shape
    n_parts = shares.shape[0]
    rank = np.empty(n_img, np.int64)
    rank[rng.permutation(n_img)] = np.arange(n_img)  # the seeded dealing order
    want_cls = shares[:, None] * presence.sum(axis=0)[None, :].astype(np.float64)  # [P, C]
    want_img = shares * n_img  # [P]
    part = np.full(n_img, -1, np.int64)
    unassigned = np.ones(n_img, bool)
    tie = rng.random((n_img, n_parts))  # last tie-break, one draw per image and part

    def assign(i, c):
        if c is None:
            keys = (tie[i], want_img)
        else:
            keys = (tie[i], want_img, want_cls[:, c])
        j = int(np.lexsort(keys)[-1])  # largest by the last key, then the next ...
        part[i] = j
        unassigned[i] = False
        want_cls[j] -= presence[i]
        want_img[j] -= 1.0

    while True:
        left = presence[unassigned].sum(axis=0)
        if not left.any():
            break
        c = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))
        imgs = np.flatnonzero(unassigned & presence[:, c])
        for i in imgs[np.argsort(rank[imgs])]:
            assign(int(i), c)
    rest = np.flatnonzero(unassigned)
    for i in rest[np.argsort(rank[rest])]:
        assign(int(i), None)
    _repair(presence, part, n_parts, rank)
    return part


def _repair(presence, part, n_parts, rank):
    n_cls = presence.shape[1]
    total = presence.sum(axis=0)
    for _ in range(4 * n_cls * n_parts + 1):  # each move fixes one (class, part) gap
        counts = np.stack([presence[part == j].sum(axis=0) for j in range(n_parts)])  # [P, C]
        gaps = [(c, j) for c in range(n_cls) if total[c] >= n_parts
                for j in range(n_parts) if counts[j, c] == 0]
        moved = False
        for c, j in gaps:
            best = None
            for d in np.argsort(-counts[:, c], kind="stable"):
                if counts[d, c] < 2:
                    break
                cand = np.flatnonzero((part == d) & presence[:, c])
                # The move must not empty any class in the donor.
                ok = [i for i in cand if np.all(counts[d, presence[i]] >= 2)]
                if ok:
                    best = min(ok, key=lambda i: (int(presence[i].sum()), int(rank[i])))
                    break
            if best is not None:
                part[best] = j
                moved = True
                break
        if not moved:
            return


def split_images(image_ids, class_presence, *, holdout_fraction: float, seed: int):
    """Splits image ids into tune and holdout sets, stratified by class presence.

    Args:
        image_ids: int `[I]` distinct image ids (I >= 2).
        class_presence: bool `[I, K]`: image i holds at least one (non-crowd) object of class k.
        holdout_fraction: share of images held out, in (0, 1).
        seed: seeds the dealing order and ties.

    Returns:
        `(tune_ids, holdout_ids)`: disjoint arrays covering `image_ids`, each in the input order,
        both non-empty.

    Raises:
        ValueError: empty or repeated ids, a shape mismatch, a fraction outside (0, 1).
    """
    ids, presence = _validate(image_ids, class_presence)
    if not 0.0 < float(holdout_fraction) < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    if ids.size < 2:
        raise ValueError(f"need at least 2 images to split, got {ids.size}")
    shares = np.array([1.0 - holdout_fraction, holdout_fraction])
    part = _stratify(presence, shares, seed)
    for j in (0, 1):  # both parts non-empty
        if not np.any(part == j):
            donor = np.flatnonzero(part == 1 - j)
            part[donor[np.argmin(presence[donor].sum(axis=1))]] = j
    return ids[part == 0], ids[part == 1]


def kfold(image_ids, class_presence, k: int, seed: int):
    """Stratified k-fold split of image ids.

    Args:
        image_ids: int `[I]` distinct image ids (I >= k).
        class_presence: bool `[I, K]`.
        k: number of folds, >= 2.
        seed: seeds the dealing order and ties.

    Returns:
        A list of `k` pairs `(tune_ids, holdout_ids)`; the holdout sets are disjoint, cover
        `image_ids` and are each non-empty; `tune_ids` is the rest, both in input order.

    Raises:
        ValueError: as `split_images`, or `k < 2` or `k > I`.
    """
    ids, presence = _validate(image_ids, class_presence)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if k > ids.size:
        raise ValueError(f"k must be <= the number of images ({ids.size}), got {k}")
    part = _stratify(presence, np.full(k, 1.0 / k), seed)
    for j in range(k):  # every fold non-empty
        if not np.any(part == j):
            sizes = np.bincount(part, minlength=k)
            donor = np.flatnonzero(part == int(np.argmax(sizes)))
            part[donor[np.argmin(presence[donor].sum(axis=1))]] = j
    return [(ids[part != j], ids[part == j]) for j in range(k)]
