"""Tests of tfcal.tuning.search: a hand-built fixture with known answers, properties against a
naive per-threshold loop, policies, overrides, confidence mode and input validation."""

import dataclasses
import math

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.tuning.search import (
    GROUP_SHARE,
    MatchedDetections,
    Objective,
    PointCounts,
    UnreachableTargetError,
    default_iou,
    joint_search,
)


def _md(rows, num_gt, ignored=()):
    """rows: (score, column, tp) tuples; `ignored`: (score, column) tuples."""
    rows = list(rows) + [(s, c, None) for s, c in ignored]
    score = np.array([r[0] for r in rows], np.float32)
    column = np.array([r[1] for r in rows])
    tp = np.array([bool(r[2]) for r in rows])
    ign = np.array([r[2] is None for r in rows])
    return MatchedDetections(score, column, tp, ign, np.array(num_gt))


def _counts(c):
    return (c.column, c.status, c.enabled, c.min_score_thresh, c.nms_iou, c.tp, c.fp, c.fn)


def hand_fixture(ignored=()):
    """Two classes, two NMS IoUs; the right answer is derived in the comments.

    Class 0 (4 GT). IoU 0.5: 0.9 T, 0.8 T, 0.7 F, 0.6 T, 0.5 F, 0.4 T. IoU 0.7 keeps a duplicate
    (0.85 F). Precision >= 0.75 at IoU 0.5: t=0.9 (1/1), 0.8 (2/2), 0.6 (3/4 = 0.75, recall 0.75)
    -> best recall 0.75 at t=0.6. At IoU 0.7 only t=0.9 (recall 0.25) is feasible. Answer:
    (0.6, IoU 0.5), tp 3, fp 1, fn 1.
    Class 1 (2 GT). IoU 0.5 suppresses a neighbour: 0.95 T, 0.3 F. IoU 0.7 keeps it: 0.95 T,
    0.9 T, 0.3 F -> recall 1 at t=0.9 with precision 1. Answer: (0.9, IoU 0.7), tp 2, fp 0.
    """
    c0_05 = [(0.9, 0, 1), (0.8, 0, 1), (0.7, 0, 0), (0.6, 0, 1), (0.5, 0, 0), (0.4, 0, 1)]
    c0_07 = c0_05 + [(0.85, 0, 0)]
    c1_05 = [(0.95, 1, 1), (0.3, 1, 0)]
    c1_07 = c1_05 + [(0.9, 1, 1)]
    return {0.5: _md(c0_05 + c1_05, [4, 2], ignored), 0.7: _md(c0_07 + c1_07, [4, 2], ignored)}


def test_hand_fixture_precision_target():
    r = joint_search(hand_fixture(), Objective(target_precision=0.75), min_support=1)
    c0, c1 = r.classes
    assert (c0.status, c0.nms_iou, c0.tp, c0.fp, c0.fn) == ("ok", 0.5, 3, 1, 1)
    assert c0.min_score_thresh == pytest.approx(0.6) and c0.recall == 0.75 and c0.value == 0.75
    assert (c1.status, c1.nms_iou, c1.tp, c1.fp, c1.fn) == ("ok", 0.7, 2, 0, 0)
    assert c1.min_score_thresh == pytest.approx(0.9)
    assert r.nms_iou == (0.5, 0.7) and r.class_enabled == (True, True)
    assert r.min_score_thresh == (float(np.float32(0.6)), float(np.float32(0.9)))


def test_ignored_detections_count_neither_and_are_not_candidates():
    # An ignored detection between 0.8 and 0.7 changes nothing, and is never a threshold.
    r = joint_search(hand_fixture(ignored=[(0.75, 0), (0.99, 1)]), Objective(target_precision=0.75),
                     min_support=1)
    base = joint_search(hand_fixture(), Objective(target_precision=0.75), min_support=1)
    assert [_counts(c) for c in r.classes] == [_counts(c) for c in base.classes]
    thr, _, _ = r.curves[0].for_class(0)
    assert not np.any(np.isclose(thr, 0.75))


