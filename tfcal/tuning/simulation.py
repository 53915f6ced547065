"""Known-truth detection simulator: tune sets with exactly known precision and recall curves, for coverage checks of the tuner's guarantees.

Model of one class (`ClassModel`), per ground-truth box, all draws independent:

- The box gets a detection with probability `detect_prob`, scored `s ~ Beta(a_tp, b_tp)`.
- Crowds: a fraction `crowd_frac` of the boxes stand in crowds. NMS at IoU `g` keeps a crowded
  box's detection with probability `crowd_keep(g)` (logistic, increasing in `g`) and suppresses it
  otherwise (the box is missed); other detections always survive. A surviving detection is the
  box's true positive.
- Duplicates: each true positive leaves a second, surviving box on the same object (a false
  positive) with probability `dup_prob(g)` (logistic, increasing in `g`), scored `s * U` with
  `U ~ Uniform(dup_lo, 1)`.
- Background false positives: `Poisson(fp_rate)` per box, scored `Beta(a_fp, b_fp)`, and
  confident ones (look-alike objects): `Poisson(hard_fp_rate)` per box, scored
  `Beta(a_hard, b_hard)`.

So a higher NMS IoU finds more crowded objects (recall) and keeps more duplicates (false
positives): the IoU choice is a trade-off. `simulate` draws one uniform per box for the crowd
and one for the duplicate and compares them with `crowd_keep(g)` and `dup_prob(g)`, so a higher
IoU's detections are a superset of a lower IoU's, as real NMS gives; the draws do not depend on
the grid, so a grid's tune set is the sub-dict of a larger grid's with the same `rng`.

Exact curves, per ground-truth box, at threshold `t` and NMS IoU `g` (`S_x` is the Beta
survival function, `r(g) = 1 - crowd_frac (1 - crowd_keep(g))` the surviving fraction):

- `E[TP >= t] = detect_prob r(g) S_tp(t)`; `true_recall = E[TP >= t]`.
- `E[FP >= t] = fp_rate S_fp(t) + hard_fp_rate S_hard(t) + detect_prob r(g) dup_prob(g) D(t)`,
  `D(t) = P(s U >= t)`; `true_precision = E[TP >= t] / (E[TP >= t] + E[FP >= t])`, the long-run
  fraction of emitted detections that are true (0 where nothing can be emitted, the search's
  convention).
- `D(t)`, with `m = min(1, t / dup_lo)` and `c = 1 / (1 - dup_lo)`: the score passes for sure
  when `s >= m`, and with probability `c (1 - t / s)` when `t <= s < m`, so
  `D(t) = S_tp(m) + c [F(m) - F(t) - t K (F'(m) - F'(t))]`, where `F` is the `Beta(a_tp, b_tp)`
  CDF, `F'` the `Beta(a_tp - 1, b_tp)` CDF and `K = (a_tp + b_tp - 1) / (a_tp - 1)`
  (from `s^-1 Beta(s; a, b) = K Beta(s; a - 1, b)`; hence `a_tp > 1`).

Scores are stored in float32 (as `MatchedDetections` holds them) and the search compares float32
thresholds, so the curves are those of the float32-rounded scores: `fl32(s) >= t` iff `s` is at
least the midpoint between `t` (rounded up to float32) and the float32 below it. This moves a
threshold by less than 3e-8 and makes the curves exact for every threshold the search can choose
(including 1.0, which a rounded score can reach).

The coverage harness (`coverage`, `coverage_runs`) runs `joint_search` on seeded tune sets and
reads the true metric at every chosen point: it measures how often the tuner's statement
("precision >= target on new images", or recall) holds over the draw of the tune set.
`pooled_coverage` does the same for `tuning.scope: pooled`, where a per-class calibration fitted
on the tune set decides how the classes' scores are compared, so it measures the calibration's
share in the statement too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import special

from tfcal import calibration
from tfcal.tuning.search import MatchedDetections, Objective, joint_search, pooled_search

__all__ = [
    "CalibrationFit",
    "ClassModel",
    "CoverageResult",
    "PooledCoverageResult",
    "coverage",
    "coverage_runs",
    "default_scenario",
    "expected_counts",
    "pooled_coverage",
    "simulate",
    "small_classes_scenario",
    "true_precision",
    "true_recall",
]

Budget = Literal["per_class", "simultaneous"]
_BUDGETS = ("per_class", "simultaneous")


def _logistic(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))



def _binomial_se(p, n: int):
    """The binomial standard error `sqrt(p (1 - p) / n)` of a rate `p` (float or array) over `n`
    seeded sets."""
    return np.sqrt(np.multiply(p, 1.0 - np.asarray(p)) / n)

@dataclasses.dataclass(frozen=True)
class ClassModel:
    """The generative model of one class (see the module docstring).

    Attributes:
        name: a label for reports.
        num_gt: ground-truth boxes in one tune set, int >= 0.
        detect_prob: probability in [0, 1] that a box gets a detection.
        a_tp, b_tp: Beta parameters of a true detection's score; `a_tp > 1`, `b_tp > 0`.
        fp_rate: background false positives per box (Poisson mean), >= 0.
        a_fp, b_fp: their Beta score parameters, > 0.
        hard_fp_rate: confident false positives per box, >= 0, default 0.
        a_hard, b_hard: their Beta score parameters, > 0, default Beta(8, 1.5) (mean 0.84).
        dup_max: duplicate probability as the NMS IoU tends to 1, in [0, 1], default 0.
        dup_mid, dup_width: `dup_prob(g) = dup_max * logistic((g - dup_mid) / dup_width)`;
            `dup_width > 0`; defaults 0.6 and 0.05.
        dup_lo: a duplicate scores `s * Uniform(dup_lo, 1)`, `0 <= dup_lo < 1`, default 0.5.
        crowd_frac: fraction of boxes in crowds, in [0, 1], default 0.
        crowd_mid, crowd_width: `crowd_keep(g) = logistic((g - crowd_mid) / crowd_width)`;
            `crowd_width > 0`; defaults 0.5 and 0.08.
    """

    name: str
    num_gt: int
    detect_prob: float
    a_tp: float
    b_tp: float
    fp_rate: float
    a_fp: float
    b_fp: float
    hard_fp_rate: float = 0.0
    a_hard: float = 8.0
    b_hard: float = 1.5
    dup_max: float = 0.0
    dup_mid: float = 0.6
    dup_width: float = 0.05
    dup_lo: float = 0.5
    crowd_frac: float = 0.0
    crowd_mid: float = 0.5
    crowd_width: float = 0.08

    def __post_init__(self):
        if (not isinstance(self.num_gt, (int, np.integer)) or isinstance(self.num_gt, bool)
                or self.num_gt < 0):
            raise ValueError(f"{self.name}: num_gt must be an int >= 0, got {self.num_gt!r}")
        for field in ("detect_prob", "dup_max", "crowd_frac"):
            v = getattr(self, field)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{self.name}: {field} must be in [0, 1], got {v!r}")
        for field in ("b_tp", "a_fp", "b_fp", "a_hard", "b_hard", "dup_width", "crowd_width"):
            v = getattr(self, field)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{self.name}: {field} must be finite and > 0, got {v!r}")
        if not (math.isfinite(self.a_tp) and self.a_tp > 1):
            raise ValueError(f"{self.name}: a_tp must be finite and > 1 (the duplicate-score "
                             f"integral needs it), got {self.a_tp!r}")
        for field in ("dup_mid", "crowd_mid"):
            v = getattr(self, field)
            if not math.isfinite(v):
                raise ValueError(f"{self.name}: {field} must be finite, got {v!r}")
        for field in ("fp_rate", "hard_fp_rate"):
            v = getattr(self, field)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{self.name}: {field} must be finite and >= 0, got {v!r}")
        if not 0.0 <= self.dup_lo < 1.0:
            raise ValueError(f"{self.name}: dup_lo must be in [0, 1), got {self.dup_lo!r}")

    def dup_prob(self, nms_iou):
        """Probability that a true positive leaves a surviving duplicate at `nms_iou`."""
        return self.dup_max * _logistic((np.asarray(nms_iou, np.float64) - self.dup_mid)
                                        / self.dup_width)

    def crowd_keep(self, nms_iou):
        """Probability that NMS at `nms_iou` keeps a crowded box's detection."""
        return _logistic((np.asarray(nms_iou, np.float64) - self.crowd_mid) / self.crowd_width)

    def surviving(self, nms_iou):
        """`r(g)`: the fraction of detected boxes whose detection survives NMS at `nms_iou`."""
        return 1.0 - self.crowd_frac * (1.0 - self.crowd_keep(nms_iou))


