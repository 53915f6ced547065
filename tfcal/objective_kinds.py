"""The tuning objectives as one registry: what each maximizes, what it targets, how it is
certified, and how the report names and judges it; with the vocabulary of the objective fields
(`ObjectiveName`, `OnUnreachable`, `ConfidenceBudget`).

The config (`tfcal.config`), the search (`tfcal.tuning.search`), the held-out evidence
(`tfcal.tuning.holdout`), drift and the report all read `KINDS[name]`; a new objective is one
`Kind` here and its tests. This module imports no tuning module, so the config can read it.

Every kind ranks a class's candidate points by a primary key, then a secondary one (both
maximized), and says which points are feasible; `value` is what the report shows. Points are
only ever feasible with at least one true positive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np

from tfcal import certification

__all__ = ["BUDGETS", "KINDS", "ON_UNREACHABLE", "ConfidenceBudget", "Kind", "Keys",
           "ObjectiveName", "OnUnreachable", "check_fields", "kind_of"]

#: The config's `tuning.objective` values (one `Kind` each in `KINDS`).
ObjectiveName = Literal["precision_target", "recall_target", "f1", "fbeta", "cost"]
#: What a class that cannot reach its target on its own gets (see `tfcal.tuning.search`).
OnUnreachable = Literal["disable", "best_effort", "error", "pool"]
#: How the error of the certified statements is shared (see `tfcal.tuning.search`).
ConfidenceBudget = Literal["per_class", "simultaneous"]
ON_UNREACHABLE: tuple[str, ...] = get_args(OnUnreachable)
BUDGETS: tuple[str, ...] = get_args(ConfidenceBudget)


@dataclasses.dataclass(frozen=True, eq=False)
class Keys:
    """Per-point ranking of one objective: float64 or bool arrays of the points' shape.

    Attributes:
        feasible: the point-estimate rule (certified kinds replace it with certified points).
        primary, secondary: maximized in this order among feasible points.
        value: what the report shows for the point (recall, precision, F1, F-beta, or cost).
        fallback_primary, fallback_secondary: the best-effort order among infeasible classes.
    """

    feasible: np.ndarray
    primary: np.ndarray
    secondary: np.ndarray
    value: np.ndarray
    fallback_primary: np.ndarray
    fallback_secondary: np.ndarray


@dataclasses.dataclass(frozen=True)
class Kind:
    """One objective.

    Attributes:
        name: the config's `tuning.objective` value.
        metric: the rate a target objective promises (`"precision"` or `"recall"`), else None:
            only target objectives can be certified.
        value_name: how the report names `Keys.value`.
        keys: `(objective, counts) -> Keys`, with `counts` a `Counts` of float64 arrays.
    """

    name: str
    metric: str | None
    value_name: str
    keys: Callable[..., Keys]

    @property
    def certifiable(self) -> bool:
        return self.metric is not None

    def trials(self, tp, fp, num_gt):
        """The binomial trials of the certified rate at each point: the detections (`tp + fp`)
        for precision, the ground-truth boxes (`num_gt`, broadcast) for recall."""
        tp = np.asarray(tp)
        if self.metric == "precision":
            return tp + np.asarray(fp)
        if self.metric == "recall":
            return np.broadcast_to(np.asarray(num_gt, np.int64), tp.shape)
        raise ValueError(f"objective {self.name!r} has no certified rate")

    def certify(self, objective, tp, fp, num_gt: int, level: float):
        """`(certified, p_value)` along one class's curve at one NMS IoU (thresholds
        descending), tested as `tfcal.certification` does for this kind's rate."""
        if self.metric == "precision":
            return certification.certify_precision(tp, self.trials(tp, fp, num_gt),
                                                   self.target(objective), level)
        return certification.certify_recall(tp, num_gt, self.target(objective), level)

    def boxes_to_certify(self, objective, tp, fp, num_gt: int, level: float) -> int | None:
        """Estimated labelled boxes one curve needs to be certified (None if it cannot)."""
        return certification.boxes_to_certify(tp, self.trials(tp, fp, num_gt), num_gt,
                                              self.target(objective), level)

    def target(self, objective) -> float | None:
        """The target rate of `objective` (its `target_precision` or `target_recall`)."""
        return None if self.metric is None else float(getattr(objective, f"target_{self.metric}"))

    def describe(self, objective) -> str:
        """`precision >= 0.9`-style text of the target, or the objective's own name."""
        if self.metric is None:
            extra = {"fbeta": f" (beta {getattr(objective, 'beta', '')})",
                     "cost": f" (c_fp {getattr(objective, 'c_fp', '')}, "
                             f"c_fn {getattr(objective, 'c_fn', '')})"}.get(self.name, "")
            return f"{self.name}{extra}"
        return f"{self.metric} >= {self.target(objective)}"

    def meets(self, objective, block: dict) -> bool | None:
        """Whether a held-out block's point estimate meets the target (None: no target, or
        nothing to measure)."""
        if self.metric is None or block.get(self.metric) is None:
            return None
        return bool(block[self.metric] >= self.target(objective))