def test_hand_fixture_recall_target():
    # Class 0, recall >= 0.75: IoU 0.5 t=0.6 (precision 0.75) beats t=0.4 (0.667) and IoU 0.7.
    r = joint_search(hand_fixture(), Objective("recall_target", target_recall=0.75), min_support=1)
    assert (r.classes[0].nms_iou, r.classes[0].tp, r.classes[0].fp) == (0.5, 3, 1)
    assert r.classes[0].value == 0.75


def test_curves_and_iou_table():
    r = joint_search(hand_fixture(), Objective(target_precision=0.75), min_support=1)
    thr, p, rec = r.curves[0].for_class(0)
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], rtol=1e-6)
    np.testing.assert_allclose(p, [1, 1, 2 / 3, 0.75, 0.6, 4 / 6])
    np.testing.assert_allclose(rec, [0.25, 0.5, 0.5, 0.75, 0.75, 1.0])
    # Best feasible recall per (IoU, class): class 0 0.75 / 0.25, class 1 0.5 / 1.0.
    np.testing.assert_allclose(r.iou_table, [[0.75, 0.5], [0.25, 1.0]])


def test_tie_break_prefers_default_iou_then_lower_threshold():
    same = [(0.9, 0, 1), (0.5, 0, 0)]
    m = {0.4: _md(same, [1]), 0.5: _md(same, [1]), 0.6: _md(same, [1])}
    assert default_iou(list(m)) == 0.5
    assert joint_search(m, Objective("f1"), min_support=1).classes[0].nms_iou == 0.5
    r = joint_search(m, Objective("f1"), min_support=1, default_nms_iou=0.6)
    assert r.classes[0].nms_iou == 0.6
    # Explicit thresholds 0.6, 0.7, 0.8 all give tp 1, fp 0: the lowest wins.
    r = joint_search(m, Objective("f1"), min_support=1, thresholds=[0.8, 0.6, 0.7, 0.95])
    assert r.classes[0].min_score_thresh == pytest.approx(0.6)
    # Equal distance to the default: the lower IoU first.
    m2 = {0.4: _md(same, [1]), 0.6: _md(same, [1]), 0.5: _md([(0.9, 0, 0)], [1])}
    r = joint_search(m2, Objective("f1"), min_support=1, default_nms_iou=0.5)
    assert r.classes[0].nms_iou == 0.4


def _naive(md_by_iou, obj, default):
    """Per class, loop over every (IoU, observed score) point and keep the best key tuple."""
    grid = list(md_by_iou)
    rank = {g: r for r, g in enumerate(sorted(grid, key=lambda g: (abs(g - default), g)))}
    k = len(next(iter(md_by_iou.values())).num_gt)
    out = []
    for c in range(k):
        best, choice = None, None
        for g, md in md_by_iou.items():
            sel = (md.column == c) & ~md.ignored
            for t in np.unique(md.score[sel]):
                keep = sel & (md.score >= t)
                tp, fp = int(md.tp[keep].sum()), int((~md.tp[keep]).sum())
                n = int(md.num_gt[c])
                prec = tp / (tp + fp)
                rec = tp / n
                if obj.name == "precision_target":
                    ok, key = prec >= obj.target_precision, (rec, prec)
                elif obj.name == "recall_target":
                    ok, key = rec >= obj.target_recall, (prec, rec)
                elif obj.name == "f1":
                    ok, key = True, (2.0 * tp / (2.0 * tp + fp + (n - tp)), rec)
                elif obj.name == "fbeta":
                    b2 = obj.beta * obj.beta
                    ok, key = True, ((1.0 + b2) * tp / ((1.0 + b2) * tp + b2 * (n - tp) + fp), rec)
                else:
                    ok, key = True, (-(obj.c_fp * fp + obj.c_fn * (n - tp)), rec)
                ok = ok and tp > 0
                key = key + (-rank[g], -float(t))
                if ok and (best is None or key > best):
                    best, choice = key, (g, float(t), tp, fp)
        out.append(choice)
    return out


