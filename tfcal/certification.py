"""Finite-sample guarantees for tuned operating points: exact binomial tests in a Learn-then-Test
fallback sequence fixed before any label is read.

The promise. For a class tuned with `precision_target` and `confidence = 1 - delta`: with
probability >= `1 - delta` over the draw of the tune images, the precision of the chosen
`(min_score_thresh, nms_iou)` on new images from the same distribution is >= the target. This
holds *after* tfcal's own choice among every threshold and every NMS IoU, because the choice is
made among the operating points that a family-wise error controlling procedure certified
(Angelopoulos, Bates, Candes, Jordan, Lei: "Learn then Test", 2021):

1. Hypotheses. For each candidate point `j`, `H_j: precision(j) < target`. Under the model that
   detections (for recall: ground-truth boxes) are independent draws, the `tp` among the `n`
   detections scoring >= the threshold are Binomial(n, precision), so `H_j` is rejected by the
   exact one-sided binomial test `p_j = P(Binomial(n, target) >= tp) <= level`. This is the same
   decision as "the one-sided Clopper-Pearson lower bound at that level is >= target".
2. Order, fixed without labels. Along one NMS IoU the candidate thresholds are tested from high
   to low (recall targets: from low to high) at a label-free set of detection counts: a
   geometric grid of counts, starting at the smallest count whose test can reject at all.
3. Fallback testing (Wiens 2003) along that order: the level is split over a few label-free
   checkpoints; a point is tested at its own share plus everything carried from an unbroken
   run of rejections before it. A chance failure near the top (few detections) then costs only
   the first share, not the whole sequence. It controls the family-wise error at the sequence's
   level under any dependence between the tests.
4. NMS IoUs: each of the `G` IoU curves gets `level / G` (Bonferroni), so the choice among IoUs is
   paid for. Classes: per class each gets `delta`; simultaneously each gets `delta / K` (all
   certified classes hold together with probability >= `1 - delta`).

5. Learn then test (`tuning.learn_fraction > 0`): the tune images are split again, and a class's
   IoU and the start of one fixed sequence at its whole level are planned on the learn split's
   labels and the certify split's label-free counts only, so the plan costs no level. The plan
   (`plan_precision_run`) fits a smooth model of the TP chance by score to the learn split
   (`TpChanceModel`), simulates the certify split's labels from its posterior at the certify
   split's own detection counts, and starts where the expected certified TPs of the whole run
   are highest. The certify split then runs the exact tests from there down.

Every rejected point is certified at once, so choosing the best-recall one among them keeps the
guarantee. What is assumed: tune and served images are exchangeable draws from one distribution,
and detections are independent given that; detections of one image are in truth correlated,
which the real-image check in the README measures.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special

__all__ = [
    "CHECKPOINTS",
    "GRID_RATIO",
    "binomial_pvalue",
    "grid_points",
    "boxes_to_certify",
    "certify_precision",
    "certify_recall",
    "fallback_reject",
    "min_count",
    "plan_precision_run",
    "TpChanceModel",
]

#: Label-free checkpoints along one sequence: the level is shared over at most this many.
CHECKPOINTS = 3
#: Ratio between consecutive detection counts tested along a sequence (a 3% grid in recall).
GRID_RATIO = 1.03


def binomial_pvalue(k, n, p0: float):
    """Exact one-sided binomial p-value `P(Binomial(n, p0) >= k)` for `H0: rate <= p0`.

    Args:
      k: int `[...]` successes, `0 <= k <= n`.
      n: int `[...]` trials (broadcast with `k`).
      p0: the null rate in (0, 1].

    Returns:
      float64 `[...]`: 1 where `k == 0`; `p0 ** n` where `k == n`.
    """
    k = np.asarray(k, np.float64)
    n = np.asarray(n, np.float64)
    if not 0.0 < p0 <= 1.0:
        raise ValueError(f"p0: must be in (0, 1], got {p0!r}")
    k, n = np.broadcast_arrays(k, n)
    if np.any((k < 0) | (k > n)):
        raise ValueError("binomial_pvalue: need 0 <= k <= n")
    out = np.ones(k.shape)
    pos = k > 0
    if p0 == 1.0:
        return out  # every count is possible at rate 1: nothing rejects it
    # P(X >= k) = I_{p0}(k, n - k + 1), the regularized incomplete beta function.
    out[pos] = special.betainc(k[pos], n[pos] - k[pos] + 1.0, p0)
    return out


def min_count(target: float, level: float) -> int:
    """Smallest `n` for which `n` successes out of `n` reject `rate <= target` at `level`.

    `target ** n <= level`, so `n = ceil(log(level) / log(target))`; below it no test can
    reject whatever the labels are (a label-free fact, so skipping those points costs nothing).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level!r}")
    if target >= 1.0:
        return math.inf  # nothing certifies a rate of exactly 1
    n = math.ceil(math.log(level) / math.log(target) - 1e-12)
    return max(n, 1)


