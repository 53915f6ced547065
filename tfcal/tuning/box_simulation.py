"""Known-truth simulation of detections whose precision depends on the box size, for coverage
checks of per-class certification on box-dependent calibrated scores (`box_platt`).

`tfcal.tuning.simulation`'s class models draw scores only, with no boxes, so they cannot express
a size effect. Here each class `k` has, per tune set, `num_det` detections with

- a relative log size `s ~ Uniform(0, 1)` (the `box_platt` feature: 0 for boxes of <= 1e-4 of
  the image, 1 for the whole image) and a raw logit `z ~ Normal(z_mean, z_sd)`, independent;
- `P(TP | z, s) = sigmoid(a z + b + c s)`; `num_gt` is the set's true positives plus
  `miss_rate` times as many missed objects.

A rule "keep a detection when its calibrated score `q(z, s) >= t`" has, with `q` increasing in
`z` (slope > 0), the cut `z*(s)` per size, and its exact precision is

    precision = int_0^1 int_{z*(s)}^inf sigmoid(a z + b + c s) phi(z) dz ds
                / int_0^1 P(z >= z*(s)) ds,

computed by quadrature (`true_rates`: 256 sizes x 4,000 logits, midpoint rule; the error is
far below the coverage's Monte Carlo error). `box_coverage` fits the calibration as the tuner
does (`box_platt` on the learn part; class-only methods on the whole tune set), certifies a
per-class threshold with `joint_search` (Learn-then-Test, the certify part tested, the learn
part planning), and reads each chosen rule's true precision and recall.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tfcal import calibration
from tfcal.tuning.search import MatchedDetections, Objective, joint_search
from tfcal.tuning.simulation import _quiet_calibration, _quiet_search

__all__ = ["BoxClassModel", "BoxCoverageResult", "box_coverage", "boxes_of_size", "draw",
           "true_rates"]

#: The one NMS IoU of the simulated sets (no NMS effect is modelled).
IOU = 0.5


@dataclasses.dataclass(frozen=True)
class BoxClassModel:
    """One class: `P(TP | z, s) = sigmoid(a z + b + c s)`, `z ~ N(z_mean, z_sd)`, `s ~ U(0, 1)`.

    Attributes:
      num_det: detections per whole tune set (>= 1).
      a, b, c: the true logit model; `c` is the size effect (logits gained from the smallest to
        the largest box).
      z_mean, z_sd: the raw logits' distribution.
      miss_rate: missed objects per true positive, default 0.25.
    """

    num_det: int
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    z_mean: float = 0.0
    z_sd: float = 2.0
    miss_rate: float = 0.25


def boxes_of_size(s: np.ndarray) -> np.ndarray:
    """Square boxes at the origin whose `box_size_feature` is `s` (area `10^(4 (s - 1))`)."""
    side = np.sqrt(10.0 ** (4.0 * (s - 1.0)))
    zero = np.zeros_like(side)
    return np.stack([zero, zero, side, side], axis=-1)


def draw(models: Sequence[BoxClassModel], rng: np.random.Generator, fraction: float = 1.0):
    """One (part of a) tune set: `(z [D], s [D], tp bool [D], column int [D], num_gt int [K])`,
    `round(num_det * fraction)` detections per class."""
    zs, ss, tps, cols, gts = [], [], [], [], []
    for k, m in enumerate(models):
        n = int(round(m.num_det * fraction))
        s = rng.uniform(0.0, 1.0, n)
        z = rng.normal(m.z_mean, m.z_sd, n)
        tp = rng.random(n) < 1.0 / (1.0 + np.exp(-(m.a * z + m.b + m.c * s)))
        zs.append(z)
        ss.append(s)
        tps.append(tp)
        cols.append(np.full(n, k, np.int64))
        gts.append(int(tp.sum() + round(m.miss_rate * tp.sum())))
    return (np.concatenate(zs), np.concatenate(ss), np.concatenate(tps), np.concatenate(cols),
            np.array(gts, np.int64))


def true_rates(model: BoxClassModel, slope: float, offset: float, size_coef: float,
               threshold: float, *, sizes: int = 256, logits: int = 4000) -> tuple[float, float]:
    """Exact `(precision, recall)` of keeping `sigmoid(slope z + offset + size_coef s) >=
    threshold` (`slope > 0`) for one class; recall is the kept share of all true positives
    (missed objects aside). Precision is 0 when nothing can be kept."""
    s = (np.arange(sizes) + 0.5) / sizes
    lo, hi = model.z_mean - 9 * model.z_sd, model.z_mean + 9 * model.z_sd
    dz = (hi - lo) / logits
    z = lo + (np.arange(logits) + 0.5) * dz
    dens = np.exp(-0.5 * ((z - model.z_mean) / model.z_sd) ** 2) / (
        model.z_sd * math.sqrt(2 * math.pi))
    p_tp = 1.0 / (1.0 + np.exp(-(model.a * z[None, :] + model.b + model.c * s[:, None])))
    lt = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (
        -math.inf if threshold <= 0 else math.inf)
    keep = (slope * z[None, :] + offset + size_coef * s[:, None]) >= lt
    kept = float(np.sum(keep * dens) * dz / sizes)
    kept_tp = float(np.sum(keep * p_tp * dens) * dz / sizes)
    all_tp = float(np.sum(p_tp * dens) * dz / sizes)
    return (kept_tp / kept if kept > 0 else 0.0), kept_tp / all_tp


@dataclasses.dataclass(frozen=True)
class BoxCoverageResult:
    """Per set and class: `enabled`, the chosen rule's true `precision` and `recall` (NaN / 0
    where disabled). Arrays `[num_sets, K]`."""

    method: str
    target: float
    enabled: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    @property
    def coverage(self) -> float:
        """Share of enabled (set, class) pairs whose true precision reaches the target."""
        e = self.enabled
        return float(np.mean(self.precision[e] >= self.target)) if e.any() else float("nan")

    @property
    def coverage_se(self) -> float:
        n = int(self.enabled.sum())
        c = self.coverage
        return math.sqrt(c * (1 - c) / n) if n else float("nan")

    @property
    def mean_recall(self) -> np.ndarray:
        """float `[K]` mean true recall over sets (0 where disabled)."""
        return self.recall.mean(axis=0)


def box_coverage(models: Sequence[BoxClassModel], num_sets: int, seed: int, *,
                 method: str = "box_platt", target_precision: float = 0.9,
                 confidence: float = 0.95, learn_fraction: float = 0.3,
                 min_samples: int = 30) -> BoxCoverageResult:
    """Coverage of per-class certified precision with calibration `method` (see the module).

    Args:
      models: one `BoxClassModel` per class column.
      num_sets: seeded tune sets (set `i` draws with `np.random.default_rng([seed, i])`).
      method: {'box_platt', 'platt', 'temperature'} (`box_platt` is fitted on the learn part,
        the class-only ones on the whole tune set, as the tuner fits them).
      target_precision, confidence: the certified objective.
      learn_fraction: the learn part's share of each class's detections.
      min_samples: `fit_per_class`'s shrinkage.
    """
    m = calibration.get(method)
    objective = Objective(target_precision=target_precision, confidence=confidence)
    k = len(models)
    enabled = np.zeros((num_sets, k), bool)
    precision = np.full((num_sets, k), np.nan)
    recall = np.zeros((num_sets, k))
    with _quiet_search(), _quiet_calibration():
        for i in range(num_sets):
            rng = np.random.default_rng([int(seed), i])
            learn = draw(models, rng, learn_fraction)
            certify = draw(models, rng, 1.0 - learn_fraction)
            fit = learn if m.uses_boxes else tuple(
                np.concatenate([a, b]) for a, b in zip(learn[:4], certify[:4])) + (None,)
            z, s, tp, col = fit[:4]
            extra = {"boxes": boxes_of_size(s)} if m.uses_boxes else {}
            calib = calibration.fit_per_class(m.name, z, tp.astype(np.int64), col, k,
                                              min_samples=min_samples, **extra)

            def matched(part):
                z, s, tp, col, gt = part
                q = calib.apply(z, col, boxes_of_size(s) if m.uses_boxes else None)
                return {IOU: MatchedDetections(score=q, column=col, tp=tp,
                                               ignored=np.zeros(tp.size, bool), num_gt=gt)}

            found = joint_search(matched(certify), objective, learn=matched(learn))
            for c in found.classes:
                if not c.enabled:
                    continue
                a, b, cs = _linear(calib, c.column)
                enabled[i, c.column] = True
                precision[i, c.column], recall[i, c.column] = true_rates(
                    models[c.column], a, b, cs, float(c.min_score_thresh))
    return BoxCoverageResult(m.name, float(target_precision), enabled, precision, recall)


def _linear(calib, k: int) -> tuple[float, float, float]:
    """The fitted map of column `k` as `(slope, offset, size coefficient)` on the logit."""
    p = calib.params
    if calib.method == "box_platt":
        return p["box_a"][k], p["box_b"][k], p["box_c"][k]
    if calib.method == "platt":
        return p["platt_a"][k], p["platt_b"][k], 0.0
    if calib.method == "temperature":
        return 1.0 / p["temperature"][k], 0.0, 0.0
    raise ValueError(f"method: expected box_platt, platt or temperature, got {calib.method!r}")