def _random_matched(seed, k=4, d=300, grid=(0.4, 0.5, 0.6)):
    rng = np.random.default_rng(seed)
    num_gt = rng.integers(5, 60, k)
    out = {}
    for g in grid:
        col = rng.integers(0, k, d)
        score = np.round(rng.random(d), 2).astype(np.float32)  # rounding makes ties
        tp = rng.random(d) < score * 0.8
        for c in range(k):  # at most num_gt TPs per class
            idx = np.flatnonzero(tp & (col == c))
            tp[idx[num_gt[c]:]] = False
        ign = ~tp & (rng.random(d) < 0.1)
        out[g] = MatchedDetections(score, col, tp, ign, num_gt)
    return out


@pytest.mark.parametrize("obj", [Objective(target_precision=0.7),
                                 Objective("recall_target", target_recall=0.6),
                                 Objective("f1"), Objective("fbeta", beta=2.0),
                                 Objective("cost", c_fp=1.0, c_fn=3.0)], ids=lambda o: o.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(obj, seed):
    m = _random_matched(seed)
    r = joint_search(m, obj, min_support=1)
    for c, want in zip(r.classes, _naive(m, obj, 0.5)):
        if want is None:
            assert c.status == "unreachable" and not c.enabled
        else:
            assert c.status == "ok"
            assert (c.nms_iou, c.min_score_thresh, c.tp, c.fp) == want


def test_unreachable_policies():
    m = hand_fixture()
    obj = Objective(target_precision=1.0, on_unreachable="disable")
    # Precision 1.0: class 0 reaches it at t=0.8 (recall 0.5), class 1 at t=0.9 (IoU 0.7).
    r = joint_search(m, obj, min_support=1)
    assert [c.status for c in r.classes] == ["ok", "ok"]
    m = {0.5: _md([(0.9, 0, 0), (0.8, 0, 1), (0.7, 0, 0)], [3])}
    r = joint_search(m, Objective(target_precision=0.9), min_support=1)
    c = r.classes[0]
    assert (c.status, c.enabled, c.min_score_thresh) == ("unreachable", False, 1.0)
    assert (c.tp, c.fp, c.fn) == (0, 0, 3)
    assert math.isnan(c.value)
    assert r.class_enabled == (False,)
    # Best effort: the highest precision with a TP: t=0.8 (1/2), not t=0.7 (1/3).
    r = joint_search(m, Objective(target_precision=0.9, on_unreachable="best_effort"),
                     min_support=1)
    c = r.classes[0]
    assert (c.status, c.enabled, c.tp, c.fp) == ("unreachable", True, 1, 1)
    assert c.min_score_thresh == pytest.approx(0.8)
    with pytest.raises(UnreachableTargetError, match="column 0"):
        joint_search(m, Objective(target_precision=0.9, on_unreachable="error"), min_support=1)
    assert issubclass(UnreachableTargetError, TfcalError)
    # No TP anywhere: disabled even under best effort.
    m = {0.5: _md([(0.9, 0, 0)], [3])}
    c = joint_search(m, Objective("f1", on_unreachable="best_effort"), min_support=1).classes[0]
    assert (c.status, c.enabled) == ("unreachable", False)


def test_insufficient_support_gets_pooled_choice():
    m = hand_fixture()
    # min_support 3: class 1 (2 GT) is pooled. Pooled at IoU 0.5: 0.95 T .9 T .8 T .7 F .6 T ...
    r = joint_search(m, Objective(target_precision=0.75), min_support=3)
    c0, c1 = r.classes
    assert c0.status == "ok" and c1.status == "insufficient_data"
    assert r.pooled is not None and r.pooled.status == "ok"
    assert (c1.min_score_thresh, c1.nms_iou) == (r.pooled.min_score_thresh, r.pooled.nms_iou)
    # Pooled (6 GT). IoU 0.5 scores .95T .9T .8T .7F .6T .5F .4T .3F: precision >= .75 best
    # recall at t=0.6 (4/5, recall 4/6); IoU 0.7 adds .9T and .85F: t=0.6 gives 5/7 < .75,
    # t=0.8 gives 4/5 (recall 4/6) -> tie on recall and precision, default IoU 0.5 wins.
    assert r.pooled.nms_iou == 0.5 and r.pooled.min_score_thresh == pytest.approx(0.6)
    assert (r.pooled.tp, r.pooled.fp) == (4, 1)
    # Class 1's own counts at (0.6, IoU 0.5): 0.95 T only.
    assert (c1.tp, c1.fp, c1.fn, c1.enabled) == (1, 0, 1, True)


def test_no_detection_is_insufficient():
    m = {0.5: _md([(0.9, 0, 1), (0.8, 0, 1)], [20, 20])}
    r = joint_search(m, Objective("f1"), min_support=1)
    assert [c.status for c in r.classes] == ["ok", "insufficient_data"]


def test_overrides_per_column():
    m = hand_fixture()
    r = joint_search(m, Objective(target_precision=0.75), min_support=1,
                     overrides={0: Objective(target_precision=1.0)})
    # Class 0 at precision 1.0: t=0.8 at IoU 0.5 (recall 0.5) beats IoU 0.7 (0.9 only).
    assert (r.classes[0].nms_iou, r.classes[0].tp, r.classes[0].fp) == (0.5, 2, 0)
    assert r.classes[1].tp == 2
    base = Objective(target_precision=0.75)
    assert base.with_overrides(target_precision=None, objective="f1").name == "f1"
    with pytest.raises(ValueError, match="overrides keys"):
        joint_search(m, base, overrides={5: base})


def test_confidence_mode_and_budget():
    from tfcal import certification

    rng = np.random.default_rng(0)
    k, d = 5, 2000
    col = rng.integers(0, k, d)
    score = rng.random(d).astype(np.float32)
    tp = rng.random(d) < score
    num_gt = np.bincount(col[tp], minlength=k) + 20
    grid = (0.5, 0.6)
    m = {g: MatchedDetections(score, col, tp, np.zeros(d, bool), num_gt) for g in grid}
    plain = joint_search(m, Objective(target_precision=0.7), min_support=1)
    per = joint_search(m, Objective(target_precision=0.7, confidence=0.9), min_support=1)
    simul = joint_search(m, Objective(target_precision=0.7, confidence=0.9), min_support=1,
                         confidence_budget="simultaneous")
    for a, b, c in zip(plain.classes, per.classes, simul.classes):
        assert a.status == b.status == c.status == "ok"
        assert (a.guarantee, b.guarantee, c.guarantee) == ("estimate", "certified", "certified")
        assert c.recall <= b.recall <= a.recall  # stricter guarantees cost recall
        # Each IoU curve gets delta / G; simultaneously delta / (K G).
        assert b.test_level == pytest.approx(0.1 / 2) and c.test_level == pytest.approx(0.1 / 10)
        assert b.p_value <= b.test_level and c.p_value <= c.test_level
        # The chosen point's p-value is the exact binomial tail, from scipy.stats directly.
        from scipy.stats import binom
        assert b.p_value == pytest.approx(binom.sf(b.tp - 1, b.tp + b.fp, 0.7), rel=1e-9)
        # The same choice as certifying the class's curve on its own.
        s = slice(per.curves[0].offsets[b.column], per.curves[0].offsets[b.column + 1])
        cv = per.curves[0]
        ok, _ = certification.certify_precision(cv.tp[s], cv.tp[s] + cv.fp[s], 0.7, 0.05)
        if b.nms_iou == 0.5:
            assert b.recall == pytest.approx(cv.tp[s][ok].max() / b.num_gt)
    with pytest.raises(ValueError, match="confidence_budget"):
        joint_search(m, Objective(confidence=0.9), confidence_budget="bonferroni")


def test_uncertifiable_class_gets_a_box_estimate_and_no_guarantee():
    # Class 0: 20 of 20 TP (certifiable); class 1: 9 TP then FPs, 12 GT (too few to certify
    # precision 0.9 at delta 0.05: it needs >= 29 detections, all TP).
    rows = [(0.99 - 0.01 * i, 0, True) for i in range(40)]
    rows += [(0.9 - 0.01 * i, 1, True) for i in range(9)] + [(0.5, 1, False)]
    m = {0.5: _md(rows, [40, 12])}
    r = joint_search(m, Objective(target_precision=0.9, confidence=0.95), min_support=1)
    c0, c1 = r.classes
    assert (c0.status, c0.guarantee, c0.boxes_to_certify) == ("ok", "certified", None)
    assert (c1.status, c1.enabled, c1.guarantee) == ("unreachable", False, "none")
    # At 9/9 the test needs 29 of 29: 29 detections at 9 per 12 boxes -> ceil(29 * 12 / 9) = 39.
    assert c1.boxes_to_certify == 39 and c1.boxes_available == 12
    best = joint_search(m, Objective(target_precision=0.9, confidence=0.95,
                                     on_unreachable="best_effort"), min_support=1).classes[1]
    assert best.enabled and best.status == "unreachable" and best.guarantee == "none"


@pytest.mark.parametrize("bad, match", [
    (dict(score=[0.5, np.nan], column=[0, 0], tp=[1, 0], ignored=[0, 0], num_gt=[2]), "finite"),
    (dict(score=[0.5], column=[3], tp=[1], ignored=[0], num_gt=[2]), "column must be in"),
    (dict(score=[0.5], column=[0, 0], tp=[1], ignored=[0], num_gt=[2]), "shape"),
    (dict(score=[0.5], column=[0], tp=[1], ignored=[1], num_gt=[2]), "both tp and ignored"),
    (dict(score=[0.5, 0.4], column=[0, 0], tp=[1, 1], ignored=[0, 0], num_gt=[1]),
     "true positives"),
    (dict(score=[0.5], column=[0], tp=[1], ignored=[0], num_gt=[]), "num_gt"),
])
def test_matched_detections_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        MatchedDetections(**{k: np.asarray(v) for k, v in bad.items()})


def test_search_validation():
    m = hand_fixture()
    with pytest.raises(ValueError, match="at least one NMS IoU"):
        joint_search({})
    with pytest.raises(ValueError, match="default_nms_iou"):
        joint_search(m, default_nms_iou=0.6)
    with pytest.raises(ValueError, match="num_gt must be the same"):
        joint_search({0.5: m[0.5], 0.7: _md([(0.9, 0, 1)], [4, 3])})
    with pytest.raises(ValueError, match="thresholds"):
        joint_search(m, thresholds=[])
    with pytest.raises(ValueError, match="objective: must be one of"):
        Objective("youden")
    with pytest.raises(ValueError, match="target_precision"):
        Objective(target_precision=0.0)
    with pytest.raises(ValueError, match="confidence"):
        Objective(confidence=1.0)


def test_empty_class_and_no_detections():
    m = {0.5: _md([], [3, 0])}
    r = joint_search(m, Objective("f1"), min_support=1)
    # No detections at all: both classes insufficient; the pooled search has no TP -> disabled.
    assert [c.status for c in r.classes] == ["insufficient_data"] * 2
    assert not any(c.enabled for c in r.classes)


def test_from_match_maps_categories_to_columns():
    from types import SimpleNamespace

    match = SimpleNamespace(score=np.array([0.9, 0.8, 0.7]), category_id=np.array([7, 3, 99]),
                            tp=np.array([True, False, False]),
                            ignored=np.array([False, False, True]),
                            category_ids=np.array([3, 7, 99]), num_gt=np.array([4, 2, 1]))
    md = MatchedDetections.from_match(match, class_ids=[7, 3, 5])  # 99 is not a column
    np.testing.assert_array_equal(md.column, [0, 1])
    np.testing.assert_array_equal(md.tp, [True, False])
    np.testing.assert_array_equal(md.num_gt, [2, 4, 0])
    assert md.score.dtype == np.float32


def test_pooled_search_is_one_decision_with_per_class_counts():
    # Two classes share one threshold: pooled precision >= 0.75 (point estimate) is best at
    # t = 0.6 over both: class 0 scores 0.9 T, 0.8 T, 0.6 F; class 1: 0.7 T, 0.6 T, 0.5 F.
    # Pooled by threshold: 0.9 1/1, 0.8 2/2, 0.7 3/3, 0.6 4/5 = 0.8, 0.5 4/6: t = 0.6.
    rows = [(0.9, 0, True), (0.8, 0, True), (0.6, 0, False),
            (0.7, 1, True), (0.6, 1, True), (0.5, 1, False)]
    from tfcal.tuning.search import pooled_search

    r = pooled_search({0.5: _md(rows, [3, 2])}, Objective(target_precision=0.75))
    assert r.pooled.min_score_thresh == pytest.approx(0.6) and r.pooled.tp == 4
    assert r.pooled.fp == 1 and r.pooled.num_gt == 5
    c0, c1 = r.classes
    assert c0.min_score_thresh == c1.min_score_thresh == r.pooled.min_score_thresh
    assert (c0.tp, c0.fp, c0.fn) == (2, 1, 1) and (c1.tp, c1.fp, c1.fn) == (2, 0, 0)
    assert c0.guarantee == c1.guarantee == "pooled"


def test_learn_split_pays_no_grid_correction():
    # The same curves as learn and certify data: the learn split plans one IoU, and the certify
    # test runs at the whole level (0.05, not 0.05 / G).
    rng = np.random.default_rng(3)
    d = 3000
    score = rng.random(d).astype(np.float32)
    tp = rng.random(d) < 0.5 + 0.5 * score
    col = np.zeros(d, np.int64)
    num_gt = np.array([int(tp.sum()) + 100])
    m = {g: MatchedDetections(score, col, tp, np.zeros(d, bool), num_gt) for g in (0.5, 0.6)}
    obj = Objective(target_precision=0.9, confidence=0.95)
    learned = joint_search(m, obj, learn=m).classes[0]
    plain = joint_search(m, obj).classes[0]
    assert learned.guarantee == plain.guarantee == "certified"
    assert learned.test_level == pytest.approx(0.05) and plain.test_level == pytest.approx(0.025)
    assert learned.p_value <= 0.05 and learned.precision > 0.9
    with pytest.raises(ValueError, match="learn must have the grid"):
        joint_search(m, obj, learn={0.5: m[0.5]})


def test_objective_registry_is_the_one_vocabulary():
    import typing

    from tfcal import config, thresholds
    from tfcal.objective_kinds import KINDS, ObjectiveName, kind_of

    # One Literal names the objectives; the registry, the config and the search read it.
    assert typing.get_args(ObjectiveName) == tuple(KINDS)
    assert typing.get_type_hints(config.TuningConfig)["objective"] is ObjectiveName
    assert typing.get_type_hints(Objective)["name"] is ObjectiveName
    assert thresholds.OBJECTIVES == (*KINDS, "youden")
    assert {k for k, v in KINDS.items() if v.certifiable} == {"precision_target",
                                                             "recall_target"}
    obj = Objective(target_precision=0.8)
    assert kind_of("precision_target").describe(obj) == "precision >= 0.8"
    assert kind_of("precision_target").meets(obj, {"precision": 0.79}) is False
    assert kind_of("f1").meets(obj, {"precision": 0.1}) is None
    with pytest.raises(ValueError, match="objective must be one of"):
        kind_of("youden")


def _clean(column, n_tp, n_fp, top=0.99, step=0.001):
    """`n_tp` true positives scored from `top` down, then `n_fp` false positives below them."""
    rows = [(top - step * i, column, 1) for i in range(n_tp)]
    return rows + [(top - step * (n_tp + i), column, 0) for i in range(n_fp)]


def pool_fixture(*, hopeless_group=False, failing_certify=False):
    """Class 0: 200 clean true positives (certifies alone at 0.9). Classes 1-3: 25 true
    positives each, above 1 false positive: 26 detections, fewer than the 29 an exact test of
    0.9 at level 0.05 needs (29 straight true positives), so none can be tested alone, while
    the group can pass. Class 4 has 4 ground truths (< min_support 10). The learn part is the
    same shape. With `hopeless_group`, classes 1-3 are 40 false positives in both parts (the
    95% upper bound of their precision is 0.95 at one detection, lower at more). With `failing_certify`, the learn part is the plain one
    and the certify part's class 0 and classes 1-3 are all false positives.
    """
    def part(scale, hopeless=False, failing=False):
        rows = _clean(0, 200 * scale, 5) if not failing else _clean(0, 0, 205)
        for c in (1, 2, 3):
            if hopeless:
                rows += _clean(c, 0, 40 * scale, top=0.95 - 0.01 * c)
            elif failing:
                rows += _clean(c, 0, 26 * scale, top=0.95 - 0.01 * c)
            else:
                rows += _clean(c, 25 * scale, 1, top=0.95 - 0.01 * c)
        rows += _clean(4, 4, 0, top=0.9)
        gt = [200 * scale + 10, 25 * scale + 2, 25 * scale + 2, 25 * scale + 2, 4]
        return {0.5: _md(rows, gt), 0.6: _md(rows, gt)}
    return part(1, hopeless_group, failing_certify), part(1, hopeless_group)


POOL = Objective(target_precision=0.9, confidence=0.95, on_unreachable="pool")


def test_pool_group_holds_every_class_the_learn_part_does_not_show_below_target():
    certify, learn = pool_fixture()
    r = joint_search(certify, POOL, learn=learn)
    c = r.classes
    assert r.group == (0, 1, 2, 3, 4)  # inclusive: the class tested alone is a member too
    # Class 0 certifies alone (at the whole 0.05: the group was certified first); as many TPs at the
    # group's point as at its own (200), so it keeps its own statement.
    assert (c[0].status, c[0].guarantee) == ("ok", "certified")
    assert c[0].test_level == pytest.approx(0.05)  # the certified group passed its level on
    for m in c[1:]:
        assert (m.status, m.guarantee, m.enabled) == ("pooled", "pooled", True)
        assert (m.min_score_thresh, m.nms_iou) == (r.pooled.min_score_thresh, r.pooled.nms_iou)
        assert m.test_level == pytest.approx(0.05 * GROUP_SHARE)
    g = r.pooled
    assert (g.column, g.status, g.guarantee) == (-1, "ok", "certified")
    assert g.num_gt == sum(m.num_gt for m in c)  # the group is all its members pooled
    assert g.p_value <= 0.05 * GROUP_SHARE and g.precision >= 0.9
    # Without pooling the same classes are disabled (1-3) or get the uncertified fallback (4).
    plain = joint_search(certify, Objective(target_precision=0.9, confidence=0.95), learn=learn)
    assert [m.status for m in plain.classes] == ["ok", "unreachable", "unreachable",
                                                  "unreachable", "insufficient_data"]
    assert [m.guarantee for m in plain.classes[1:]] == ["none"] * 4
    assert plain.classes[0].tp == c[0].tp == 200


def test_pool_simultaneous_budget_counts_the_group_as_one_more_statement():
    certify, learn = pool_fixture()
    r = joint_search(certify, POOL, learn=learn, confidence_budget="simultaneous")
    assert r.pooled.test_level == pytest.approx(0.05 / 5)  # 4 certified classes + group
    # The certified group's 0.01 passes on equally to the 4 alone tests: 0.05 / 4 each.
    assert r.classes[0].test_level == pytest.approx(0.05 / 4)


def test_pool_alone_tests_keep_the_reduced_level_when_the_group_fails():
    certify, learn = pool_fixture(failing_certify=True)
    r = joint_search(certify, POOL, learn=learn)
    assert not r.pooled.enabled
    assert r.classes[0].test_level == pytest.approx(0.05 * (1 - GROUP_SHARE))
    r = joint_search(certify, POOL, learn=learn, confidence_budget="simultaneous")
    assert r.classes[0].test_level == pytest.approx(0.05 / 5)


def test_pool_disables_only_classes_the_learn_part_shows_below_target():
    certify, learn = pool_fixture(hopeless_group=True)
    # Target 0.97: the 95% upper bound of 0 TP in 1 detection, 1 - 0.05 = 0.95, is under it,
    # and lower at every larger count: classes 1-3 are shown below the target.
    strict = dataclasses.replace(POOL, target_precision=0.97)
    r = joint_search(certify, strict, learn=learn)
    assert [m.status for m in r.classes[1:4]] == ["below_target"] * 3
    assert not any(m.enabled for m in r.classes[1:4])
    assert r.group == (0, 4)
    # Class 4 (4 clean boxes: its bound is 1) is a member.
    assert r.classes[4].status in ("pooled", "ok") and r.classes[4].enabled
    # Target 0.9: one detection cannot show a class below it (bound 0.95): all are members.
    assert joint_search(certify, POOL, learn=learn).group == (0, 1, 2, 3, 4)


def test_pool_group_that_cannot_be_certified_is_disabled():
    certify, learn = pool_fixture(failing_certify=True)
    r = joint_search(certify, POOL, learn=learn)
    assert r.pooled.guarantee == "none" and not r.pooled.enabled
    assert [m.status for m in r.classes[:4]] == ["unreachable"] * 4
    assert not any(m.enabled for m in r.classes[:4])
    # The class under min_support keeps the uncertified pooled fallback, as without pooling.
    assert (r.classes[4].status, r.classes[4].guarantee) == ("insufficient_data", "none")


def test_pool_an_override_with_another_target_does_not_join():
    certify, learn = pool_fixture()
    other = Objective(target_precision=0.97, confidence=0.95, on_unreachable="pool")
    r = joint_search(certify, POOL, overrides={2: other}, learn=learn)
    assert r.classes[2].status == "unreachable" and not r.classes[2].enabled
    assert [m.status for m in r.classes[1:]] == ["pooled", "unreachable", "pooled", "pooled"]


def test_pool_needs_a_learn_split_and_the_default_objective():
    certify, learn = pool_fixture()
    with pytest.raises(ValueError, match="needs learn"):
        joint_search(certify, POOL)
    with pytest.raises(ValueError, match="not on an override alone"):
        joint_search(certify, Objective(target_precision=0.9, confidence=0.95),
                     overrides={1: POOL}, learn=learn)
    with pytest.raises(ValueError, match="certified objective"):
        joint_search(certify, Objective(target_precision=0.9, on_unreachable="pool"),
                     learn=learn)


def test_pool_group_block_of_the_report_sums_its_members(tmp_path):
    from tfcal.config import load_config
    from tfcal.tuning.holdout import _guarantee_block

    certify, learn = pool_fixture()
    found = joint_search(certify, POOL, learn=learn)
    path = tmp_path / "c.yaml"
    path.write_text("data: {annotations: a.json}\nmodel: {raw_outputs: r.npz}\n"
                    "tuning: {on_unreachable: pool}\n")
    # Column 4 maps to no category of the annotations: the report leaves it out, and the
    # group's member count with it.
    classes = [{"column": c.column, "status": c.status, "guarantee": {"kind": c.guarantee},
                "holdout": {"tp": 10 * i, "fp": i, "fn": 3}}
               for i, c in enumerate(found.classes) if c.column != 4]
    block = _guarantee_block(load_config(path), found, classes)
    g = block["group"]
    assert block["classes"] == {"certified": 1, "pooled": 3}
    assert (g["members"], g["classes"], g["guarantee"]) == (4, 3, "certified")
    assert (g["threshold"], g["nms_iou"]) == (found.pooled.min_score_thresh, found.pooled.nms_iou)
    assert (g["holdout"]["tp"], g["holdout"]["fp"], g["holdout"]["fn"]) == (60, 6, 9)
    assert g["holdout"]["precision"] == pytest.approx(60 / 66)


def test_point_counts_give_fn_precision_and_recall():
    # 3 TP, 1 FP of 5 ground truths: fn 5 - 3 = 2, precision 3/4, recall 3/5.
    c = PointCounts(3, 1, 5)
    assert (c.fn, c.precision, c.recall) == (2, 0.75, 0.6)
    # Nothing predicted and no ground truth: both undefined, reported as 0.0.
    assert (PointCounts(0, 0, 0).precision, PointCounts(0, 0, 0).recall) == (0.0, 0.0)