def fallback_reject(pvalues, weights, level: float) -> np.ndarray:
    """The fallback procedure along a pre-ordered sequence of hypotheses.

    Point `i` is tested at `a_i = level * weights[i] + (a_{i-1} if point i-1 was rejected)`, so a
    run of rejections carries its level forward and a failure forfeits only what was carried.
    With all weight on the first point it is fixed-sequence testing. Family-wise error
    <= `level * sum(weights)` under any dependence.

    Args:
      pvalues: float `[m]` in testing order.
      weights: float `[m]` >= 0, summing to <= 1.
      level: the sequence's level in (0, 1).

    Returns:
      bool `[m]`: rejected (certified) points.
    """
    p = np.asarray(pvalues, np.float64)
    w = np.asarray(weights, np.float64)
    if p.shape != w.shape:
        raise ValueError(f"weights: shape {w.shape} must match pvalues {p.shape}")
    if np.any(w < 0) or w.sum() > 1.0 + 1e-9:
        raise ValueError(f"weights: must be >= 0 and sum to <= 1, got sum {w.sum()}")
    out = np.zeros(p.shape, bool)
    carried = 0.0
    for i in range(p.shape[0]):  # m is at most a few hundred grid points
        a = level * w[i] + carried
        out[i] = a > 0 and p[i] <= a
        carried = a if out[i] else 0.0
    return out


def grid_points(n_sorted: np.ndarray, start: int) -> np.ndarray:
    """Label-free tested points: indices into a curve whose counts `n_sorted` (non-decreasing)
    first reach each value of a geometric grid from `start` (one per ~3% more detections)."""
    top = int(n_sorted[-1])
    if top < start:
        return np.zeros(0, np.int64)
    steps = int(math.floor(math.log(top / start) / math.log(GRID_RATIO))) + 1
    grid = np.unique(np.ceil(start * GRID_RATIO ** np.arange(steps + 1)).astype(np.int64))
    idx = np.searchsorted(n_sorted, grid[grid <= top], side="left")
    return np.unique(idx)


def _checkpoints(top: int, target: float, level: float) -> tuple[int, int]:
    """`(shares, first)`: how many label-free checkpoints the curve has room for and the first
    tested count. Checkpoint `s` (from 0) sits where the count first reaches `2**s * first`, and
    a share is only split off when the curve reaches its checkpoint; a short curve keeps the
    whole level on one fixed sequence."""
    shares = 1
    for s in range(CHECKPOINTS, 1, -1):
        if 2 ** (s - 1) * min_count(target, level / s) <= top:
            shares = s
            break
    return shares, min_count(target, level / shares)


def _checkpoint_weights(n_tested: np.ndarray, first: int, shares: int) -> np.ndarray:
    """Equal shares at the tested points where the count first reaches `first * 2**s`."""
    w = np.zeros(n_tested.shape[0])
    marks = np.searchsorted(n_tested, first * 2 ** np.arange(shares), "left")
    np.add.at(w, np.minimum(marks, w.size - 1), 1.0 / shares)  # a late mark joins the last point
    return w


