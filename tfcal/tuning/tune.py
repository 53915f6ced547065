"""The tuning of one set of images: the calibration fit, then the certified per-class search
over the calibrated candidates (planned on a learn part of the images when the objectives are
certified), and the `PostProcessConfig` they give.

`tune_on` is what `tuning.pipeline` runs once per holdout split or fold. How the tune images are
divided for certification is decided once, by `tune_parts`, and travels as a `TuneParts`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from tfcal import TfcalError, calibration
from tfcal.config import Config
from tfcal.tuning.calibrate import fit_calibration
from tfcal.tuning.detections import matched_candidates, tuned_postprocess_config
from tfcal.tuning.objectives import objectives
from tfcal.tuning.prepare import Prepared
from tfcal.tuning.search import UnreachableTargetError, joint_search, pooled_search
from tfcal.tuning.split import split_images

log = logging.getLogger(__name__)


def learn_split(cfg: Config, prep: Prepared, tune_idx: np.ndarray):
    """`(learn_idx, certify_idx)`: the tune images split, stratified by class presence and seeded
    by `data.seed`, `tuning.learn_fraction` of them to plan the certified tests."""
    ids = prep.dataset.image_ids[tune_idx]
    presence = prep.class_presence()[tune_idx]
    cert_ids, learn_ids = split_images(ids, presence, holdout_fraction=cfg.tuning.learn_fraction,
                                       seed=cfg.data.seed + 1)
    return (np.sort(prep.dataset.image_index(learn_ids)),
            np.sort(prep.dataset.image_index(cert_ids)))


def uses_learn_split(cfg: Config, prep: Prepared, num_tune: int) -> bool:
    """Certified objectives with `tuning.learn_fraction > 0` split the tune images again (when
    there are at least 2; with fewer the grid is paid for by Bonferroni instead)."""
    objective, overrides = objectives(cfg, prep)
    certified = objective.certified or any(o.certified for o in overrides.values())
    if not (certified and cfg.tuning.learn_fraction > 0):
        return False
    if num_tune < 2:
        log.warning("certification: %d tune image cannot be split into learn and certify "
                    "parts; the NMS IoU grid is paid for by Bonferroni instead", num_tune)
        return False
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class TuneParts:
    """How one set of tune images is used, decided once by `tune_parts`.

    Attributes:
        tune: int `[N]` the tune images (indices into the dataset), ascending.
        learn, certify: int arrays, the learn part (plans the certified tests) and the certify
            part (runs them), or both None when the tune images are not split.
        calibration_fit: `"learn"` when the calibration is fitted on the learn part only (see
            `calibration_images`), else `"tune"`.
    """

    tune: np.ndarray
    learn: np.ndarray | None
    certify: np.ndarray | None
    calibration_fit: str

    @property
    def calibration_images(self) -> np.ndarray:
        return self.learn if self.calibration_fit == "learn" else self.tune


def tune_parts(cfg: Config, prep: Prepared, tune_idx: np.ndarray) -> TuneParts:
    """The learn/certify split of the tune images `tune_idx` (or none), and the calibration's
    fit part."""
    if uses_learn_split(cfg, prep, len(tune_idx)):
        learn_idx, cert_idx = learn_split(cfg, prep, tune_idx)
        return TuneParts(tune_idx, learn_idx, cert_idx,
                         calibration_fit_part(cfg, prep, len(tune_idx)))
    return TuneParts(tune_idx, None, None, "tune")


@dataclasses.dataclass(frozen=True, eq=False)
class Tuned:
    """What `tune_on` returns: the parts, the calibration (or None), the search result and
    the `PostProcessConfig` they give."""

    parts: TuneParts
    calib: object
    found: object
    ppc: object


def search(cfg: Config, prep: Prepared, calib, parts: TuneParts):
    """The per-class joint search (or, with `tuning.scope: pooled`, the one shared decision)
    over the tune split's calibrated candidates."""
    t = cfg.tuning
    objective, overrides = objectives(cfg, prep)
    learn = None
    if parts.learn is not None:
        log.info("certification: %d tune images plan the tests, %d certify them",
                 len(parts.learn), len(parts.certify))
        learn = matched_candidates(cfg, prep, calib, parts.learn)
        matched = matched_candidates(cfg, prep, calib, parts.certify)
    else:
        matched = matched_candidates(cfg, prep, calib, parts.tune)
    if t.scope == "pooled":
        return pooled_search(matched, objective, default_nms_iou=t.default_nms_iou, learn=learn)
    if learn is None and objective.on_unreachable == "pool":
        log.warning("on_unreachable pool: no learn split (fewer than 2 tune images); classes "
                    "that cannot be certified are disabled instead")
        objective = dataclasses.replace(objective, on_unreachable="disable")
    try:
        return joint_search(matched, objective, overrides=overrides,
                            default_nms_iou=t.default_nms_iou, min_support=t.min_support,
                            confidence_budget=t.confidence_budget, learn=learn)
    except UnreachableTargetError as e:
        names = ", ".join(prep.column_label(c, f", {n} ground truths")
                          for c, n in zip(e.columns, e.num_gt))
        raise TfcalError(f"{cfg.source}: tuning.on_unreachable: error, and the target "
                         f"({t.objective}) is unreachable on the tune split for {names}; "
                         f"relax the target, or set on_unreachable to disable or "
                         f"best_effort") from None