# ----------------------------------------------------------------------------------------------
# Exact curves


def _float32_cut(thresholds) -> np.ndarray:
    """The float64 `x` with `fl32(s) >= t` iff `s >= x` (ties aside), for each threshold `t`."""
    t = np.asarray(thresholds, np.float64)
    t32 = t.astype(np.float32)
    t32 = np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32)
    below = np.nextafter(t32, np.float32(-np.inf))
    return 0.5 * (t32.astype(np.float64) + below.astype(np.float64))


def _beta_sf(a, b, x):
    x = np.clip(x, 0.0, 1.0)
    return special.betaincc(a, b, x)


def _dup_sf(model: ClassModel, x: np.ndarray) -> np.ndarray:
    """`D(x) = P(s U >= x)`, `s ~ Beta(a_tp, b_tp)`, `U ~ Uniform(dup_lo, 1)` (module doc)."""
    a, b, lo = model.a_tp, model.b_tp, model.dup_lo
    x = np.clip(x, 0.0, 1.0)
    m = np.minimum(1.0, x / lo) if lo > 0 else np.ones_like(x)
    k = (a + b - 1.0) / (a - 1.0)
    mass = _beta_sf(a, b, x) - _beta_sf(a, b, m)  # F(m) - F(x)
    mass_prime = _beta_sf(a - 1.0, b, x) - _beta_sf(a - 1.0, b, m)  # F'(m) - F'(x)
    return _beta_sf(a, b, m) + (mass - x * k * mass_prime) / (1.0 - lo)