def certify_precision(tp, n_pred, target: float, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Certifies `precision >= target` along one curve (one class at one NMS IoU).

    Args:
      tp: int `[P]` true positives at each candidate threshold, thresholds descending.
      n_pred: int `[P]` detections at each threshold (non-decreasing, label-free).
      target: the precision target in (0, 1].
      level: the family-wise error level of this curve, in (0, 1).

    Returns:
      `(certified, p_value)`: bool `[P]` and float64 `[P]` (NaN at points not tested).
    """
    tp = np.asarray(tp, np.int64)
    n_pred = np.asarray(n_pred, np.int64)
    certified = np.zeros(tp.shape, bool)
    pvals = np.full(tp.shape, np.nan)
    if tp.size == 0 or target >= 1.0:
        return certified, pvals
    shares, first = _checkpoints(int(n_pred[-1]), target, level)
    if n_pred[-1] < first:
        return certified, pvals
    idx = grid_points(n_pred, first)
    p = binomial_pvalue(tp[idx], n_pred[idx], target)
    rejected = fallback_reject(p, _checkpoint_weights(n_pred[idx], first, shares), level)
    pvals[idx] = p
    certified[idx] = rejected
    return certified, pvals


def certify_recall(tp, num_gt: int, target: float, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Certifies `recall >= target` along one curve, testing from the lowest threshold up.

    Each ground-truth box is found (a TP at or above the threshold) or not, so `tp` of the
    `num_gt` boxes is Binomial(num_gt, recall). Recall only falls as the threshold rises, so a
    plain fixed sequence from the bottom (all of `level` on it) loses nothing.

    Args:
      tp: int `[P]` true positives at each candidate threshold, thresholds descending.
      num_gt: ground-truth boxes of the class.
      target: the recall target in (0, 1]. level: in (0, 1).

    Returns:
      `(certified, p_value)`: bool `[P]` and float64 `[P]`.
    """
    tp = np.asarray(tp, np.int64)
    certified = np.zeros(tp.shape, bool)
    pvals = np.full(tp.shape, np.nan)
    if tp.size == 0 or num_gt < min_count(target, level):
        return certified, pvals
    p = binomial_pvalue(tp[::-1], np.full(tp.shape, num_gt), target)
    pvals[:] = p[::-1]
    certified[:] = fixed_sequence(p, level)[::-1]  # stop at the first failure
    return certified, pvals


def boxes_to_certify(tp, n_pred, num_gt: int, target: float, level: float) -> int | None:
    """Estimated labelled boxes of a class needed to certify `precision >= target`.

    An estimate, not a promise: at each point of the current curve whose observed precision
    `q = tp / n` exceeds the target, the detections needed are the smallest `m` at which
    `round(q m)` of `m` would pass the test at `level`; boxes scale with detections at the
    observed `n / num_gt`. The best point's box count is returned; None when no point's observed
    precision exceeds the target (more data of the same kind would not certify it).
    """
    tp = np.asarray(tp, np.float64)
    n = np.asarray(n_pred, np.float64)
    if n.size and n[-1] >= 1:
        idx = grid_points(n.astype(np.int64), 1)  # ~3% steps in detections are enough here
        tp, n = tp[idx], n[idx]
    ok = (n > 0) & (tp / np.maximum(n, 1) > target) & (num_gt > 0)
    if not ok.any():
        return None
    q = tp[ok] / n[ok]
    per_box = n[ok] / num_gt
    sizes = np.unique(np.round(np.geomspace(1, 10 ** 7, 600)).astype(np.int64))  # ~2.7% steps
    k = np.floor(q[:, None] * sizes[None, :])  # [points, sizes]
    passing = binomial_pvalue(k, np.broadcast_to(sizes, k.shape), target) <= level
    first = np.where(passing.any(axis=1), sizes[np.argmax(passing, axis=1)], np.inf)
    need = first / per_box
    best = float(np.min(need))
    return None if not math.isfinite(best) else int(math.ceil(best))


# ----------------------------------------------------------------------------------------------
# Learn then test: a learn split plans each class's sequence, the certify split tests it


def critical_count(n, target: float, level: float) -> np.ndarray:
    """int64 `[...]`: the smallest `k` with `P(Binomial(n, target) >= k) <= level` (`n + 1` when
    no `k <= n` rejects)."""
    from scipy import stats

    n = np.asarray(n, np.int64)
    k = np.asarray(stats.binom.isf(level, n, target), np.float64)
    k = np.where(np.isfinite(k), k, n).astype(np.int64) + 1
    # isf is exact up to floating point at the boundary: step to the exact smallest k.
    up = binomial_pvalue(np.minimum(k, n), n, target) > level
    k = np.where(up & (k <= n), k + 1, k)
    down = (k > 1) & (binomial_pvalue(np.clip(k - 1, 0, n), n, target) <= level)
    return np.where(down, k - 1, k)


def pass_probability(rate, n, target: float, level: float) -> np.ndarray:
    """Probability that the exact test at `level` rejects `rate <= target` when `Binomial(n, rate)`
    is observed: the planning quantity of the learn split."""
    from scipy import stats

    n = np.asarray(n, np.int64)
    k = critical_count(n, target, level)
    return np.where(k <= n, stats.binom.sf(k - 1, n, np.clip(rate, 0.0, 1.0)), 0.0)


def predictive_pass_probability(successes, failures, n, target: float,
                                level: float) -> np.ndarray:
    """Probability that the exact test at `level` rejects `rate <= target` on `n` new trials,
    predicted from `successes` and `failures` seen on other data (the learn split).

    The rate is uncertain: with a Jeffreys prior its posterior is Beta(successes + 1/2,
    failures + 1/2), so the certify count is beta-binomial; thin learn evidence therefore
    predicts a lower pass probability than the same rate seen on many detections would. This
    only plans the test (it decides no guarantee), so the beta-binomial tail is taken from its
    normal approximation with a continuity correction, which is fast on long curves.
    """
    from scipy import special

    n = np.asarray(n, np.float64)
    k = critical_count(n.astype(np.int64), target, level).astype(np.float64)
    a = np.broadcast_to(np.asarray(successes, np.float64) + 0.5, n.shape)
    b = np.broadcast_to(np.asarray(failures, np.float64) + 0.5, n.shape)
    mean = n * a / (a + b)
    var = n * a * b * (a + b + n) / ((a + b) ** 2 * (a + b + 1.0))
    z = (k - 0.5 - mean) / np.sqrt(np.maximum(var, 1e-12))
    out = np.where(k <= n, 0.5 * special.erfc(z / np.sqrt(2.0)), 0.0)
    # Short tails exactly (the approximation is poorest there, e.g. "all n must pass").
    for i in np.flatnonzero((k <= n) & (n - k < EXACT_TAIL)):
        j = np.arange(k[i], n[i] + 1)
        log_pmf = (special.gammaln(n[i] + 1) - special.gammaln(j + 1)
                   - special.gammaln(n[i] - j + 1) + special.betaln(j + a[i], n[i] - j + b[i])
                   - special.betaln(a[i], b[i]))
        out[i] = float(np.exp(log_pmf).sum())
    return np.clip(out, 0.0, 1.0)


#: Beta-binomial tails with fewer terms than this are summed exactly when planning.
EXACT_TAIL = 64


def fixed_sequence(pvalues, level: float) -> np.ndarray:
    """bool `[m]`: fixed-sequence testing in the given order: reject while `p <= level`."""
    return np.cumprod(np.asarray(pvalues) <= level).astype(bool)


# ----------------------------------------------------------------------------------------------
# Planning a precision sequence: simulate the certify split's run from a model of the learn split

#: Posterior draws of the learn split's model behind one planned precision sequence.
PLAN_DRAWS = 200
#: Degree of the polynomial in the score feature inside the logistic model of a detection's TP
#: chance (2: a bend, so the chance can flatten near the top and fall faster below).
PLAN_DEGREE = 2
#: Standard deviation of the Gaussian prior on each coefficient (standardized feature): weak,
#: only there so that separable learn data (all TP, say) still give a finite fit.
PLAN_PRIOR_SD = 10.0
#: The fixed seed of the planning draws: a plan is a deterministic function of its inputs, and
#: every IoU of a class is planned on the same random numbers (a paired comparison).
PLAN_SEED = 0


def _logit_feature(score) -> np.ndarray:
    """float64: the logit of the score (scores are probabilities; clipped to [1e-6, 1 - 1e-6])."""
    s = np.clip(np.asarray(score, np.float64), 1e-6, 1.0 - 1e-6)
    return np.log(s) - np.log1p(-s)


@dataclasses.dataclass(frozen=True)
class TpChanceModel:
    """The chance that a detection is a true positive given its score, learnt from labelled
    detections (the learn split): `P(tp | s) = sigmoid(sum_d beta_d * z**d)`, `z` the logit of
    `s` standardized over the fitted detections, `d = 0..PLAN_DEGREE`.

    `beta` is the posterior mode under independent `N(0, PLAN_PRIOR_SD**2)` priors and `cov` the
    inverse Hessian there (the Laplace approximation of the posterior), so draws of `beta` carry
    how thin the learn evidence is. A smooth, few-parameter model plans better than the raw
    learn curve: the argmax over hundreds of noisy cumulative points falls where the learn split
    was lucky, which the certify split does not repeat.

    Attributes:
      beta: float64 `[PLAN_DEGREE + 1]` posterior mode. cov: float64 `[PLAN_DEGREE + 1] * 2`.
      center, scale: the standardization of the logit feature.
    """

    beta: np.ndarray
    cov: np.ndarray
    center: float
    scale: float

    @classmethod
    def fit(cls, score, tp) -> "TpChanceModel":
        """Fits the model to detections.

        Args:
          score: float `[D]` detection scores, `D >= 1`. tp: bool `[D]` true positive or not.

        Raises:
          ValueError: empty or mismatched inputs.
        """
        z = _logit_feature(score).reshape(-1)
        y = np.asarray(tp, np.float64).reshape(-1)
        if z.size == 0 or z.shape != y.shape:
            raise ValueError(f"score and tp: need matching non-empty arrays, got {z.shape} and "
                             f"{y.shape}")
        center, scale = float(z.mean()), float(max(z.std(), 1e-6))
        x = np.vander((z - center) / scale, PLAN_DEGREE + 1, increasing=True)
        prior = np.eye(PLAN_DEGREE + 1) / PLAN_PRIOR_SD ** 2
        beta = np.zeros(PLAN_DEGREE + 1)
        for _ in range(100):  # Newton on a strictly concave log posterior
            mu = special.expit(x @ beta)
            hess = x.T @ (x * (mu * (1.0 - mu))[:, None]) + prior
            step = np.linalg.solve(hess, x.T @ (y - mu) - prior @ beta)
            step *= min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-300))  # damped far out
            beta = beta + step
            if np.abs(step).max() < 1e-9:
                break
        mu = special.expit(x @ beta)
        hess = x.T @ (x * (mu * (1.0 - mu))[:, None]) + prior
        return cls(beta, np.linalg.inv(hess), center, scale)

    def draw_chances(self, score, num: int, rng: np.random.Generator) -> np.ndarray:
        """float64 `[num, S]`: the TP chance at each of `S` scores under `num` posterior draws."""
        z = (_logit_feature(score).reshape(-1) - self.center) / self.scale
        x = np.vander(z, PLAN_DEGREE + 1, increasing=True)
        chol = np.linalg.cholesky(self.cov + 1e-12 * np.eye(self.cov.shape[0]))
        betas = self.beta + rng.standard_normal((num, self.beta.size)) @ chol.T
        return special.expit(betas @ x.T)


