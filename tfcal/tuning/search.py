"""The per-class joint search of `min_score_thresh` and NMS IoU over matched tune-split detections.

Input: for every NMS IoU `g` of the grid, the tune split's detections after calibration and one
post-processing run at the lowest candidate threshold, matched once at `match_iou`
(`MatchedDetections`: score, column, tp, ignored, and `num_gt` per class). For hard NMS, raising
the score threshold only removes the lowest-scored detections of each class, and COCO matching
gives each detection a flag that depends only on higher-scored detections, so the TP/FP counts at
every threshold `t` are prefix sums over the score-sorted flags. `joint_search` reads precision
and recall at every threshold of every class of every IoU in one vectorized pass: O(D log D) per
IoU (one sort, one segmented cumulative sum), no loop over thresholds, no COCOeval per grid point.

Conventions (the brute-force reference in tests/tuning/test_search_bruteforce.py follows them):

- A detection is predicted positive iff `score >= t`. Ignored detections (matched to a crowd or
  otherwise ignored ground truth) count neither as TP nor as FP.
- Candidates: by default the distinct scores of a class's non-ignored detections at that IoU; or
  an explicit shared list (`thresholds=`).
- `precision = tp / (tp + fp)` (0 when nothing is predicted), `recall = tp / num_gt`,
  `fn = num_gt - tp`. A grid point is feasible only if it has at least one TP.
- Objectives (each maximizes a primary key, then a secondary key):

  | objective          | feasible iff (and tp > 0)        | primary (= `value`)        | then      |
  | ------------------ | -------------------------------- | -------------------------- | --------- |
  | `precision_target` | precision (lower bound) >= target | recall                    | precision |
  | `recall_target`    | recall >= target                 | precision                  | recall    |
  | `f1`               | always                           | 2tp / (2tp + fp + fn)      | recall    |
  | `fbeta`            | always                           | (1+b²)tp/((1+b²)tp+b²fn+fp) | recall   |
  | `cost`             | always                           | -(c_fp fp + c_fn fn) [1]   | recall    |

  [1] `value` reports the cost itself (lower is better).

- Tie-break, after the primary and secondary keys: the default NMS IoU first, then the grid value
  closest to it (the lower one on equal distance), then the lower threshold. So the choice is a
  pure function of the counts, and identical in the brute force.
- `confidence` (`precision_target` and `recall_target`): certified mode, the default of the
  config. A point is feasible only if `tfcal.certification` certifies it: exact binomial tests
  in a Learn-then-Test fallback sequence along each class's curve, fixed without labels, with
  `level / G` per NMS IoU curve (Bonferroni over the `G` grid values), so the best-recall
  certified point keeps the guarantee after the choice among thresholds and IoUs. Error budget
  (`confidence_budget`): `"per_class"` (default) gives each class `delta = 1 - confidence`
  (each class's statement holds with that probability, not all at once); `"simultaneous"`
  gives each `delta / K_cert`, `K_cert` the classes searched in certified mode, so all of them
  hold together with probability >= `confidence`. `ClassChoice.guarantee` is `"certified"`
  there, `"estimate"` for a point estimate (no confidence, or f1/fbeta/cost) and `"none"` for a
  best-effort or pooled-fallback point.
- Unreachable (no feasible point at any IoU): `on_unreachable="disable"` disables the class;
  `"best_effort"` takes the point that comes closest: for `precision_target` the highest precision
  (its lower bound in confidence mode) with tp > 0, then recall; for `recall_target` the highest
  recall, then precision; a class with no TP anywhere is disabled even then (it would only emit
  false positives); `"error"` raises `UnreachableTargetError` listing every such class.
- `on_unreachable="pool"` (a certified default objective with a learn split; the config's
  default): every class carries the strongest statement its data can carry, and which classes
  are tested how is decided on the learn part, without any certify label:
  - *below target*: a class whose learn part shows it cannot reach the target (the one-sided
    Clopper–Pearson upper bound of its rate, at `confidence`, under the target at every
    threshold of every IoU; `_below_target`) is disabled, status `"below_target"`. Too little
    evidence is never a reason to disable.
  - *the group*: every other class of the default objective (classes under `min_support`
    included) is a member of ONE group, fixed on the learn part. The group shares one
    `(min_score_thresh, nms_iou)`, chosen on its members' calibrated detections pooled and
    certified on their pooled precision (or recall) by the same Learn-then-Test.
  - *alone*: a member whose learn plan is expected to pass (`_Plan.expected_to_pass`) is also
    tested alone. Certified alone, it emits at its own point (status `"ok"`, guarantee
    `"certified"`), or at the group's point when it has more true positives there; a member
    not certified alone emits at the group's point (status and guarantee `"pooled"`: the group
    together keeps the target, the class alone is not promised). The group's hypothesis names
    every member at the group's point in advance, so a class that falls back to it after a
    failed alone test carries a statement whose detections were fixed before the test.
  Error: a member carries one of two statements depending on the certify data, so the two
  are tested as one family by a graphical (sequentially rejective) procedure. Under
  `"per_class"` the group is tested first at `GROUP_SHARE delta`; when it is certified its level
  passes on and each alone test runs at the whole `delta`, else at `(1 - GROUP_SHARE) delta`.
  Each class's family {its alone test, the group} then has family-wise error <= delta under any
  dependence, so the statement it carries fails with probability <= delta. Under
  `"simultaneous"` the family is every certified class's alone test plus the group, each at
  `delta / (K_cert + 1)`; a certified group's share passes on equally, the alone tests then
  run at `delta / K_cert`. When the group cannot be certified, members not certified alone
  are disabled, except those under `min_support`, which keep the uncertified pooled fallback.
- Too little support (`num_gt < min_support`, or no non-ignored detection at any IoU): status
  `insufficient_data`; the class gets the choice of the default objective over all classes'
  detections pooled (per IoU), falling back to the pooled best effort
  when the pooled target is unreachable. Its reported counts are its own at that point.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from tfcal import TfcalError, certification
from tfcal.objective_kinds import (BUDGETS, KINDS, ConfidenceBudget, Counts, Keys,
                                   ObjectiveName, OnUnreachable, check_fields, kind_of)
from tfcal.thresholds import clopper_pearson

log = logging.getLogger(__name__)

Status = Literal["ok", "unreachable", "insufficient_data", "pooled", "below_target"]

#: Under the per-class budget, the share of each class's error `delta` that the pool group's
#: test gets; a member's alone test gets the rest, and all of `delta` once the group is
#: certified (a graphical procedure over the two statements a member can carry), so whichever
#: it carries fails with probability <= `delta`.
GROUP_SHARE = 0.5
Guarantee = Literal["certified", "estimate", "pooled", "none"]


class UnreachableTargetError(TfcalError):
    """Raised by `joint_search` when classes with `on_unreachable="error"` miss the target.

    Attributes:
      columns: the class columns that miss it, ascending.
      num_gt: the ground-truth count of each of those classes on the tune split.
    """

    def __init__(self, message: str, columns: Sequence[int] = (), num_gt: Sequence[int] = ()):
        super().__init__(message)
        self.columns = tuple(int(c) for c in columns)
        self.num_gt = tuple(int(n) for n in num_gt)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What one class is tuned for.

    Attributes:
        name: `{"precision_target", "recall_target", "f1", "fbeta", "cost"}`, default
            `"precision_target"`.
        target_precision: in (0, 1], default 0.9 (`precision_target`).
        target_recall: in (0, 1], default 0.9 (`recall_target`).
        beta: > 0, default 1.0 (`fbeta`).
        c_fp: cost of one false positive, > 0, default 1.0 (`cost`).
        c_fn: cost of one false negative, > 0, default 1.0 (`cost`).
        confidence: in (0, 1) or None (`precision_target` and `recall_target`): certify the
            target at this level (see the module docstring); None is a point estimate.
        on_unreachable: `{"disable", "best_effort", "error", "pool"}`, default `"disable"`
            (the config's default is `"pool"` where it can run; see the module docstring).
    """

    name: ObjectiveName = "precision_target"
    target_precision: float = 0.9
    target_recall: float = 0.9
    beta: float = 1.0
    c_fp: float = 1.0
    c_fn: float = 1.0
    confidence: float | None = None
    on_unreachable: OnUnreachable = "disable"

    def __post_init__(self):
        check_fields(objective=self.name, target_precision=self.target_precision,
                     target_recall=self.target_recall, beta=self.beta, c_fp=self.c_fp,
                     c_fn=self.c_fn, confidence=self.confidence,
                     on_unreachable=self.on_unreachable)

    @property
    def certified(self) -> bool:
        """True when this objective's target is certified (a target objective with confidence)."""
        return KINDS[self.name].certifiable and self.confidence is not None

    def with_overrides(self, **overrides) -> "Objective":
        """Returns a copy with every non-None keyword replaced (config `ClassOverride` fields map
        one to one; `objective=` is accepted for `name`)."""
        if "objective" in overrides:
            overrides["name"] = overrides.pop("objective")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass(frozen=True, eq=False)