def expected_counts(model: ClassModel, thresholds, nms_iou: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Expected true and false positives scored `>= t`, per ground-truth box.

    Args:
        model: the class.
        thresholds: float `[...]` score thresholds (compared in float32, as the search does).
        nms_iou: the NMS IoU.

    Returns:
        `(tp, fp)`: float64 arrays of the thresholds' shape. Multiply by `num_gt` for the
        expected counts of one tune set.
    """
    x = _float32_cut(thresholds)
    r = float(model.surviving(nms_iou))
    tp = model.detect_prob * r * _beta_sf(model.a_tp, model.b_tp, x)
    fp = (model.fp_rate * _beta_sf(model.a_fp, model.b_fp, x)
          + model.hard_fp_rate * _beta_sf(model.a_hard, model.b_hard, x)
          + model.detect_prob * r * float(model.dup_prob(nms_iou)) * _dup_sf(model, x))
    return tp, fp


def true_precision(model: ClassModel, thresholds, nms_iou: float) -> np.ndarray:
    """Precision on new images at each threshold: `E[TP >= t] / E[TP + FP >= t]`.

    0 where no detection can score `>= t` (the search's convention). float64, the thresholds'
    shape.
    """
    tp, fp = expected_counts(model, thresholds, nms_iou)
    den = tp + fp
    return np.divide(tp, den, out=np.zeros_like(den), where=den > 0)


def true_recall(model: ClassModel, thresholds, nms_iou: float) -> np.ndarray:
    """Recall on new images at each threshold: `E[TP >= t]` per box. float64, the thresholds'
    shape."""
    return expected_counts(model, thresholds, nms_iou)[0]


# ----------------------------------------------------------------------------------------------
# Tune sets


def simulate(models: Sequence[ClassModel], nms_iou_grid: Sequence[float],
             rng: np.random.Generator) -> dict[float, MatchedDetections]:
    """Draws one tune set: `{nms_iou: MatchedDetections}` for every grid value.

    Class column `k` is `models[k]`. The ground truth, the detection scores, the background
    false positives and the per-box uniforms are drawn once, in a fixed order that does not
    depend on the grid; each IoU keeps the detections its `crowd_keep` and `dup_prob` let
    through. Within a column, detections are listed as: surviving true positives (by box), then
    background and confident false positives, then surviving duplicates (by box). Nothing is
    ignored.

    Args:
        models: one `ClassModel` per class column, at least one.
        nms_iou_grid: the NMS IoUs, distinct.
        rng: the source of every draw.

    Returns:
        A dict in grid order, every entry with `num_gt = [m.num_gt for m in models]`.
    """
    if not models:
        raise ValueError("models must hold at least one ClassModel, got none")
    grid = [float(g) for g in nms_iou_grid]
    if not grid or len(set(grid)) != len(grid):
        raise ValueError(f"nms_iou_grid must be a non-empty list of distinct values, got {grid}")
    draws = []
    for m in models:
        n = int(m.num_gt)
        detected = rng.random(n) < m.detect_prob
        s_tp = rng.beta(m.a_tp, m.b_tp, n)
        crowded = rng.random(n) < m.crowd_frac
        u_crowd = rng.random(n)
        u_dup = rng.random(n)
        dup_score = s_tp * rng.uniform(m.dup_lo, 1.0, n)
        s_fp = np.concatenate([rng.beta(m.a_fp, m.b_fp, rng.poisson(m.fp_rate * n)),
                               rng.beta(m.a_hard, m.b_hard, rng.poisson(m.hard_fp_rate * n))])
        draws.append((detected, s_tp, crowded, u_crowd, u_dup, dup_score, s_fp))
    num_gt = np.array([m.num_gt for m in models], np.int64)
    out = {}
    for g in grid:
        scores, columns, tps = [], [], []
        for col, (m, d) in enumerate(zip(models, draws)):
            detected, s_tp, crowded, u_crowd, u_dup, dup_score, s_fp = d
            survive = detected & (~crowded | (u_crowd < m.crowd_keep(g)))
            dup = survive & (u_dup < m.dup_prob(g))
            parts = (s_tp[survive], s_fp, dup_score[dup])
            scores.extend(parts)
            columns.append(np.full(sum(p.size for p in parts), col, np.int64))
            tps.append(np.concatenate([np.ones(parts[0].size, bool),
                                       np.zeros(parts[1].size + parts[2].size, bool)]))
        score = np.concatenate(scores).astype(np.float32)
        tp = np.concatenate(tps)
        out[g] = MatchedDetections(score, np.concatenate(columns), tp, np.zeros(tp.size, bool),
                                   num_gt)
    return out


def default_scenario() -> tuple[ClassModel, ...]:
    """Ten classes with 5 to 500 ground-truth boxes and varied curves, for a precision (or
    recall) target of 0.9.

    True figures over the default grid (0.4, 0.5, 0.6, 0.7), from `true_precision` and
    `true_recall` on a 1e-5 threshold grid (P: precision, R: recall; "top": at t = 1, IoU 0.5):

    | class      | boxes | top P | max P (IoU)  | max R at P >= 0.9 (IoU) | max P at R >= 0.9 |
    | ---------- | ----- | ----- | ------------ | ----------------------- | ----------------- |
    | rare-5     |     5 | 1.000 | 1.000        | 0.968 (0.4-0.7)         | 0.992             |
    | easy-10    |    10 | 1.000 | 1.000        | 0.944 (0.4-0.7)         | 0.975             |
    | easy-20    |    20 | 0.990 | 0.990        | 0.862 (0.4-0.7)         | 0.859             |
    | just-50    |    50 | 0.930 | 0.930 (0.4)  | 0.587 (0.4)             | 0.708             |
    | flat-100   |   100 | 0.965 | 0.969 (0.7)  | 0.318 (0.5)             | 0.514             |
    | never-200  |   200 | 0.825 | 0.825        | unreachable             | unreachable       |
    | just-300   |   300 | 0.920 | 0.929 (0.7)  | 0.169 (0.5)             | 0.510             |
    | easy-500   |   500 | 0.970 | 0.970        | 0.954 (0.4)             | 0.940             |
    | crowd-500  |   500 | 0.963 | 0.969 (0.7)  | 0.839 (0.6)             | 0.858 (0.7)       |
    | dup-500    |   500 | 0.980 | 0.980        | 0.928 (0.4)             | 0.920             |

    - Below `min_support` 10 (rare-5) the search pools; 10 and 20 boxes are too few to certify
      0.9 at 95% (29 true positives without a false one are the least that can).
    - just-50 and just-300 only just reach 0.9, over a narrow band of thresholds; flat-100 has a
      long, flat stretch of precision just above and below 0.9 (its look-alike false positives
      score like its true ones). flat-100 and just-300 also spread their best point over several
      IoUs (crowds against duplicates), so a search that looks at many points is tempted most
      there.
    - Confident false positives (`hard_fp_rate`) keep the top precision below 1 for most
      classes.
    - The three 500-box classes reach either target comfortably, with the best IoU at 0.4
      (duplicates dominate: easy-500, dup-500) or 0.6-0.7 (crowds dominate: crowd-500); their
      true recall at precision 0.93 is still >= 0.93 of that at 0.9, so a certified search can
      keep most of the point estimate's recall.

    Returns:
        The models, one per class column.
    """
    return _DEFAULT_SCENARIO


def small_classes_scenario() -> tuple[ClassModel, ...]:
    """Six small classes (20-60 boxes) built from `default_scenario()`'s just-50, easy-20 and
    flat-100 curves: none can certify precision 0.9 alone at 95%, their detections pooled
    sometimes can (`on_unreachable="pool"`), and the pooled precision at a point the group
    could choose falls below 0.9 often enough for its coverage to be at stake."""
    by_name = {m.name: m for m in _DEFAULT_SCENARIO}
    sizes = [("just-50", 40), ("just-50", 60), ("easy-20", 30), ("flat-100", 50),
             ("just-50", 50), ("easy-20", 20)]
    return tuple(dataclasses.replace(by_name[b], name=f"{b}-{i}", num_gt=n)
                 for i, (b, n) in enumerate(sizes))


def _look_alike(**kw) -> dict:
    """Confident false positives scored like the class's true positives."""
    return dict(a_hard=kw["a_tp"], b_hard=kw["b_tp"], **kw)


_CROWD_AND_DUPLICATES = dict(dup_max=0.6, dup_mid=0.65, dup_width=0.1, dup_lo=0.6,
                             crowd_frac=0.3, crowd_mid=0.5, crowd_width=0.1)
_DEFAULT_SCENARIO = (
    ClassModel("rare-5", 5, 0.97, a_tp=6, b_tp=1.5, fp_rate=0.8, a_fp=1.2, b_fp=6),
    ClassModel("easy-10", 10, 0.95, a_tp=6, b_tp=1.5, fp_rate=0.8, a_fp=1.2, b_fp=5),
    ClassModel("easy-20", 20, 0.95, fp_rate=1.0, a_fp=1.5, b_fp=4, hard_fp_rate=0.01,
               **_look_alike(a_tp=5, b_tp=1.5)),
    ClassModel("just-50", 50, 0.93, fp_rate=1.0, a_fp=1.5, b_fp=4, hard_fp_rate=0.07,
               dup_max=0.3, **_look_alike(a_tp=4, b_tp=1.5)),
    ClassModel("flat-100", 100, 0.96, fp_rate=0.8, a_fp=2.5, b_fp=3.5, hard_fp_rate=0.03,
               **_look_alike(a_tp=4, b_tp=1.5), **_CROWD_AND_DUPLICATES),
    ClassModel("never-200", 200, 0.85, a_tp=4, b_tp=2, fp_rate=1.0, a_fp=1.5, b_fp=3,
               hard_fp_rate=0.18, a_hard=4, b_hard=2, dup_max=0.5),
    ClassModel("just-300", 300, 0.95, fp_rate=0.8, a_fp=2, b_fp=3.5, hard_fp_rate=0.07,
               **_look_alike(a_tp=4, b_tp=1.5), **_CROWD_AND_DUPLICATES),
    ClassModel("easy-500", 500, 0.97, fp_rate=0.4, a_fp=1.5, b_fp=4, hard_fp_rate=0.03,
               dup_max=0.4, dup_lo=0.3, **_look_alike(a_tp=6, b_tp=1.5)),
    ClassModel("crowd-500", 500, 0.97, fp_rate=0.4, a_fp=1.5, b_fp=4, hard_fp_rate=0.03,
               dup_max=0.3, dup_mid=0.7, dup_lo=0.3, crowd_frac=0.3, crowd_mid=0.55,
               **_look_alike(a_tp=6, b_tp=1.5)),
    ClassModel("dup-500", 500, 0.96, fp_rate=0.4, a_fp=1.5, b_fp=4, hard_fp_rate=0.02,
               dup_max=0.6, dup_mid=0.5, dup_lo=0.3, **_look_alike(a_tp=6, b_tp=1.5)),
)


# ----------------------------------------------------------------------------------------------
# Coverage


def _canonical_budget(budget: str) -> str:
    if budget not in _BUDGETS:
        raise ValueError(f"budget must be one of {_BUDGETS}, got {budget!r}")
    return budget


def merge_sets(*sets: dict[float, MatchedDetections]) -> dict[float, MatchedDetections]:
    """Tune sets of disjoint images as one: detections concatenated, `num_gt` summed."""
    out = {}
    for g in sets[0]:
        parts = [s[g] for s in sets]
        out[g] = MatchedDetections(np.concatenate([p.score for p in parts]),
                                   np.concatenate([p.column for p in parts]),
                                   np.concatenate([p.tp for p in parts]),
                                   np.concatenate([p.ignored for p in parts]),
                                   np.sum([p.num_gt for p in parts], axis=0))
    return out


def _scaled(models, fraction: float):
    return tuple(dataclasses.replace(m, num_gt=int(round(m.num_gt * fraction))) for m in models)


@contextlib.contextmanager
def _quiet_search():
    """Silences the search's per-run warnings (e.g. an unreachable pooled fallback), which
    thousands of tune sets would repeat."""
    logger = logging.getLogger("tfcal.tuning.search")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass(frozen=True, eq=False)
class CoverageResult:
    """What `coverage` measured over `num_sets` tune sets (S sets, K classes).

    A class is *covered* in a set when it is disabled or its true metric (precision for
    `precision_target`, recall for `recall_target`) at the chosen point meets the target: the
    tuner's statement about it holds. Classes with `num_gt < min_support` get the search's
    pooled fallback, which makes no statement about them: they are reported, not `judged`, and
    left out of the simultaneous coverage.

    Attributes:
        objective: the objective searched. budget: `"per_class"` or `"simultaneous"`.
        nms_iou_grid: the grid. names: the class names, `[K]`. num_gt: int `[K]`.
        judged: bool `[K]`: `num_gt >= min_support`.
        target: the target of the objective's metric.
        enabled: bool `[S, K]`.
        nms_iou, min_score_thresh: float64 `[S, K]` the chosen point (NaN where disabled).
        precision, recall: float64 `[S, K]` true precision and recall at the chosen point (0
            where disabled).
        pooled: bool `[S, K]`: the class is emitted at the `on_unreachable="pool"` group's
            point in that set (status `"pooled"`: the statement it carries is the group's).
        group_metric: float64 `[S]` the group's true pooled metric at its point: precision
            `sum_k num_gt_k E[TP_k] / sum_k num_gt_k E[TP_k + FP_k]` over its members, or
            recall `sum_k num_gt_k E[TP_k] / sum_k num_gt_k`; NaN where no group is emitted.
        members: bool `[S, K]`: the group's members (fixed on the learn part), whether emitted
            at the group's point or alone: the group's statement is about all of them at its
            point.
    """

    objective: Objective
    budget: str
    nms_iou_grid: tuple[float, ...]
    names: tuple[str, ...]
    num_gt: np.ndarray
    judged: np.ndarray
    target: float
    enabled: np.ndarray
    nms_iou: np.ndarray
    min_score_thresh: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    pooled: np.ndarray | None = None
    group_metric: np.ndarray | None = None
    members: np.ndarray | None = None

    @property
    def num_sets(self) -> int:
        return int(self.enabled.shape[0])

    @property
    def group_enabled_rate(self) -> float:
        """P(a group is emitted)."""
        return float(np.mean(np.isfinite(self.group_metric))) if self.group_metric is not None \
            else 0.0

    @property
    def group_coverage(self) -> float:
        """P(no group emitted, or its true pooled metric meets the target)."""
        if self.group_metric is None:
            return 1.0
        m = self.group_metric
        return float(np.mean(~np.isfinite(m) | (np.nan_to_num(m) >= self.target)))

    @property
    def group_coverage_se(self) -> float:
        p = self.group_coverage
        return float(_binomial_se(p, self.num_sets))

    @property
    def metric(self) -> np.ndarray:
        """float64 `[S, K]` the objective's true metric at the chosen point."""
        return self.recall if self.objective.name == "recall_target" else self.precision

    @property
    def covered(self) -> np.ndarray:
        """bool `[S, K]`: disabled, a group member (no statement of its own), or the true metric
        meets the target."""
        member = self.pooled if self.pooled is not None else np.zeros_like(self.enabled)
        return ~self.enabled | member | (self.metric >= self.target)

    @property
    def carries(self) -> np.ndarray:
        """bool `[S, K]`: the class carries a statement: its own (certified alone) or the
        group's (emitted at the group's point). Classes under `min_support` outside the group
        get the uncertified pooled fallback and carry none."""
        at_group = self.pooled if self.pooled is not None else np.zeros_like(self.enabled)
        return self.enabled & (at_group | self.judged[None, :])

    @property
    def statement_holds(self) -> np.ndarray:
        """bool `[S, K]`: the statement the class actually carries in that set holds (True
        where it carries none): its own true metric meets the target when certified alone,
        the group's true pooled metric when emitted at the group's point."""
        at_group = self.pooled if self.pooled is not None else np.zeros_like(self.enabled)
        group_ok = np.nan_to_num(self.group_metric, nan=-1.0) >= self.target \
            if self.group_metric is not None else np.zeros(self.num_sets, bool)
        own = self.metric >= self.target
        holds = np.where(at_group, group_ok[:, None], own)
        return ~self.carries | holds

    @property
    def statement_coverage(self) -> np.ndarray:
        """float64 `[K]` P(the statement the class carries holds) per class."""
        return self.statement_holds.mean(axis=0)

    @property
    def statement_coverage_se(self) -> np.ndarray:
        p = self.statement_coverage
        return _binomial_se(p, self.num_sets)

    @property
    def simultaneous_statement_coverage(self) -> float:
        """P(every carried statement holds at once)."""
        return float(self.statement_holds.all(axis=1).mean())

    @property
    def simultaneous_statement_coverage_se(self) -> float:
        p = self.simultaneous_statement_coverage
        return float(_binomial_se(p, self.num_sets))

    def kind_coverage(self, kind: str) -> tuple[float, float, int]:
        """`(coverage, SE, count)` over (set, class) pairs carrying one statement kind:
        `"alone"` (certified alone) or `"group"` (at the group's point); NaN with no pair."""
        at_group = self.pooled if self.pooled is not None else np.zeros_like(self.enabled)
        sel = self.carries & (at_group if kind == "group" else ~at_group)
        n = int(sel.sum())
        if n == 0:
            return math.nan, math.nan, 0
        p = float(self.statement_holds[sel].mean())
        return p, float(_binomial_se(p, n)), n

    @property
    def enabled_rate(self) -> np.ndarray:
        return self.enabled.mean(axis=0)

    @property
    def class_coverage(self) -> np.ndarray:
        """float64 `[K]` P(covered) per class."""
        return self.covered.mean(axis=0)

    @property
    def class_coverage_se(self) -> np.ndarray:
        """float64 `[K]` its binomial standard error."""
        p = self.class_coverage
        return _binomial_se(p, self.num_sets)

    @property
    def conditional_coverage(self) -> np.ndarray:
        """float64 `[K]` P(the true metric meets the target | enabled); NaN if never enabled."""
        hits = (self.enabled & (self.metric >= self.target)).sum(axis=0)
        n = self.enabled.sum(axis=0)
        return np.divide(hits, n, out=np.full(n.shape, np.nan), where=n > 0)

    @property
    def simultaneous_coverage(self) -> float:
        """P(every judged class is covered at once)."""
        return float(self.covered[:, self.judged].all(axis=1).mean())

    @property
    def simultaneous_coverage_se(self) -> float:
        p = self.simultaneous_coverage
        return float(_binomial_se(p, self.num_sets))

    @property
    def mean_recall(self) -> np.ndarray:
        """float64 `[K]` mean true recall at the chosen point (0 when disabled)."""
        return self.recall.mean(axis=0)

    @property
    def mean_precision(self) -> np.ndarray:
        """float64 `[K]` mean true precision at the chosen point (0 when disabled)."""
        return self.precision.mean(axis=0)


def coverage(scenario: Sequence[ClassModel], objective: Objective, grid: Sequence[float],
             num_sets: int, seed: int, budget: Budget = "per_class", *,
             min_support: int = 10, learn_fraction: float = 0.0) -> CoverageResult:
    """Runs `joint_search` on `num_sets` seeded tune sets and reads the true metrics.

    Args:
        scenario: one `ClassModel` per class column.
        objective: the default objective of every class (`precision_target` or
            `recall_target`).
        grid: the NMS IoU grid.
        num_sets: tune sets, >= 1. Set `i` is drawn with `np.random.default_rng([seed, i])`.
        seed: int >= 0.
        budget: `{"per_class", "simultaneous"}`, default `"per_class"`: the search's
            `confidence_budget`.
        min_support: passed to the search, default 10.
        learn_fraction: in [0, 1), default 0. Above 0 each tune set is drawn as a learn part
            (each class's boxes times the fraction) and a certify part (the rest), as
            `tuning.learn_fraction` splits tune images: certified objectives search the certify
            part with the learn part planning (`joint_search(..., learn=...)`); the others
            search both parts merged.

    Returns:
        A `CoverageResult`.
    """
    return coverage_runs(scenario, [(objective, budget)], grid, num_sets, seed,
                         min_support=min_support, learn_fraction=learn_fraction)[0]


def coverage_runs(scenario: Sequence[ClassModel], runs: Sequence[tuple[Objective, Budget]],
                  grid: Sequence[float], num_sets: int, seed: int, *,
                  min_support: int = 10,
                  learn_fraction: float = 0.0) -> list[CoverageResult]:
    """`coverage` of several `(objective, budget)` pairs on the same tune sets (paired
    comparisons, one simulation per set). Each result equals `coverage` run alone with the same
    arguments.
    """
    scenario = tuple(scenario)
    if not scenario:
        raise ValueError("scenario must hold at least one ClassModel, got none")
    if not isinstance(num_sets, (int, np.integer)) or num_sets < 1:
        raise ValueError(f"num_sets must be an int >= 1, got {num_sets!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    runs = [(obj, _canonical_budget(b)) for obj, b in runs]
    for obj, _ in runs:
        if obj.name not in ("precision_target", "recall_target"):
            raise ValueError(f"objective must be precision_target or recall_target, "
                             f"got {obj.name!r}")
    grid = tuple(float(g) for g in grid)
    k = len(scenario)
    shape = (len(runs), num_sets, k)
    enabled = np.zeros(shape, bool)
    chosen_iou = np.full(shape, np.nan)
    chosen_thr = np.full(shape, np.nan)
    member = np.zeros(shape, bool)
    in_group = np.zeros(shape, bool)
    group_thr = np.full(shape[:2], np.nan)
    group_iou = np.full(shape[:2], np.nan)
    with _quiet_search():
        for i in range(num_sets):
            rng = np.random.default_rng([int(seed), i])
            if learn_fraction > 0:
                learn = simulate(_scaled(scenario, learn_fraction), grid, rng)
                certify = simulate(_scaled(scenario, 1.0 - learn_fraction), grid, rng)
                matched = merge_sets(learn, certify)
            else:
                learn = certify = None
                matched = simulate(scenario, grid, rng)
            for r, (obj, budget) in enumerate(runs):
                if learn is not None and obj.confidence is not None:
                    found = joint_search(certify, obj, min_support=min_support,
                                         confidence_budget=budget, learn=learn)
                else:
                    found = joint_search(matched, obj, min_support=min_support,
                                         confidence_budget=budget)
                for c in found.classes:
                    if c.enabled:
                        enabled[r, i, c.column] = True
                        chosen_iou[r, i, c.column] = c.nms_iou
                        chosen_thr[r, i, c.column] = c.min_score_thresh
                        member[r, i, c.column] = c.status == "pooled"
                in_group[r, i, list(found.group)] = True
                if found.group and found.pooled is not None and found.pooled.enabled \
                        and found.pooled.guarantee == "certified":
                    group_thr[r, i] = found.pooled.min_score_thresh
                    group_iou[r, i] = found.pooled.nms_iou
    precision = np.zeros(shape)
    recall = np.zeros(shape)
    for col, model in enumerate(scenario):
        for g in grid:
            m = enabled[:, :, col] & (chosen_iou[:, :, col] == g)
            if m.any():
                tp, fp = expected_counts(model, chosen_thr[:, :, col][m], g)
                den = tp + fp
                precision[:, :, col][m] = np.divide(tp, den, out=np.zeros_like(den),
                                                    where=den > 0)
                recall[:, :, col][m] = tp
    # The group's pooled counts, expected per set: members' boxes times their per-box rates.
    g_tp = np.zeros(shape[:2])
    g_det = np.zeros(shape[:2])
    g_gt = np.zeros(shape[:2])
    for col, model in enumerate(scenario):
        for g in grid:
            m = in_group[:, :, col] & (group_iou == g)
            if m.any():
                tp, fp = expected_counts(model, group_thr[m], g)
                g_tp[m] += model.num_gt * tp
                g_det[m] += model.num_gt * (tp + fp)
                g_gt[m] += model.num_gt
    has = np.isfinite(group_thr)
    names = tuple(m.name for m in scenario)
    num_gt = np.array([m.num_gt for m in scenario], np.int64)
    judged = num_gt >= min_support
    out = []
    for r, (obj, budget) in enumerate(runs):
        target = obj.target_recall if obj.name == "recall_target" else obj.target_precision
        den = g_gt[r] if obj.name == "recall_target" else g_det[r]
        metric = np.divide(g_tp[r], den, out=np.zeros(num_sets), where=den > 0)
        metric[~has[r]] = np.nan
        out.append(CoverageResult(obj, budget, grid, names, num_gt, judged, float(target),
                                  enabled[r], chosen_iou[r], chosen_thr[r], precision[r],
                                  recall[r], member[r], metric, in_group[r]))
    return out


# ----------------------------------------------------------------------------------------------
# Pooled scope: one threshold on per-class calibrated scores

FitOn = Literal["learn", "tune"]


@dataclasses.dataclass(frozen=True)
class CalibrationFit:
    """How `pooled_coverage` fits the per-class calibration on each simulated tune set.

    Attributes:
        method: a calibration method name other than `none` (`tfcal.calibration.names()`).
        fit_on: {'learn', 'tune'}, default 'learn': the learn part's detections (the tuner's
            rule for the pooled scope) or the whole tune set's (which lets the certify part's
            labels shape how classes are compared).
        calibration_iou: the IoU whose detections fit the calibration; default None, the
            grid's middle value, as `tuning.default_nms_iou` defaults.
        min_samples: the per-class shrinkage of `fit_per_class`, default 30.

    Raises:
        ValueError: `fit_on` not one of the choices, or `method` is `none` or unknown.
    """

    method: str
    fit_on: FitOn = "learn"
    calibration_iou: float | None = None
    min_samples: int = 30

    def __post_init__(self):
        if self.fit_on not in ("learn", "tune"):
            raise ValueError(f"fit_on must be 'learn' or 'tune', got {self.fit_on!r}")
        if calibration.get(self.method).name == "none":
            raise ValueError("method must be a fitted calibration, got 'none'")


@dataclasses.dataclass(frozen=True, eq=False)
class PooledCoverageResult:
    """What `pooled_coverage` measured over S tune sets.

    The statement judged is the pooled one: "the precision of all emitted detections pooled is
    >= target on new images". A set is covered when nothing is emitted or the true pooled
    precision at the chosen point meets the target.

    Attributes:
        method: the calibration method. fit_on: `"learn"` (the tuner's rule) or `"tune"`.
        target: the precision target.
        enabled: bool `[S]`: the pooled decision emits detections.
        precision: float64 `[S]` true pooled precision (NaN where not enabled).
        recall: float64 `[S]` true pooled recall, all classes' boxes (0 where not enabled).
    """

    method: str
    fit_on: str
    target: float
    enabled: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    @property
    def num_sets(self) -> int:
        return int(self.enabled.size)

    @property
    def coverage(self) -> float:
        ok = ~self.enabled | (np.nan_to_num(self.precision) >= self.target)
        return float(ok.mean())

    @property
    def coverage_se(self) -> float:
        c = self.coverage
        return math.sqrt(c * (1.0 - c) / self.num_sets)


def _cut_for(calib, column: int, level: float, grid: np.ndarray) -> float:
    """The lowest raw score of `grid` whose calibrated score of `column` is `>= level` (the
    calibration is non-decreasing, so the kept scores are exactly those `>= ` it); inf: none."""
    v = calib.apply_to_probabilities(grid.astype(np.float64), np.full(grid.size, column))
    ok = np.nonzero(v >= np.float32(level))[0]
    return float(grid[ok[0]]) if ok.size else math.inf


def pooled_coverage(scenario: Sequence[ClassModel], objective: Objective, grid: Sequence[float],
                    num_sets: int, seed: int, fit: CalibrationFit, *,
                    learn_fraction: float = 0.3, resolution: int = 4001) -> PooledCoverageResult:
    """Coverage of the certified pooled decision (`tuning.scope: pooled`) on per-class
    calibrated scores, with the calibration fitted as the tuner fits it.

    Each seeded tune set is drawn as a learn part and a certify part (`learn_fraction`). The
    per-class calibration `fit.method` is fitted on the detections at `fit.calibration_iou` of
    the learn part (`fit.fit_on="learn"`, the tuner's rule for the pooled scope) or of the whole
    tune set (`"tune"`, which lets the certify part's labels shape how classes are compared);
    `pooled_search` then certifies one calibrated threshold on the certify part, planned on the
    learn part. The chosen level `lambda` keeps, per class, the raw scores `>= r_k` with
    `calibrated_k(r_k) >= lambda` (found on a `resolution`-point grid of [0, 1]), and the true
    pooled precision is `sum_k num_gt_k E[TP_k >= r_k] / sum_k num_gt_k E[TP_k + FP_k >= r_k]`.

    Args:
        scenario: one `ClassModel` per class column (raw scores are their Beta draws).
        objective: a certified `precision_target` objective.
        grid: the NMS IoU grid. num_sets: >= 1. seed: int >= 0 (set `i` draws with
            `np.random.default_rng([seed, i])`).
        fit: how the calibration is fitted (method, part, IoU, shrinkage).
        learn_fraction: in (0, 1), default 0.3.
        resolution: points of the raw-score grid the cuts are read on, default 4001.

    Returns:
        A `PooledCoverageResult`.
    """
    if objective.name != "precision_target" or objective.confidence is None:
        raise ValueError(f"objective must be a certified precision_target, got {objective.name!r} "
                         f"with confidence {objective.confidence!r}")
    if not 0.0 < learn_fraction < 1.0:
        raise ValueError(f"learn_fraction must be in (0, 1), got {learn_fraction!r}")
    fitter = calibration.get(fit.method)
    scenario = tuple(scenario)
    grid = tuple(float(g) for g in grid)
    g0 = (sorted(grid)[(len(grid) - 1) // 2] if fit.calibration_iou is None
          else float(fit.calibration_iou))
    if g0 not in grid:
        raise ValueError(f"calibration_iou {g0} is not in the grid {list(grid)}")
    raw_grid = np.linspace(0.0, 1.0, int(resolution)).astype(np.float32)
    num_gt = np.array([m.num_gt for m in scenario], np.float64)
    enabled = np.zeros(num_sets, bool)
    precision = np.full(num_sets, np.nan)
    recall = np.zeros(num_sets)
    with _quiet_search(), _quiet_calibration():
        for i in range(num_sets):
            rng = np.random.default_rng([int(seed), i])
            learn = simulate(_scaled(scenario, learn_fraction), grid, rng)
            certify = simulate(_scaled(scenario, 1.0 - learn_fraction), grid, rng)
            src = (learn if fit.fit_on == "learn" else merge_sets(learn, certify))[g0]
            calib = calibration.fit_per_class(
                fitter.name, fitter.to_space(src.score.astype(np.float64)),
                src.tp.astype(np.int64), src.column, len(scenario), min_samples=fit.min_samples)

            def calibrated(md):
                return dataclasses.replace(md, score=calib.apply_to_probabilities(
                    md.score.astype(np.float64), md.column).astype(np.float32))

            found = pooled_search({g: calibrated(m) for g, m in certify.items()}, objective,
                                  learn={g: calibrated(m) for g, m in learn.items()})
            choice = found.pooled
            if not choice.enabled:
                continue
            tp = fp = 0.0
            for k, model in enumerate(scenario):
                cut = _cut_for(calib, k, choice.min_score_thresh, raw_grid)
                if math.isfinite(cut):
                    e_tp, e_fp = expected_counts(model, np.array([cut]), found.classes[k].nms_iou)
                    tp += float(e_tp[0]) * num_gt[k]
                    fp += float(e_fp[0]) * num_gt[k]
            enabled[i] = tp + fp > 0
            if enabled[i]:
                precision[i] = tp / (tp + fp)
                recall[i] = tp / num_gt.sum()
    return PooledCoverageResult(fitter.name, fit.fit_on, float(objective.target_precision),
                                enabled, precision, recall)


@contextlib.contextmanager
def _quiet_calibration():
    """Silences the fitters' per-fit warnings (a class at a temperature bound), which thousands
    of tune sets would repeat."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