def calibration_fit_part(cfg: Config, prep: Prepared, num_tune: int) -> str:
    """``"learn"`` when the calibration is fitted on the learn part only, else ``"tune"``: the
    tune images, or only their learn part with `tuning.scope: pooled` or `tuning.on_unreachable:
    pool` and a certified target (the group's shared threshold compares its classes' calibrated
    scores, as the pooled scope does).

    The pooled decision compares every class's detections by calibrated score, so a calibration
    fitted with the certify images' labels would make the certified sequence depend on them:
    with isotonic maps fitted on all tune images, the pooled promise held in 0.846 of 1,000
    simulated tune sets instead of >= 0.95 (0.988 fitted on the learn part) (`simulation.pooled_coverage`). Per class, a calibration is one
    increasing map per class and leaves each class's order, and so its certified sequence, as
    it was; there the fit keeps every tune image. A box-dependent calibration (`box_platt`)
    reorders a class's own detections (its threshold moves with the box size), so it is fitted
    on the learn part too.
    """
    t = cfg.tuning
    compared = (t.scope == "pooled" or t.on_unreachable == "pool"
                or calibration.get(cfg.calibration.method).uses_boxes)
    return "learn" if compared and uses_learn_split(cfg, prep, num_tune) else "tune"


def tune_on(cfg: Config, prep: Prepared, tune_idx: np.ndarray) -> Tuned:
    """Calibration fit and search on the images `tune_idx`."""
    parts = tune_parts(cfg, prep, tune_idx)
    fit_idx = parts.calibration_images
    calib = fit_calibration(cfg, prep, fit_idx)
    used = prep.mapping.column_category_ids >= 0
    if calib is not None:
        log.info("calibration: %s fitted on %d %simages (%d categories shrunk toward the "
                 "pooled fit)", calib.method, len(fit_idx),
                 "learn " if len(fit_idx) < len(tune_idx) else "",
                 sum(bool(used[k]) for k in calib.fallback_classes))
    found = search(cfg, prep, calib, parts)
    mapped = [c for c in found.classes if used[c.column]]
    log.info("search: %d categories ok, %d unreachable, %d insufficient data, %d pooled, "
             "%d below target", *(sum(c.status == s for c in mapped)
                                  for s in ("ok", "unreachable", "insufficient_data", "pooled",
                                            "below_target")))
    return Tuned(parts, calib, found, tuned_postprocess_config(cfg, prep, calib, found))