class MatchedDetections:
    """The tune split's detections at one NMS IoU, matched once.

    Attributes:
        score: float32 `[D]` calibrated probability of each detection.
        column: int `[D]` class column in `[0, K)`.
        tp: bool `[D]` matched to a non-ignored ground truth at `match_iou`.
        ignored: bool `[D]` matched to an ignored (crowd) ground truth: neither TP nor FP.
        num_gt: int `[K]` non-ignored ground truths per class column (same for every IoU).
    """

    score: np.ndarray
    column: np.ndarray
    tp: np.ndarray
    ignored: np.ndarray
    num_gt: np.ndarray

    def __post_init__(self):
        score = np.asarray(self.score, dtype=np.float32).reshape(-1)
        column = np.asarray(self.column)
        num_gt = np.asarray(self.num_gt)
        if column.size and not np.issubdtype(column.dtype, np.integer):
            if not np.all(column == np.round(column)):
                raise TypeError(f"column must hold integers, got dtype {column.dtype}")
        column = column.astype(np.int64).reshape(-1)
        num_gt = num_gt.astype(np.int64).reshape(-1)
        tp = np.asarray(self.tp, dtype=bool).reshape(-1)
        ignored = np.asarray(self.ignored, dtype=bool).reshape(-1)
        d = score.shape[0]
        for name, arr in (("column", column), ("tp", tp), ("ignored", ignored)):
            if arr.shape[0] != d:
                raise ValueError(f"{name} must have shape [{d}] like score, got {list(arr.shape)}")
        if not np.all(np.isfinite(score)):
            raise ValueError("score must be finite, got NaN or inf")
        k = num_gt.shape[0]
        if k == 0:
            raise ValueError("num_gt must have one entry per class column, got an empty array")
        if np.any(num_gt < 0):
            raise ValueError(f"num_gt must be >= 0, got {num_gt.min()}")
        if d and (column.min() < 0 or column.max() >= k):
            raise ValueError(f"column must be in [0, {k}), "
                             f"got range [{column.min()}, {column.max()}]")
        if np.any(tp & ignored):
            raise ValueError("a detection cannot be both tp and ignored")
        tp_per_class = np.bincount(column[tp], minlength=k)
        if np.any(tp_per_class > num_gt):
            c = int(np.argmax(tp_per_class - num_gt))
            raise ValueError(f"class column {c} has {tp_per_class[c]} true positives but num_gt "
                             f"{num_gt[c]}: each ground truth matches at most one detection")
        for name, arr in (("score", score), ("column", column), ("tp", tp), ("ignored", ignored),
                          ("num_gt", num_gt)):
            object.__setattr__(self, name, arr)

    @property
    def num_classes(self) -> int:
        return int(self.num_gt.shape[0])

    @classmethod
    def from_match(cls, match, class_ids) -> "MatchedDetections":
        """From a `tfcal.coco.matching.MatchResult` and the category id of every class column.

        Args:
            match: a `MatchResult` (uses `score`, `category_id`, `tp`, `ignored`,
                `category_ids`, `num_gt`).
            class_ids: int `[K]` category id of each column (distinct). Detections of other
                categories are dropped; a column whose category has no ground truth gets
                `num_gt` 0.
        """
        class_ids = np.asarray(class_ids, np.int64).reshape(-1)
        if np.unique(class_ids).size != class_ids.size:
            raise ValueError(f"class_ids must be distinct, got {class_ids.tolist()}")
        order = np.argsort(class_ids, kind="stable")
        sorted_ids = class_ids[order]
        cat = np.asarray(match.category_id, np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, cat), 0, max(class_ids.size - 1, 0))
        known = sorted_ids[pos] == cat
        num_gt = np.zeros(class_ids.size, np.int64)
        gt_ids = np.asarray(match.category_ids, np.int64)
        has = np.isin(class_ids, gt_ids)
        num_gt[has] = np.asarray(match.num_gt, np.int64)[np.searchsorted(gt_ids, class_ids[has])]
        return cls(np.asarray(match.score)[known], order[pos[known]],
                   np.asarray(match.tp)[known], np.asarray(match.ignored)[known], num_gt)