def plan_precision_run(model: TpChanceModel, threshold, n_pred, rows, target: float,
                       level: float, *, with_pass: bool = False):
    """Expected true positives that the certify split certifies, for each possible start of its
    fixed sequence, predicted by simulating its labels from the learn split's model.

    The certify split's detection counts are label-free, so they are used as they are; only
    which of them are TPs is simulated: per posterior draw of `model`, the detections entering
    between consecutive tested points are Binomial(their count, the TP chance at the score of
    their middle detection). The
    sequence started at point `m` certifies the unbroken run of exact tests passing from `m`, and
    the search keeps its last point, so its value is that point's TP (0 when `m` fails). This
    plans the whole run (whether the start passes and how far the run then goes), not the start
    alone.

    Args:
      model: fitted on the learn split's detections of the class at this NMS IoU.
      threshold: float `[P]` the certify curve's thresholds (descending). n_pred: int `[P]` its
        detections there (non-decreasing). rows: int `[M]` the tested points, indices into the
        curve (increasing), e.g. `grid_points`.
      target: the precision target in (0, 1). level: the sequence's level in (0, 1).

    Returns:
      float64 `[M]`: the expected certified TPs of the sequence started at each tested point;
      with `with_pass`, `(that, pass)`, `pass` float64 `[M]` the predicted probability that the
      first test of the sequence started there passes.
    """
    n = np.asarray(n_pred, np.int64)
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return (np.zeros(0), np.zeros(0)) if with_pass else np.zeros(0)
    rng = np.random.default_rng(PLAN_SEED)
    count = np.diff(n[rows], prepend=0)  # detections entering at each tested point (> 0)
    # Each step's TP chance is read at its middle detection (a step spans ~3% of the count).
    middle = np.searchsorted(n, n[rows] - count / 2.0, side="left")
    rate = model.draw_chances(np.asarray(threshold)[middle], PLAN_DRAWS, rng)  # [draws, M]
    tp = np.cumsum(rng.binomial(np.broadcast_to(count, rate.shape), rate), axis=1)
    passes = tp >= critical_count(n[rows], target, level)
    m = rows.size
    # First failing point at or after each point (m when none), per draw.
    fail_at = np.minimum.accumulate(np.where(passes, m, np.arange(m))[:, ::-1], axis=1)[:, ::-1]
    last = np.take_along_axis(tp, np.maximum(fail_at - 1, 0), axis=1)
    expected = np.where(passes, last, 0).mean(axis=0)
    return (expected, passes.mean(axis=0)) if with_pass else expected