@dataclasses.dataclass(frozen=True, eq=False)
class Counts:
    """float64 arrays of one objective's points: `tp`, `fp`, `fn`, `precision` (0 where
    nothing is predicted), `recall` (0 without ground truth), and bool `has_tp`."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    has_tp: np.ndarray

    @classmethod
    def of(cls, tp, fp, num_gt) -> "Counts":
        tp = np.asarray(tp, np.float64)
        fp = np.asarray(fp, np.float64)
        num_gt = np.asarray(num_gt, np.float64)
        pred = tp + fp
        return cls(tp, fp, num_gt - tp, np.where(pred > 0, tp / np.maximum(pred, 1.0), 0.0),
                   np.where(num_gt > 0, tp / np.maximum(num_gt, 1.0), 0.0), tp > 0)


def _precision_target(obj, c: Counts) -> Keys:
    feasible = c.has_tp & (c.precision >= obj.target_precision)
    return Keys(feasible, c.recall, c.precision, c.recall, c.precision, c.recall)


def _recall_target(obj, c: Counts) -> Keys:
    feasible = c.has_tp & (c.recall >= obj.target_recall)
    return Keys(feasible, c.precision, c.recall, c.precision, c.recall, c.precision)


def _fscore(beta2: float, c: Counts) -> np.ndarray:
    den = (1.0 + beta2) * c.tp + beta2 * c.fn + c.fp
    return np.where(den > 0, (1.0 + beta2) * c.tp / np.maximum(den, 1e-300), 0.0)


def _f1(obj, c: Counts) -> Keys:
    f = _fscore(1.0, c)
    return Keys(c.has_tp, f, c.recall, f, f, c.recall)


def _fbeta(obj, c: Counts) -> Keys:
    f = _fscore(obj.beta * obj.beta, c)
    return Keys(c.has_tp, f, c.recall, f, f, c.recall)


def _cost(obj, c: Counts) -> Keys:
    cost = obj.c_fp * c.fp + obj.c_fn * c.fn
    return Keys(c.has_tp, -cost, c.recall, cost, -cost, c.recall)


#: Every objective, by its config name.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("precision_target", "precision", "recall", _precision_target),
    Kind("recall_target", "recall", "precision", _recall_target),
    Kind("f1", None, "F1", _f1),
    Kind("fbeta", None, "F-beta", _fbeta),
    Kind("cost", None, "-cost", _cost),
)}


def kind_of(name: str) -> Kind:
    """The registered objective `name`; ValueError naming the choices otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"objective must be one of {tuple(KINDS)}, got {name!r}") from None


def check_fields(**fields) -> None:
    """Validates objective fields, the one check shared by the config loader and `Objective`.

    Keywords (each optional, None skips it): `objective` (a `KINDS` name), `target_precision`
    and `target_recall` in (0, 1], `beta`, `c_fp`, `c_fn` finite and > 0, `confidence` in
    (0, 1), `on_unreachable` in `ON_UNREACHABLE`.

    Raises:
      ValueError: `"<field>: <what is wrong>, got <value>"`, for the first bad field.
    """
    def bad(field, what):
        raise ValueError(f"{field}: {what}, got {fields[field]!r}")

    for field, value in fields.items():
        if value is None:
            continue
        if field == "objective":
            if value not in KINDS:
                bad(field, "must be one of " + " | ".join(KINDS))
        elif field == "on_unreachable":
            if value not in ON_UNREACHABLE:
                bad(field, "must be one of " + " | ".join(ON_UNREACHABLE))
        elif field in ("target_precision", "target_recall"):
            if not 0.0 < value <= 1.0:
                bad(field, "must be in (0, 1]")
        elif field in ("beta", "c_fp", "c_fn"):
            if not (np.isfinite(value) and value > 0):
                bad(field, "must be > 0")
        elif field == "confidence":
            if not 0.0 < value < 1.0:
                bad(field, "must be in (0, 1)")
        else:
            raise TypeError(f"check_fields: unknown field {field!r}")  # a bug, not user input