@dataclasses.dataclass(frozen=True, eq=False)
class Curves:
    """Precision/recall of every class against threshold at one NMS IoU (tune split).

    Points are grouped by class column and sorted by decreasing threshold; class `k` owns rows
    `offsets[k]:offsets[k + 1]`.

    Attributes:
        nms_iou: the grid value.
        column: int32 `[P]`. threshold: float32 `[P]`.
        tp, fp: int64 `[P]` counts at `score >= threshold`.
        num_gt: int64 `[K]`. offsets: int64 `[K + 1]`.
    """

    nms_iou: float
    column: np.ndarray
    threshold: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    num_gt: np.ndarray
    offsets: np.ndarray

    def for_class(self, column: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns `(threshold, precision, recall)`: float64 `[P_k]` of one class, threshold
        descending."""
        s = slice(int(self.offsets[column]), int(self.offsets[column + 1]))
        tp, fp = self.tp[s], self.fp[s]
        n = int(self.num_gt[column])
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = tp / n if n > 0 else np.zeros(tp.shape)
        return self.threshold[s].astype(np.float64), precision, recall


@dataclasses.dataclass(frozen=True)
class PointCounts:
    """One class's counts at one operating point.

    Attributes:
        tp, fp: true and false positives there (non-ignored detections).
        num_gt: non-ignored ground truths of the class.
    """

    tp: int
    fp: int
    num_gt: int

    @property
    def fn(self) -> int:
        return self.num_gt - self.tp

    @property
    def precision(self) -> float:
        """`tp / (tp + fp)`, 0.0 when nothing is predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """`tp / num_gt`, 0.0 without ground truth."""
        return self.tp / self.num_gt if self.num_gt else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassChoice:
    """The chosen operating point of one class, measured on the tune split.

    Attributes:
        column: class column.
        status: `"ok"`, `"unreachable"`, `"insufficient_data"`, `"pooled"` (a member of the
            `on_unreachable="pool"` group, emitted at the group's certified point) or
            `"below_target"` (disabled: the learn part shows it below the target).
        enabled: False when the class is never emitted (unreachable with `disable`, or no TP).
        min_score_thresh: chosen threshold (a float32 value; 1.0 for a disabled class).
        nms_iou: chosen NMS IoU (the default IoU for a disabled class).
        tp, fp, fn: counts at the chosen point (0, 0, num_gt when disabled).
        num_gt: non-ignored ground truths of the class.
        precision, recall: at the chosen point.
        value: the class objective's value there (see the module docstring; NaN when disabled).
        precision_lower: one-sided Clopper–Pearson lower bound of the tune precision at the
            class's per-curve test level (certified or best-effort precision_target), else NaN.
        objective: the objective name used for this class.
        guarantee: `"certified"` (the target is certified, see the module docstring),
            `"estimate"` (a point estimate), `"pooled"` (one shared threshold: only the pooled
            number is certified or estimated, see `pooled_search`, or the group's with
            `on_unreachable="pool"`) or `"none"` (best effort, pooled fallback, disabled).
        test_level: the family-wise level of each of this class's IoU curves in certified mode
            (`delta / G`, or `delta / (K_cert G)` simultaneously), else NaN.
        p_value: the exact binomial p-value at the chosen point in certified mode, else NaN.
        boxes_to_certify: for a class that could not be certified, the estimated labelled boxes
            it would need at the target, over all the tune images (learn and certify parts;
            None when its curve never exceeds the target, or when not in certified mode).
        boxes_available: the labelled boxes it has there now (certified mode, else None).
    """

    column: int
    status: Status
    enabled: bool
    min_score_thresh: float
    nms_iou: float
    tp: int
    fp: int
    fn: int
    num_gt: int
    precision: float
    recall: float
    value: float
    precision_lower: float = math.nan
    objective: str = "precision_target"
    guarantee: Guarantee = "estimate"
    test_level: float = math.nan
    p_value: float = math.nan
    boxes_to_certify: int | None = None
    boxes_available: int | None = None

    @classmethod
    def at_counts(cls, column: int, status: Status, counts: PointCounts, *,
                  min_score_thresh: float, nms_iou: float, value: float,
                  **fields) -> "ClassChoice":
        """An emitted class at the point `(min_score_thresh, nms_iou)` with `counts` there (fn,
        precision and recall follow from them; 0.0 when undefined)."""
        return cls(column=column, status=status, enabled=True, min_score_thresh=min_score_thresh,
                   nms_iou=nms_iou, tp=counts.tp, fp=counts.fp, fn=counts.fn,
                   num_gt=counts.num_gt, precision=counts.precision, recall=counts.recall,
                   value=value, **fields)

    @classmethod
    def disabled(cls, column: int, status: Status, *, nms_iou: float, num_gt: int,
                 **fields) -> "ClassChoice":
        """A class never emitted: threshold 1.0, no detection, every ground truth missed."""
        return cls(column=column, status=status, enabled=False, min_score_thresh=1.0,
                   nms_iou=nms_iou, tp=0, fp=0, fn=num_gt, num_gt=num_gt, precision=0.0,
                   recall=0.0, value=math.nan, **fields)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
    """Everything `joint_search` found.

    Attributes:
        classes: one `ClassChoice` per class column, in column order.
        nms_iou_grid: the grid, as given.
        default_nms_iou: the IoU ties were broken toward.
        curves: one `Curves` per grid value, in grid order.
        iou_table: float64 `[G, K]`: best objective value of each class at each IoU (NaN where no
            feasible point): the trade-off across the grid, for plots.
        pooled: the pooled choice used for `insufficient_data` classes, or with
            `on_unreachable="pool"` the group's certified choice (column -1), or None.
        group: the `on_unreachable="pool"` group's members (fixed on the learn part, whether
            or not each is emitted at the group's point), ascending; () without a group.
    """

    classes: tuple[ClassChoice, ...]
    nms_iou_grid: tuple[float, ...]
    default_nms_iou: float
    curves: tuple[Curves, ...]
    iou_table: np.ndarray
    pooled: ClassChoice | None = None
    group: tuple[int, ...] = ()

    @property
    def min_score_thresh(self) -> tuple[float, ...]:
        """The `PostProcessConfig.min_score_thresh` this search sets, K floats."""
        return tuple(float(c.min_score_thresh) for c in self.classes)

    @property
    def nms_iou(self) -> tuple[float, ...]:
        """The `PostProcessConfig.nms_iou` this search sets, K floats."""
        return tuple(float(c.nms_iou) for c in self.classes)

    @property
    def class_enabled(self) -> tuple[bool, ...]:
        """The `PostProcessConfig.class_enabled` this search sets, K bools."""
        return tuple(bool(c.enabled) for c in self.classes)


# ----------------------------------------------------------------------------------------------
# Counting


@dataclasses.dataclass(frozen=True, eq=False)
class _Sorted:
    """Non-ignored detections of one IoU sorted by (column, score desc), with segment cumsums."""

    score: np.ndarray  # float32 [n]
    tp_cum: np.ndarray  # int64 [n]
    fp_cum: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [K + 1]

    def counts_at_many(self, column: int, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 `[T]` TP and FP counts of class `column` at `score >= thresholds[j]`."""
        lo, hi = int(self.offsets[column]), int(self.offsets[column + 1])
        cnt = np.searchsorted(-self.score[lo:hi], -np.asarray(thresholds, np.float32),
                              side="right")
        has = cnt > 0
        tp = np.zeros(cnt.shape, np.int64)
        fp = np.zeros(cnt.shape, np.int64)
        tp[has] = self.tp_cum[lo + cnt[has] - 1]
        fp[has] = self.fp_cum[lo + cnt[has] - 1]
        return tp, fp

    def counts_at(self, column: int, threshold: float) -> tuple[int, int]:
        lo, hi = int(self.offsets[column]), int(self.offsets[column + 1])
        k = int(np.searchsorted(-self.score[lo:hi], -np.float32(threshold), side="right"))
        if k == 0:
            return 0, 0
        return int(self.tp_cum[lo + k - 1]), int(self.fp_cum[lo + k - 1])


def _sort_and_count(score, column, tp, num_classes) -> _Sorted:
    order = np.lexsort((-score, column))  # column ascending, then score descending
    s, c, t = score[order], column[order], tp[order]
    counts = np.bincount(c, minlength=num_classes)
    offsets = np.zeros(num_classes + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    ctp = np.cumsum(t, dtype=np.int64)
    start = offsets[c]
    ctp_before = np.concatenate([[0], ctp])[start]
    tp_cum = ctp - ctp_before
    fp_cum = (np.arange(1, s.shape[0] + 1) - start) - tp_cum
    return _Sorted(s, tp_cum, fp_cum, offsets)


def _curves(srt: _Sorted, num_gt, nms_iou, thresholds) -> Curves:
    k = num_gt.shape[0]
    n = srt.score.shape[0]
    if thresholds is None:
        col_of = np.repeat(np.arange(k), np.diff(srt.offsets))
        last = np.ones(n, bool)  # last row of each run of equal (column, score)
        last[:-1] = (col_of[1:] != col_of[:-1]) | (srt.score[1:] != srt.score[:-1])
        idx = np.flatnonzero(last)
        column = col_of[idx]
        threshold = srt.score[idx]
        tp, fp = srt.tp_cum[idx], srt.fp_cum[idx]
        per = np.bincount(column, minlength=k)
    else:
        thr = thresholds  # float32, descending
        m = thr.shape[0]
        tp = np.zeros((k, m), np.int64)
        fp = np.zeros((k, m), np.int64)
        for col in range(k):  # cheap: one searchsorted per class
            lo, hi = srt.offsets[col], srt.offsets[col + 1]
            if hi == lo:
                continue
            cnt = np.searchsorted(-srt.score[lo:hi], -thr, side="right")
            has = cnt > 0
            tp[col, has] = srt.tp_cum[lo + cnt[has] - 1]
            fp[col, has] = srt.fp_cum[lo + cnt[has] - 1]
        column = np.repeat(np.arange(k), m)
        threshold = np.tile(thr, k)
        tp, fp = tp.reshape(-1), fp.reshape(-1)
        per = np.full(k, m)
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(per, out=offsets[1:])
    return Curves(float(nms_iou), column.astype(np.int32), threshold.astype(np.float32),
                  tp.astype(np.int64), fp.astype(np.int64), num_gt.astype(np.int64), offsets)


# ----------------------------------------------------------------------------------------------
# Objective keys


def _cp_lower(tp, n, level):
    """One-sided Clopper–Pearson lower bound of tp/n with error `level` per point (0 where
    tp == 0), via `tfcal.thresholds.clopper_pearson` (one call per distinct level)."""
    tp = np.asarray(tp, np.float64)
    n = np.asarray(n, np.float64)
    lv = np.broadcast_to(np.asarray(level, np.float64), tp.shape)
    out = np.zeros(tp.shape)
    for a in np.unique(lv):
        m = lv == a
        if m.any():
            out[m] = np.asarray(clopper_pearson(tp[m], n[m], 1.0 - float(a), sided="one")[0])
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Ranking:
    """How one objective ranks points: its `Keys`, the best-effort primary key, and the
    precision lower bound (float64 arrays of the points' shape)."""

    keys: Keys
    fallback_primary: np.ndarray
    precision_lower: np.ndarray


def _keys(obj: Objective, tp, fp, num_gt, level) -> _Ranking:
    """The objective's ranking of the points. `keys.feasible` is the point-estimate rule;
    certified objectives replace it with the certified points. `level` is the per-point test
    level of a certified objective (its best effort ranks by the lower confidence bound of the
    certified rate at that level, which orders points as the rate does at a fixed number of
    boxes), or None."""
    c = Counts.of(tp, fp, num_gt)
    kind = kind_of(obj.name)
    k = kind.keys(obj, c)
    lower = np.full(c.tp.shape, np.nan)
    fb_primary = k.fallback_primary
    if kind.metric == "precision" and level is not None and obj.on_unreachable == "best_effort":
        lower = _cp_lower(c.tp, kind.trials(c.tp, c.fp, num_gt), level)
        fb_primary = lower  # best effort ranks by it; else the lower bound is for the choice only
    return _Ranking(k, fb_primary, lower)


def _learn_detections(srt: _Sorted, column: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float32 `[D]`, descending) and TP flags (bool `[D]`) of one class's detections."""
    lo, hi = int(srt.offsets[column]), int(srt.offsets[column + 1])
    return srt.score[lo:hi], np.diff(srt.tp_cum[lo:hi], prepend=0) > 0


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """A class's Learn-then-Test plan on one IoU curve, and its outcome on the certify part.

    Attributes:
        iou: index of the chosen NMS IoU in the grid.
        rows: int64 `[R]` rows of that IoU's `Curves` in test order (the fixed sequence).
        certified: bool `[R]` the points the certify part certifies.
        p_value: float64 `[R]` their exact binomial p-values.
        start_chance: the learn part's predicted probability that the first test passes.
        value: what the plan was chosen by (precision: expected certified TPs; recall: the
            predicted precision at the run's end).
    """

    iou: int
    rows: np.ndarray
    certified: np.ndarray
    p_value: np.ndarray
    start_chance: float
    value: float

    @property
    def expected_to_pass(self) -> bool:
        """The learn part expects the sequence's first test to pass (chance >= 0.5)."""
        return self.start_chance >= 0.5


def _plan_precision(obj: Objective, cv: Curves, learn: _Sorted, column: int, level: float,
                    num_gt_learn: int, first_level: float):
    """`(value, rows, p-values, start chance, start)` of one IoU curve for `precision_target`,
    or None: `rows` are every label-free tested point from the top, `start` the planned one.

    A smooth model of the learn split's TP chance by score (`certification.TpChanceModel`)
    simulates the certify split's labels at its own label-free detection counts; each tested
    point's value is the expected TP certified by the fixed sequence started there
    (`certification.plan_precision_run`)."""
    lo, hi = int(cv.offsets[column]), int(cv.offsets[column + 1])
    tp, fp, thr = cv.tp[lo:hi], cv.fp[lo:hi], cv.threshold[lo:hi]
    n = tp + fp
    # The first point can pass at `first_level` (the smallest weight of the sequence).
    rows = certification.grid_points(n, certification.min_count(obj.target_precision,
                                                                first_level))
    if rows.size == 0:
        return None
    score_l, tp_l = _learn_detections(learn, column)
    expected = np.zeros(rows.shape)  # no learn detection: from the top, valued 0
    chance = np.zeros(rows.shape)
    if score_l.size:
        model = certification.TpChanceModel.fit(score_l, tp_l)
        expected, chance = certification.plan_precision_run(
            model, thr, n, rows, obj.target_precision, level, with_pass=True)
    # A hopeless curve (value 0) is still tested from its first point: it costs nothing.
    start = int(np.argmax(expected))
    p = certification.binomial_pvalue(tp[rows], n[rows], obj.target_precision)
    return float(expected[start]), lo + rows, p, float(chance[start]), start


def _plan_recall(obj: Objective, cv: Curves, learn: _Sorted, column: int, level: float,
                 num_gt_learn: int, first_level: float):
    """`(value, rows, p-values, start chance, 0)` of one IoU curve for `recall_target`, or None:
    from the lowest threshold up, as far as the learn split predicts passes; valued by the
    learn split's precision at the run's end."""
    lo, hi = int(cv.offsets[column]), int(cv.offsets[column + 1])
    tp, thr = cv.tp[lo:hi], cv.threshold[lo:hi]
    n_gt = int(cv.num_gt[column])
    if n_gt < certification.min_count(obj.target_recall, level):
        return None
    rows = np.arange(hi - lo)[::-1]  # from the lowest threshold up
    t_l, f_l = learn.counts_at_many(column, thr[rows])
    passing = certification.predictive_pass_probability(
        t_l, num_gt_learn - t_l, np.full(rows.shape, n_gt), obj.target_recall, level) >= 0.5
    run = int(np.cumprod(passing).sum())
    if run == 0:
        return None
    e = run - 1
    p = certification.binomial_pvalue(tp[rows], np.full(rows.shape, n_gt), obj.target_recall)
    # the run's first point is predicted to pass
    return float(t_l[e] / max(t_l[e] + f_l[e], 1)), lo + rows, p, 1.0, 0


#: The learn-part planner of each certified rate (`Kind.metric`).
_PLANNERS = {"precision": _plan_precision, "recall": _plan_recall}


def _learned_plan(obj: Objective, curves: Sequence[Curves], learn: Sequence[_Sorted],
                  column: int, num_gt_learn: int, level: float, ranks: np.ndarray,
                  top_share: float = 0.0) -> _Plan | None:
    """Learn then test for one class: the learn split picks the NMS IoU and where the sequence
    starts; the certify split (`curves`) tests one fixed sequence at the class's whole level.
    The best-valued IoU is kept (ties: the IoU nearest the default). None when no IoU can be
    tested (precision: too few certify detections; recall: too few boxes, or the learn split
    predicts no pass).

    With `top_share > 0` (precision) the sequence is a fallback procedure over every tested
    point from the top: `top_share` of the level on the first point, the rest on the planned
    start (`certification.fallback_reject`), so a plan the learn part got wrong still
    certifies what the certify part shows from the top."""
    planner = _PLANNERS[kind_of(obj.name).metric]
    best = None
    for i, cv in enumerate(curves):
        if cv.offsets[column + 1] == cv.offsets[column]:
            continue
        found = planner(obj, cv, learn[i], column, level, num_gt_learn,
                        level * top_share if top_share > 0 else level)
        if found is None:
            continue
        if best is None or (-found[0], int(ranks[i])) < (-best[0][0], int(ranks[best[1]])):
            best = (found, i)
    if best is None:
        return None
    (value, rows, p, chance, start), i = best
    if top_share <= 0.0:  # one fixed sequence from the planned start
        rows, p = rows[start:], p[start:]
        start = 0
    weights = np.zeros(rows.shape)
    weights[0] += top_share
    weights[start] += 1.0 - top_share
    return _Plan(i, rows, certification.fallback_reject(p, weights, level), p, chance, value)


def _boxes_to_certify(obj: Objective, curves: Sequence[Curves], column: int, level: float):
    """The smallest estimated box count over the class's IoU curves (None if none can)."""
    kind = kind_of(obj.name)
    best = None
    for cv in curves:
        s = slice(int(cv.offsets[column]), int(cv.offsets[column + 1]))
        need = kind.boxes_to_certify(obj, cv.tp[s], cv.fp[s], int(cv.num_gt[column]), level)
        if need is not None and (best is None or need < best):
            best = need
    return best


def _pick(group, primary, secondary, iou_rank, threshold, candidates, num_groups):
    """Index of the best candidate point per group (-1 if none), by the documented key order."""
    chosen = np.full(num_groups, -1, np.int64)
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return chosen
    order = np.lexsort((threshold[idx], iou_rank[idx], -secondary[idx], -primary[idx], group[idx]))
    idx = idx[order]
    g = group[idx]
    first = np.ones(idx.size, bool)
    first[1:] = g[1:] != g[:-1]
    chosen[g[first]] = idx[first]
    return chosen


def _iou_ranks(grid: Sequence[float], default: float) -> np.ndarray:
    """Rank 0 = default IoU, then by distance to it, the lower IoU first on equal distance."""
    order = sorted(range(len(grid)), key=lambda i: (abs(grid[i] - default), grid[i]))
    ranks = np.empty(len(grid), np.int64)
    ranks[order] = np.arange(len(grid))
    return ranks


def default_iou(grid: Sequence[float]) -> float:
    """The default NMS IoU when none is configured: the grid's middle value (the lower middle)."""
    s = sorted(grid)
    return float(s[(len(s) - 1) // 2])


# ----------------------------------------------------------------------------------------------
# The search


@dataclasses.dataclass(frozen=True, eq=False)
class _Points:
    """Every curve point of every IoU, concatenated (IoU-major, then class, threshold desc)."""

    col: np.ndarray
    thv: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gi: np.ndarray
    base: np.ndarray  # int64 [G]: first row of each IoU's curve

    @classmethod
    def of(cls, curves: Sequence[Curves]) -> "_Points":
        sizes = np.array([c.column.shape[0] for c in curves], np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return cls(np.concatenate([c.column for c in curves]).astype(np.int64),
                   np.concatenate([c.threshold for c in curves]),
                   np.concatenate([c.tp for c in curves]),
                   np.concatenate([c.fp for c in curves]),
                   np.repeat(np.arange(len(curves), dtype=np.int64), sizes), base)


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """The validated inputs of one search: the grid, the certify (or tune) split's sorted
    detections and curves, and the learn split's sorted detections (or None)."""

    grid: tuple[float, ...]
    mds: list
    num_gt: np.ndarray
    default_nms_iou: float
    ranks: np.ndarray
    thr: np.ndarray | None
    sorted_: list
    curves: list
    pts: _Points
    learn_sorted: list | None
    learn_gt: np.ndarray | None

    @property
    def k(self) -> int:
        return int(self.num_gt.shape[0])

    @classmethod
    def of(cls, matched, default_nms_iou, thresholds, learn) -> "_Setup":
        if not matched:
            raise ValueError("matched must hold at least one NMS IoU, got an empty mapping")
        grid = tuple(float(g) for g in matched)
        mds = [matched[g] for g in matched]
        num_gt = mds[0].num_gt
        k = num_gt.shape[0]
        for g, md in zip(grid, mds):
            if not np.array_equal(md.num_gt, num_gt):
                raise ValueError(f"num_gt must be the same at every NMS IoU; it differs at "
                                 f"nms_iou={g}")
        if default_nms_iou is None:
            default_nms_iou = default_iou(grid)
        if float(default_nms_iou) not in grid:
            raise ValueError(f"default_nms_iou must be one of the grid {list(grid)}, "
                             f"got {default_nms_iou}")
        thr = None
        if thresholds is not None:
            thr = np.unique(np.asarray(thresholds, np.float32).reshape(-1))[::-1]
            if thr.size == 0 or not np.all(np.isfinite(thr)):
                raise ValueError(f"thresholds must be a non-empty list of finite values, "
                                 f"got {thresholds!r}")
        sorted_ = [_sort_and_count(md.score[~md.ignored], md.column[~md.ignored],
                                   md.tp[~md.ignored], k) for md in mds]
        curves = [_curves(srt, num_gt, g, thr) for g, srt in zip(grid, sorted_)]
        learn_sorted = learn_gt = None
        if learn is not None:
            if tuple(float(g) for g in learn) != grid:
                raise ValueError(f"learn must have the grid {list(grid)}, got {list(learn)}")
            learn_sorted = [_sort_and_count(md.score[~md.ignored], md.column[~md.ignored],
                                            md.tp[~md.ignored], k) for md in learn.values()]
            learn_gt = next(iter(learn.values())).num_gt
            if learn_gt.shape[0] != k:
                raise ValueError(f"learn must have {k} class columns, got {learn_gt.shape[0]}")
        return cls(grid, mds, num_gt, float(default_nms_iou),
                   _iou_ranks(grid, float(default_nms_iou)), thr, sorted_, curves,
                   _Points.of(curves), learn_sorted, learn_gt)


@dataclasses.dataclass(frozen=True, eq=False)
class _Budget:
    """Who is certified and at which level.

    Attributes:
        cert_cols: the class columns searched in certified mode.
        level: float64 `[K]` each class's test level (per IoU curve without a learn split),
            NaN for classes not certified.
        group_level: the `on_unreachable="pool"` group's level, NaN without a group.
    """

    cert_cols: tuple[int, ...]
    level: np.ndarray
    group_level: float

    @classmethod
    def of(cls, setup: _Setup, objectives, objective: Objective, insufficient,
           confidence_budget: str, joins, group_certified: bool = False) -> "_Budget":
        """The levels; with a group (`joins`), those after its test: the graphical procedure
        passes a certified group's level on to the alone tests (see the module docstring)."""
        pool = any(joins)
        cert_cols = tuple(c for c in range(setup.k)
                          if not insufficient[c] and objectives[c].certified)
        # One more statement for the group: the simultaneous budget splits delta over it too.
        statements = len(cert_cols) + (1 if pool else 0)
        simultaneous = confidence_budget == "simultaneous"
        share = statements if simultaneous else 1
        if simultaneous and pool and group_certified and cert_cols:
            share = len(cert_cols)  # the group's delta / (K + 1) shared by the K alone tests
        level = np.full(setup.k, np.nan)
        for c in cert_cols:
            delta = (1.0 - objectives[c].confidence) / share
            if joins[c] and not simultaneous and not group_certified:
                delta *= 1.0 - GROUP_SHARE  # a member may carry either statement: see below
            level[c] = delta if setup.learn_sorted is not None else delta / len(setup.grid)
        group_level = math.nan
        if pool:
            group_level = (1.0 - objective.confidence) / (statements if simultaneous else 1)
            if not simultaneous:
                group_level *= GROUP_SHARE
        return cls(cert_cols, level, group_level)


@dataclasses.dataclass(eq=False)
class _PointTable:
    """Every curve point's ranking keys and certification (float64 / bool `[P]`)."""

    feasible: np.ndarray
    primary: np.ndarray
    secondary: np.ndarray
    value: np.ndarray
    fb_primary: np.ndarray
    fb_secondary: np.ndarray
    lower: np.ndarray
    pvalue: np.ndarray

    @classmethod
    def rank(cls, setup: _Setup, objectives, budget: _Budget) -> "_PointTable":
        """The point-estimate ranking of every point under its class's objective."""
        pts = setup.pts
        n = pts.col.shape[0]
        table = cls(np.zeros(n, bool), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n),
                    np.zeros(n), np.full(n, np.nan), np.full(n, np.nan))
        ngt = setup.num_gt[pts.col]
        for obj in dict.fromkeys(objectives):  # distinct objectives, deterministic order
            m = np.isin(pts.col, [c for c in range(setup.k) if objectives[c] == obj])
            lv = budget.level[pts.col[m]] if obj.certified else None
            r = _keys(obj, pts.tp[m], pts.fp[m], ngt[m], lv)
            table.feasible[m] = r.keys.feasible
            table.primary[m] = r.keys.primary
            table.secondary[m] = r.keys.secondary
            table.value[m] = r.keys.value
            table.fb_primary[m] = r.fallback_primary
            table.fb_secondary[m] = r.keys.fallback_secondary
            table.lower[m] = r.precision_lower
        return table


def _certify(setup: _Setup, table: _PointTable, objectives, budget: _Budget, joins) -> None:
    """Replaces the point-estimate rule of certified classes by their certified points (in
    place). With a learn split each class is planned there (`_learned_plan`); a class that
    `joins` the group and is not expected to certify alone (the learn part) is not tested alone:
    the group speaks for it.
    """
    pts = setup.pts
    for c in budget.cert_cols:
        for i, cv in enumerate(setup.curves):
            s = slice(int(pts.base[i] + cv.offsets[c]), int(pts.base[i] + cv.offsets[c + 1]))
            table.feasible[s] = False
            if setup.learn_sorted is None:
                ok, p = kind_of(objectives[c].name).certify(
                    objectives[c], pts.tp[s], pts.fp[s], int(setup.num_gt[c]), budget.level[c])
                table.feasible[s] = ok & (pts.tp[s] > 0)
                table.pvalue[s] = p
        if setup.learn_sorted is None:
            continue
        plan = _learned_plan(objectives[c], setup.curves, setup.learn_sorted, c,
                             int(setup.learn_gt[c]), budget.level[c], setup.ranks)
        if joins[c] and (plan is None or not plan.expected_to_pass):
            continue  # not expected to certify alone (learn part): not tested alone
        if plan is not None:
            at = pts.base[plan.iou] + plan.rows
            table.feasible[at] = plan.certified & (pts.tp[at] > 0)
            table.pvalue[at] = plan.p_value


def _below_target(setup: _Setup, obj: Objective, column: int) -> bool:
    """Whether the learn part shows that class `column` cannot reach its target at any
    threshold: it has learn evidence (detections for precision, ground truth for recall) and the
    one-sided Clopper–Pearson upper bound of the rate, at `confidence`, is below the target at
    every threshold of every IoU curve (recall: at the lowest threshold, where it is highest).
    A learn-part decision: it uses no certify label, so it costs no error.

    Every threshold counts, the highest (one detection) too: a class is never disabled for
    lack of evidence. With a precision target <= `confidence` (0.9 at 0.95) the top detection
    alone keeps the bound above it, so such a class is never shown below the target; its
    detections still enter the group only above the group's calibrated threshold.
    """
    kind = kind_of(obj.name)
    target = kind.target(obj)
    n_gt = int(setup.learn_gt[column])
    seen = False
    for srt in setup.learn_sorted:
        lo, hi = int(srt.offsets[column]), int(srt.offsets[column + 1])
        if kind.metric == "precision":
            if hi == lo:
                continue
            tp, trials = srt.tp_cum[lo:hi], np.arange(1, hi - lo + 1)
        else:
            if n_gt == 0:
                continue
            tp = np.array([srt.tp_cum[hi - 1] if hi > lo else 0])  # the lowest threshold
            trials = np.array([n_gt])
        seen = True
        upper = clopper_pearson(tp, trials, obj.confidence, sided="one")[1]
        if np.any(np.asarray(upper) >= target):
            return False
    return seen


@dataclasses.dataclass(frozen=True, eq=False)
class _Chooser:
    """Turns a point of the table into a class's `ClassChoice` (the search's last step)."""

    setup: _Setup
    table: _PointTable
    objective: Objective
    objectives: list
    budget: _Budget

    def need(self, c: int) -> int | None:
        """Estimated boxes class `c` needs to be certified (both splits grow), or None."""
        setup = self.setup
        if c not in self.budget.cert_cols:
            return None
        got = _boxes_to_certify(self.objectives[c], setup.curves, c, self.budget.level[c])
        if got is None or setup.learn_gt is None or setup.num_gt[c] == 0:
            return got
        return int(math.ceil(got * (setup.num_gt[c] + setup.learn_gt[c]) / setup.num_gt[c]))

    def have(self, c: int) -> int | None:
        """Labelled boxes class `c` has over the learn and certify parts (certified mode)."""
        if c not in self.budget.cert_cols:
            return None
        learn = self.setup.learn_gt[c] if self.setup.learn_gt is not None else 0
        return int(self.setup.num_gt[c] + learn)

    def disabled(self, c: int, status: Status, obj: Objective) -> ClassChoice:
        return ClassChoice.disabled(c, status, nms_iou=self.setup.default_nms_iou,
                                    num_gt=int(self.setup.num_gt[c]), objective=obj.name,
                                    guarantee="none", test_level=float(self.budget.level[c]),
                                    boxes_to_certify=self.need(c), boxes_available=self.have(c))

    def at_point(self, c: int, status: Status, i: int, obj: Objective) -> ClassChoice:
        """Class `c` at its own point `i` of the table."""
        pts, table, level = self.setup.pts, self.table, self.budget.level
        t, f = int(pts.tp[i]), int(pts.fp[i])
        if obj.certified and kind_of(obj.name).metric == "precision" \
                and math.isnan(table.lower[i]):
            table.lower[i] = _cp_lower(np.array([t]), np.array([t + f]), level[c])[0]
        certified = status == "ok" and c in self.budget.cert_cols
        guarantee = "certified" if certified else ("estimate" if status == "ok" else "none")
        return ClassChoice.at_counts(
            c, status, PointCounts(t, f, int(self.setup.num_gt[c])),
            min_score_thresh=float(pts.thv[i]), nms_iou=self.setup.grid[pts.gi[i]],
            value=float(table.value[i]), precision_lower=float(table.lower[i]),
            objective=obj.name, guarantee=guarantee,
            test_level=float(level[c]),
            p_value=float(table.pvalue[i]) if certified else math.nan,
            boxes_to_certify=None if certified else self.need(c), boxes_available=self.have(c))

    def at_shared(self, c: int, status: Status, point, **extra) -> ClassChoice:
        """Class `c` at a shared `(grid index, threshold)`, with its own counts there."""
        g_idx, t_shared = point
        t, f = self.setup.sorted_[g_idx].counts_at(c, t_shared)
        n = int(self.setup.num_gt[c])
        val = _keys(self.objective, np.array([t]), np.array([f]), np.array([n]),
                    None).keys.value[0]
        return ClassChoice.at_counts(c, status, PointCounts(t, f, n),
                                     min_score_thresh=float(t_shared),
                                     nms_iou=self.setup.grid[g_idx], value=float(val),
                                     objective=self.objective.name, **extra)


def _check_pool(objective: Objective, objectives, learn) -> bool:
    """Whether the `on_unreachable="pool"` group is searched; ValueError when it cannot be."""
    pool = objective.on_unreachable == "pool"
    if any(o.on_unreachable == "pool" for o in objectives) and not pool:
        raise ValueError("on_unreachable='pool' is set on the default objective (the group is "
                         "searched for it), not on an override alone")
    if pool:
        if not objective.certified:
            raise ValueError("on_unreachable='pool' needs a certified objective (a target with "
                             "a confidence): the group's pooled target is what is certified")
        if learn is None:
            raise ValueError("on_unreachable='pool' needs learn (a learn split): which classes "
                             "form the group is decided there, without the certify labels")
    return pool


def joint_search(
    matched: Mapping[float, MatchedDetections],
    objective: Objective = Objective(),
    *,
    overrides: Mapping[int, Objective] | None = None,
    default_nms_iou: float | None = None,
    min_support: int = 10,
    thresholds: Sequence[float] | np.ndarray | None = None,
    confidence_budget: ConfidenceBudget = "per_class",
    learn: Mapping[float, MatchedDetections] | None = None,
) -> SearchResult:
    """Chooses `(min_score_thresh, nms_iou)` per class column from matched tune-split detections.

    With `learn` (the detections of other tune images, at the same grid), certified classes use
    Learn-then-Test with a learn split: `learn` chooses each class's NMS IoU and where its
    sequence starts (the point most likely to pass), and `matched` (the certify split) tests one
    fixed sequence at the class's whole level; no Bonferroni over the grid is needed, since the
    choice was made on other images. Without it, the grid is paid for by Bonferroni.

    The search runs in three steps, each owned by one helper: the setup (`_Setup`: validated
    inputs, sorted counts, curves), the feasibility of every point (`_PointTable.rank`, then
    `_certify` with each class's `_Plan`), and the choice (`_pick`, then `_Chooser`).

    Args:
        matched: `{nms_iou: MatchedDetections}` for every value of the NMS IoU grid (insertion
            order is the grid order). Every entry must have the same `num_gt`.
        objective: the default `Objective` for every class.
        overrides: `{column: Objective}` replacing the default for some classes.
        default_nms_iou: the IoU ties are broken toward; must be in the grid. Default: the grid's
            middle value (`default_iou`).
        min_support: classes with fewer non-ignored ground truths get the pooled fallback.
        thresholds: explicit candidate thresholds shared by all classes, or None (default) for
            the observed scores (label-free either way).
        confidence_budget: `{"per_class", "simultaneous"}`, default `"per_class"` (see the
            module docstring).
        learn: `{nms_iou: MatchedDetections}` of the learn split (same grid and classes), or
            None. Used by certified objectives only; counts and curves are the certify split's.

    Returns:
        A `SearchResult`.

    Raises:
        ValueError: inconsistent inputs (empty grid, grid mismatch, bad override column).
        UnreachableTargetError: classes with `on_unreachable="error"` cannot reach the target.
    """
    setup = _Setup.of(matched, default_nms_iou, thresholds, learn)
    k, grid, num_gt, pts = setup.k, setup.grid, setup.num_gt, setup.pts
    overrides = dict(overrides or {})
    for col in overrides:
        if not (isinstance(col, (int, np.integer)) and 0 <= col < k):
            raise ValueError(f"overrides keys must be class columns in [0, {k}), got {col!r}")
    if confidence_budget not in BUDGETS:
        raise ValueError(f"confidence_budget must be one of {BUDGETS}, got {confidence_budget!r}")
    objectives = [overrides.get(c, objective) for c in range(k)]
    pool = _check_pool(objective, objectives, learn)
    dets_per_class = np.max([np.diff(s.offsets) for s in setup.sorted_], axis=0)
    insufficient = (num_gt < min_support) | (dets_per_class < 1)
    # Group members share the default objective; an override with another target is not one.
    joins = [pool and objectives[c] == objective for c in range(k)]
    budget = _Budget.of(setup, objectives, objective, insufficient, confidence_budget, joins)
    # The group: every joining class the learn part does not show below the target. It is
    # tested first; a certified group passes its level on to the alone tests.
    below = [joins[c] and _below_target(setup, objective, c) for c in range(k)]
    group = [c for c in range(k) if joins[c] and not below[c]]
    group_choice, group_point = None, None
    if pool and group:
        group_choice, group_point = _group_search(matched, learn, group, objective,
                                                  budget.group_level, setup.thr,
                                                  setup.default_nms_iou)
        budget = _Budget.of(setup, objectives, objective, insufficient, confidence_budget,
                            joins, group_certified=group_point is not None)

    # Feasibility: the point-estimate rule, replaced by the certified points where certified.
    table = _PointTable.rank(setup, objectives, budget)
    _certify(setup, table, objectives, budget, joins)

    # Choice: the best feasible point of each class, and the best effort.
    rank = setup.ranks[pts.gi]
    best = _pick(pts.col, table.primary, table.secondary, rank, pts.thv, table.feasible, k)
    fallback = _pick(pts.col, table.fb_primary, table.fb_secondary, rank, pts.thv, pts.tp > 0, k)
    # Trade-off across the grid: best feasible value per (IoU, class).
    cell = _pick(pts.gi * k + pts.col, table.primary, table.secondary, rank, pts.thv,
                 table.feasible, len(grid) * k)
    iou_table = np.full(len(grid) * k, np.nan)
    iou_table[cell >= 0] = table.value[cell[cell >= 0]]
    iou_table = iou_table.reshape(len(grid), k)

    pooled_choice, pooled_point = None, None
    # Without a certified group, classes under min_support keep the uncertified pooled fallback.
    if insufficient.any() and group_point is None:
        pooled_choice, pooled_point = _pooled(setup.mds, grid, objective, setup.ranks, setup.thr,
                                              setup.default_nms_iou, learn)

    chooser = _Chooser(setup, table, objective, objectives, budget)
    choices: list[ClassChoice] = []
    errors = []
    for c in range(k):
        obj = objectives[c]
        if joins[c]:
            choices.append(_member_choice(chooser, c, best[c], below[c], insufficient[c],
                                          group_point, pooled_point))
        elif insufficient[c]:
            if pooled_point is None:
                choices.append(chooser.disabled(c, "insufficient_data", objective))
                continue
            choices.append(chooser.at_shared(c, "insufficient_data", pooled_point,
                                             guarantee="none"))
        elif best[c] >= 0:
            choices.append(chooser.at_point(c, "ok", best[c], obj))
        elif obj.on_unreachable == "error":
            errors.append(c)
        elif obj.on_unreachable == "best_effort" and fallback[c] >= 0:
            choices.append(chooser.at_point(c, "unreachable", fallback[c], obj))
        else:
            choices.append(chooser.disabled(c, "unreachable", obj))
    if errors:
        detail = ", ".join(f"column {c} ({objectives[c].name}, num_gt {int(num_gt[c])})"
                           for c in errors)
        raise UnreachableTargetError(
            f"tuning target unreachable on the tune split for {len(errors)} classes: {detail}",
            errors, [num_gt[c] for c in errors])
    return SearchResult(tuple(choices), grid, setup.default_nms_iou, tuple(setup.curves),
                        iou_table, group_choice if group_choice is not None else pooled_choice,
                        tuple(group) if pool else ())


def _member_choice(chooser: _Chooser, c: int, best: int, below: bool, insufficient: bool,
                   group_point, pooled_point) -> ClassChoice:
    """The choice of a class that joins the `on_unreachable="pool"` group.

    Shown below the target on the learn part: disabled (`"below_target"`). Certified alone: the
    alone point, or the group's when the class has more true positives there (it then carries
    the group's statement, whose hypothesis fixed its detections at the group's point in
    advance). Otherwise: the group's point when the group is certified; else the uncertified
    pooled fallback under `min_support`, or disabled.
    """
    obj = chooser.objective
    if below:
        return chooser.disabled(c, "below_target", obj)
    group = None
    if group_point is not None:
        group = chooser.at_shared(c, "pooled", group_point, guarantee="pooled",
                                  test_level=chooser.budget.group_level,
                                  boxes_to_certify=chooser.need(c),
                                  boxes_available=chooser.have(c))
    if c in chooser.budget.cert_cols and best >= 0:
        alone = chooser.at_point(c, "ok", best, obj)
        return group if group is not None and group.tp > alone.tp else alone
    if group is not None:
        return group
    if insufficient and pooled_point is not None:
        return chooser.at_shared(c, "insufficient_data", pooled_point, guarantee="none")
    return chooser.disabled(c, "insufficient_data" if insufficient else "unreachable", obj)


def pool_classes(matched: Mapping[float, MatchedDetections],
                 columns: Sequence[int] | None = None) -> dict[float, MatchedDetections]:
    """The same detections as one class (column 0, `num_gt` summed): the search over them is
    one shared threshold and IoU, judged on the pooled precision or recall. With `columns`, only
    those class columns' detections and ground truths are pooled."""
    out = {}
    for g, md in matched.items():
        keep = slice(None) if columns is None else np.isin(md.column, np.asarray(columns))
        n = md.num_gt if columns is None else md.num_gt[np.asarray(columns, np.int64)]
        score = md.score[keep]
        out[g] = MatchedDetections(score, np.zeros(score.shape[0], np.int64), md.tp[keep],
                                   md.ignored[keep], np.array([int(n.sum())]))
    return out


#: The share of the group's level on its sequence's first point (the rest on the learn part's
#: planned start): a plan from a small learn part can start too deep and fail, while the top of
#: the pooled curve is certified anyway (`_learned_plan`).
GROUP_TOP_SHARE = 0.5


def _group_search(matched, learn, group, objective: Objective, level: float, thr,
                  default_nms_iou: float):
    """The group's shared `(min_score_thresh, nms_iou)` (`on_unreachable="pool"`): the default
    objective over the group's detections pooled, certified at `level` by Learn-then-Test (the
    learn part plans, the certify part tests a fallback sequence with `GROUP_TOP_SHARE` of the
    level from the top), so the group's pooled precision (or recall) keeps the promise. Returns
    `(choice, (grid index, threshold) or None)`, column -1."""
    inner = dataclasses.replace(objective, confidence=1.0 - level, on_unreachable="disable")
    setup = _Setup.of(pool_classes(matched, group), default_nms_iou, thr,
                      pool_classes(learn, group))
    pts, n = setup.pts, int(setup.num_gt[0])
    plan = None
    if n > 0 and pts.col.size:
        plan = _learned_plan(inner, setup.curves, setup.learn_sorted, 0, int(setup.learn_gt[0]),
                             level, setup.ranks, top_share=GROUP_TOP_SHARE)
    chosen = -1
    if plan is not None:
        at = pts.base[plan.iou] + plan.rows
        ok = plan.certified & (pts.tp[at] > 0)
        if ok.any():
            keys = _keys(inner, pts.tp[at], pts.fp[at], np.full(at.shape, n), None).keys
            j = _pick(np.zeros(at.shape, np.int64), keys.primary, keys.secondary,
                      setup.ranks[pts.gi[at]], pts.thv[at], ok, 1)[0]
            chosen = int(at[j])
            value, p_value = float(keys.value[j]), float(plan.p_value[j])
    if chosen < 0:
        md = next(iter(matched.values()))
        seen = sum(1 for m in group if md.num_gt[m] > 0 or np.any(md.column == m))
        log.warning("on_unreachable pool: the group (%d classes with ground truth or "
                    "detections) cannot be certified at the %s target; its classes not "
                    "certified alone are disabled, those under min_support keep the "
                    "uncertified pooled fallback", seen, objective.name)
        return ClassChoice.disabled(-1, "unreachable", nms_iou=setup.default_nms_iou, num_gt=n,
                                    objective=objective.name, guarantee="none",
                                    test_level=level), None
    t, f = int(pts.tp[chosen]), int(pts.fp[chosen])
    lower = _cp_lower(np.array([t]), np.array([t + f]), level)[0] \
        if kind_of(objective.name).metric == "precision" else math.nan
    c = ClassChoice.at_counts(-1, "ok", PointCounts(t, f, n),
                              min_score_thresh=float(pts.thv[chosen]),
                              nms_iou=setup.grid[pts.gi[chosen]], value=value,
                              precision_lower=float(lower), objective=objective.name,
                              guarantee="certified",
                              test_level=level, p_value=p_value)
    return c, (int(pts.gi[chosen]), float(c.min_score_thresh))


def pooled_search(matched: Mapping[float, MatchedDetections], objective: Objective = Objective(),
                  *, default_nms_iou: float | None = None,
                  thresholds: Sequence[float] | np.ndarray | None = None,
                  learn: Mapping[float, MatchedDetections] | None = None) -> SearchResult:
    """One `(min_score_thresh, nms_iou)` for every class, chosen on all detections pooled.

    The target is on the pooled precision (or recall) of all classes together: the alarm rate
    as a whole, e.g. "alert only when p >= 0.95" on calibrated probabilities. In certified mode
    the pooled number is certified (`SearchResult.pooled.guarantee == "certified"`); each class
    gets `guarantee="pooled"`, its own counts at the shared point, and no promise of its own.

    Args: as `joint_search` (no overrides or per-class support: there is one decision).

    Returns:
        A `SearchResult` whose `pooled` is the decision and whose `classes` all share it.
    """
    grid = tuple(float(g) for g in matched)
    mds = [matched[g] for g in matched]
    if objective.on_unreachable == "pool":  # one decision already: nothing to group
        objective = dataclasses.replace(objective, on_unreachable="disable")
    one = joint_search(pool_classes(matched), objective, default_nms_iou=default_nms_iou,
                       min_support=1, thresholds=thresholds,
                       learn=None if learn is None else pool_classes(learn))
    choice = dataclasses.replace(one.classes[0], column=-1)
    num_gt = mds[0].num_gt
    k = num_gt.shape[0]
    g_idx = grid.index(choice.nms_iou)
    keep = ~mds[g_idx].ignored
    srt = _sort_and_count(mds[g_idx].score[keep], mds[g_idx].column[keep], mds[g_idx].tp[keep], k)
    classes = []
    for c in range(k):
        n = int(num_gt[c])
        t, f = srt.counts_at(c, choice.min_score_thresh) if choice.enabled else (0, 0)
        val = _keys(objective, np.array([t]), np.array([f]), np.array([n]), None).keys.value[0]
        classes.append(dataclasses.replace(
            ClassChoice.at_counts(c, choice.status, PointCounts(t, f, n),
                                  min_score_thresh=choice.min_score_thresh,
                                  nms_iou=choice.nms_iou, value=float(val),
                                  objective=objective.name, guarantee="pooled"),
            enabled=choice.enabled))
    thr = (None if thresholds is None
           else np.unique(np.asarray(thresholds, np.float32).reshape(-1))[::-1])
    curves = tuple(_curves(_sort_and_count(md.score[~md.ignored], md.column[~md.ignored],
                                           md.tp[~md.ignored], k), num_gt, g, thr)
                   for g, md in zip(grid, mds))
    return SearchResult(tuple(classes), grid, one.default_nms_iou, curves,
                        np.repeat(one.iou_table, k, axis=1), choice)


def _pooled(mds, grid, objective, ranks, thr, default_nms_iou, learn=None):
    """The default objective's choice over all classes' detections pooled (column -1): the
    fallback of `insufficient_data` classes, certified on the pooled data in certified mode."""
    n = int(mds[0].num_gt.sum())
    if n == 0 or not any((~md.ignored).any() for md in mds):
        log.warning("pooled fallback: no ground truth or no detection; insufficient_data "
                    "classes are disabled")
        return ClassChoice.disabled(-1, "unreachable", nms_iou=default_nms_iou, num_gt=n,
                                    objective=objective.name, guarantee="none"), None
    pooled = joint_search(pool_classes(dict(zip(grid, mds))),
                          dataclasses.replace(objective, on_unreachable="best_effort"),
                          default_nms_iou=default_nms_iou, min_support=1,
                          thresholds=thr, learn=None if learn is None else pool_classes(learn))
    c = pooled.classes[0]
    if c.status != "ok":
        log.warning("pooled fallback: the %s target is unreachable over all classes pooled; "
                    "using its best effort point", objective.name)
    choice = dataclasses.replace(c, column=-1)
    if not c.enabled:
        log.warning("pooled fallback: no true positive at any point; insufficient_data classes "
                    "are disabled")
        return choice, None
    return choice, (grid.index(c.nms_iou), float(c.min_score_thresh))
