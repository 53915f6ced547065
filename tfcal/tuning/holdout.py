"""The held-out evidence and report.json's content: the final serving post-processing measured
on the holdout images (the honest numbers).

Nothing here chooses anything. It runs the exact `PostProcessor` that will be exported on the
cached raw outputs of images that took no part in calibration or search, evaluates it with
pycocotools and the COCO matcher, and assembles report.json.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import tfcal
from tfcal.coco.evaluation import coco_stats
from tfcal.metrics import brier_score, expected_calibration_error
from tfcal.thresholds import clopper_pearson
from tfcal.tuning.baseline import recall_at_precision
from tfcal.tuning.detections import (FlatDetections, default_postprocess_config, match,
                                     postprocess_images, to_coco_detections,
                                     ODAPI_DEFAULT_SCORE_THRESH)
from tfcal.objective_kinds import KINDS, kind_of
from tfcal.tuning.localization import MatchedBefore, localization_block
from tfcal.tuning.objectives import objectives
from tfcal.tuning.report import jsonable
from tfcal.tuning.tune import calibration_fit_part

#: Two-sided level of the holdout precision intervals in the report.
HOLDOUT_CONFIDENCE = 0.95
#: Classes plotted as precision/recall against threshold (the most frequent ones).
PLOTTED_CLASSES = 6
#: Points kept per curve in report.json.
CURVE_POINTS = 120

#: ECE and reliability diagrams count detections whose score (before: raw, after: calibrated)
#: is at least this: the near-zero tail of thousands of background boxes would otherwise make
#: any detector look calibrated. `ece_all_detections_*` keep the unfiltered numbers.
ECE_MIN_SCORE = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class Counts:
    """TP/FP/FN per class column (int64 `[K]` each) and their sum."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def from_match(cls, result, columns, num_gt, num_classes) -> "Counts":
        tp = np.bincount(columns, weights=result.tp, minlength=num_classes).astype(np.int64)
        fp = np.bincount(columns, weights=result.fp, minlength=num_classes).astype(np.int64)
        return cls(tp, fp, num_gt - tp)


def _precision_block(tp: int, fp: int, fn: int) -> dict:
    """Counts, precision with its two-sided Clopper–Pearson interval, and recall."""
    n = tp + fp
    lower, upper = clopper_pearson(np.array([tp]), np.array([n]), HOLDOUT_CONFIDENCE)
    return {
        "tp": int(tp), "fp": int(fp), "fn": int(fn),
        "precision": tp / n if n else None,
        "precision_lower": float(lower[0]) if n else None,
        "precision_upper": float(upper[0]) if n else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


def _calibrated(calib, cfg, scores, columns, boxes=None):
    """Calibrated probabilities of uncalibrated post-processed `scores` of class `columns`
    (and `boxes`, normalized `[D, 4]`, for a box-dependent calibration)."""
    if calib is None or scores.size == 0:
        return scores.astype(np.float64)
    return calib.apply_to_probabilities(scores, columns, boxes).astype(np.float64)


#: A class is "clearly below" its precision target on the held-out images when it emitted at
#: least this many detections there and the upper end of its two-sided interval is under it.
CLEARLY_BELOW_MIN_DETECTIONS = 20


def _meets(cfg, column_objective, block) -> bool | None:
    """The held-out point estimate against the class's target (None when not measurable)."""
    return kind_of(column_objective.name).meets(column_objective, block)


def _clearly_below(column_objective, block) -> bool:
    """Held-out evidence that the class misses its precision target: enough detections and the
    whole interval under the target."""
    kind = kind_of(column_objective.name)
    if kind.metric != "precision" or block["precision_upper"] is None:
        return False
    return bool(block["tp"] + block["fp"] >= CLEARLY_BELOW_MIN_DETECTIONS
                and block["precision_upper"] < kind.target(column_objective))


def _downsample(*arrays, n=CURVE_POINTS):
    size = len(arrays[0])
    if size <= n:
        return [a.tolist() for a in arrays]
    idx = np.unique(np.linspace(0, size - 1, n).round().astype(int))
    return [a[idx].tolist() for a in arrays]


@dataclasses.dataclass(frozen=True, eq=False)
class HoldoutEvidence:
    """Detections of evaluated images, each made by parameters not tuned on that image.

    Attributes:
      before: the default post-processing (no calibration, score > 1e-8, default IoU).
      before_calibrated: float32 `[len(before)]`: each `before` score after the calibration
        that was fitted without its image.
      final: the tuned serving post-processing.
      baseline: the global raw-score threshold chosen on the same tune images
        (`tfcal.tuning.baseline`).
      baseline_choices: the baseline's pooled `ClassChoice` of each tune split (one; k per
        k-fold run).
    """

    before: FlatDetections
    before_calibrated: np.ndarray
    final: FlatDetections
    baseline: FlatDetections
    baseline_choices: tuple

    @classmethod
    def concat(cls, parts: list["HoldoutEvidence"]) -> "HoldoutEvidence":
        cat = FlatDetections.concat
        return cls(cat([p.before for p in parts]),
                   np.concatenate([p.before_calibrated for p in parts]),
                   cat([p.final for p in parts]), cat([p.baseline for p in parts]),
                   tuple(c for p in parts for c in p.baseline_choices))


def collect_evidence(cfg, prep, ppc, calib, default_iou: float, idx, baseline) -> HoldoutEvidence:
    """Runs the default, the tuned and the baseline post-processing over the images `idx`."""
    before_ppc = default_postprocess_config(cfg, prep, default_iou)
    before = postprocess_images(before_ppc, prep.raw, idx)
    return HoldoutEvidence(before, _calibrated(calib, cfg, before.score, before.column,
                                               before.boxes),
                           postprocess_images(ppc, prep.raw, idx),
                           postprocess_images(baseline.ppc, prep.raw, idx),
                           (baseline.choice,))


def holdout_report(cfg, prep, ppc, calib, found, split: dict, eval_idx,
                   evidence: HoldoutEvidence) -> dict:
    """Builds report.json's content. See `tfcal.tuning.report` for the schema.

    Args:
      cfg, prep: the job.
      ppc, calib, found: the deployed post-processing, its calibration and search result.
      split: what `report["split"]` says about how `evidence` was produced.
      eval_idx: the evaluated images (holdout, or every image under k-fold).
      evidence: their detections, each from parameters tuned without that image.
    """
    k = prep.num_classes
    eval_ids = prep.dataset.image_ids[eval_idx]
    objective, overrides = objectives(cfg, prep)

    before = evidence.before
    before_coco, mapped = to_coco_detections(before, prep)
    b_match, b_cols, num_gt = match(prep, before, eval_idx, cfg)
    keep = ~b_match.ignored
    labels = b_match.tp[keep].astype(np.int64)
    p_before = b_match.score[keep].astype(np.float64)
    p_after = evidence.before_calibrated[mapped][b_match.det_index][keep].astype(np.float64)
    # ECE counts detections a user would see: each side's own score >= ECE_MIN_SCORE.
    seen_before, seen_after = p_before >= ECE_MIN_SCORE, p_after >= ECE_MIN_SCORE

    # After: the exact serving post-processing.
    final_coco, _ = to_coco_detections(evidence.final, prep)
    f_match, f_cols, _ = match(prep, evidence.final, eval_idx, cfg)
    counts = Counts.from_match(f_match, f_cols, num_gt, k)

    classes = []
    for cat_id, name in zip(prep.dataset.category_ids, prep.dataset.category_names):
        col = prep.mapping.column_of(int(cat_id))
        choice = found.classes[col]
        block = _precision_block(counts.tp[col], counts.fp[col], counts.fn[col])
        col_objective = overrides.get(col, objective)
        block["meets_target"] = _meets(cfg, col_objective, block) if choice.enabled else None
        block["clearly_below"] = bool(choice.enabled and _clearly_below(col_objective, block))
        entry = {
            "category_id": int(cat_id), "name": name, "column": col,
            "status": choice.status if choice.enabled or choice.status != "ok" else "disabled",
            "enabled": bool(choice.enabled),
            "threshold": float(choice.min_score_thresh), "nms_iou": float(choice.nms_iou),
            "objective": choice.objective,
            "calibration": _class_calibration(calib, col),
            "tune": {"tp": choice.tp, "fp": choice.fp, "fn": choice.fn,
                     "precision": choice.precision, "recall": choice.recall,
                     "num_gt": choice.num_gt},
            "guarantee": {"kind": choice.guarantee, "test_level": choice.test_level,
                          "p_value": choice.p_value,
                          "boxes_to_certify": choice.boxes_to_certify,
                          "boxes_available": choice.boxes_available},
            "holdout": block,
        }
        if calib is not None and calib.method == "temperature":
            entry["temperature"] = float(calib.temperature[col])
        classes.append(entry)

    # Recall counts every category's ground truth: a disabled class's objects are misses.
    mapped_cols = np.array([c["column"] for c in classes], dtype=np.int64)
    total = _precision_block(int(counts.tp[mapped_cols].sum()), int(counts.fp[mapped_cols].sum()),
                             int(counts.fn[mapped_cols].sum()))

    summary = {
        "coco_stats_before": coco_stats(prep.dataset, before_coco, image_ids=eval_ids),
        "coco_stats_after": coco_stats(prep.dataset, final_coco, image_ids=eval_ids),
        "ece_before": _maybe(expected_calibration_error, p_before[seen_before],
                             labels[seen_before]),
        "ece_after": _maybe(expected_calibration_error, p_after[seen_after], labels[seen_after]),
        "ece_min_score": ECE_MIN_SCORE,
        "ece_samples_before": int(seen_before.sum()),
        "ece_samples_after": int(seen_after.sum()),
        "ece_all_detections_before": _maybe(expected_calibration_error, p_before, labels),
        "ece_all_detections_after": _maybe(expected_calibration_error, p_after, labels),
        "brier_before": _maybe(brier_score, p_before, labels),
        "brier_after": _maybe(brier_score, p_after, labels),
        "calibration_samples": int(labels.size),
        "holdout": total,
        "before_post_processing": {"nms_iou": found.default_nms_iou,
                                   "score_threshold": ODAPI_DEFAULT_SCORE_THRESH,
                                   "calibration": "none"},
    }
    summary["localization"] = localization_block(
        prep, MatchedBefore(before, mapped, b_match), evidence.before_calibrated, eval_idx,
        min_score=ECE_MIN_SCORE, max_dets=cfg.tuning.max_total_detections)
    summary["baseline"] = _baseline_block(cfg, prep, evidence, eval_idx, classes, total,
                                          b_match, num_gt, mapped_cols, objective)
    summary["guarantee"] = _guarantee_block(cfg, found, classes)
    summary["comparison"] = comparison(total, summary["baseline"])
    subgroups = _subgroups(cfg, prep, eval_idx, f_match, b_match, keep, p_after, labels,
                           seen_after)
    notes = _notes(cfg, prep, classes, calib)
    t = cfg.tuning
    report = {
        "tfcal_version": tfcal.__version__,
        "target": {"objective": t.objective, "target_precision": t.target_precision,
                   "target_recall": t.target_recall, "beta": t.beta, "c_fp": t.c_fp,
                   "c_fn": t.c_fn, "confidence": t.confidence,
                   "confidence_budget": t.confidence_budget, "scope": t.scope,
                   "match_iou": t.match_iou,
                   "nms_iou_grid": list(t.nms_iou_grid),
                   "default_nms_iou": found.default_nms_iou,
                   "on_unreachable": t.on_unreachable},
        "split": split,
        "calibration": {"method": cfg.calibration.method, "per_class": cfg.calibration.per_class,
                        "min_samples": cfg.calibration.min_samples,
                        "fitted_on": (calibration_fit_part(cfg, prep, split["tune_images"])
                                      if calib is not None else None),
                        "fallback_classes": _fallback_ids(calib, prep),
                        "pooled": dict(calib.pooled) if calib is not None else None},
        "holdout_confidence": HOLDOUT_CONFIDENCE,
        "classes": classes,
        "summary": summary,
        "subgroups": subgroups,
        "notes": notes,
        "provenance": dict(ppc.metadata),
        "curves": _curves(prep, found, classes, p_before, p_after, labels, seen_before,
                          seen_after),
    }
    return jsonable(report)


def _baseline_block(cfg, prep, evidence, eval_idx, classes, total, b_match, num_gt,
                    mapped_cols, objective) -> dict:
    """The global raw-score threshold beside tfcal's numbers, on the same held-out images."""
    k = prep.num_classes
    m, m_cols, _ = match(prep, evidence.baseline, eval_idx, cfg)
    counts = Counts.from_match(m, m_cols, num_gt, k)
    pooled = _precision_block(int(counts.tp[mapped_cols].sum()), int(counts.fp[mapped_cols].sum()),
                              int(counts.fn[mapped_cols].sum()))
    emitted = below = 0
    for c in classes:
        col = c["column"]
        block = _precision_block(counts.tp[col], counts.fp[col], counts.fn[col])
        if block["tp"] + block["fp"] > 0:
            emitted += 1
            below += _clearly_below(objective, block)
    keep = ~b_match.ignored
    same = recall_at_precision(b_match.score[keep].astype(np.float64), b_match.tp[keep],
                               int(num_gt[mapped_cols].sum()), total["precision"])
    choices = evidence.baseline_choices
    return {
        "description": "one min_score_thresh on raw (uncalibrated) scores for every class, "
                       "default NMS IoU, chosen on the same tune images for the same target",
        "thresholds": [float(c.min_score_thresh) if c.enabled else None for c in choices],
        "nms_iou": float(choices[0].nms_iou),
        "guarantee": choices[0].guarantee,
        "holdout": pooled,
        "emitted_classes": emitted,
        "clearly_below_classes": below,
        "same_precision": same,
        "tfcal_emitted_classes": sum(1 for c in classes
                                     if c["holdout"]["tp"] + c["holdout"]["fp"] > 0),
        "tfcal_clearly_below_classes": sum(1 for c in classes if c["holdout"]["clearly_below"]),
    }


def comparison(total: dict, baseline: dict) -> dict:
    """The comparison users make, and its one-line verdict: tfcal's held-out recall against the
    best recall one global raw-score threshold reaches on the same held-out images at tfcal's
    held-out precision (chosen with the held-out labels: the baseline's best case).

    Returns:
      `{"precision", "recall", "global_recall", "verdict", "line"}`; `verdict` is `"wins"`
      (tfcal's recall is higher, or no global threshold reaches that precision), `"ties"`
      (equal to 3 decimals), `"loses"`, or None when there is nothing to compare.
    """
    p, r = total.get("precision"), total.get("recall")
    same = baseline.get("same_precision") or {}
    g = same.get("recall")
    out = {"precision": p, "recall": r, "global_recall": g, "verdict": None, "line": None}
    if p is None or r is None or total.get("tp", 0) == 0:
        out["line"] = "nothing emitted on the held-out images: no comparison"
        return out
    if g is None:
        verdict = "wins"
        line = (f"tfcal wins: recall {r:.3f} at held-out precision {p:.3f}, which no global "
                f"raw-score threshold reaches")
    else:
        verdict = "ties" if round(r, 3) == round(g, 3) else ("wins" if r > g else "loses")
        word = {"wins": "beats", "ties": "ties with", "loses": "trails"}[verdict]
        line = (f"tfcal {word} one global threshold: recall {r:.3f} vs {g:.3f} at the same "
                f"held-out precision {p:.3f}")
    out.update(verdict=verdict, line=line)
    return out


def _guarantee_block(cfg, found, classes) -> dict:
    """What is promised, in words, and how many classes carry the promise."""
    t = cfg.tuning
    kinds = {}
    for c in classes:
        kinds[c["guarantee"]["kind"]] = kinds.get(c["guarantee"]["kind"], 0) + 1
    out = {"confidence": t.confidence if kind_of(t.objective).certifiable else None,
           "budget": t.confidence_budget, "scope": t.scope,
           "pooled": found.pooled.guarantee if t.scope == "pooled" and found.pooled else None,
           "classes": kinds, "statement": guarantee_statement(cfg)}
    if t.scope == "per_class" and t.on_unreachable == "pool":
        members = [c for c in classes if c["status"] == "pooled"]
        g = found.pooled
        tp = sum(c["holdout"]["tp"] for c in members)
        fp = sum(c["holdout"]["fp"] for c in members)
        fn = sum(c["holdout"]["fn"] for c in members)
        out["group"] = {
            "classes": len(members),
            "members": sum(1 for c in classes if c.get("column") in set(found.group)),
            "guarantee": g.guarantee if g is not None else "none",
            "threshold": float(g.min_score_thresh) if g is not None and g.enabled else None,
            "nms_iou": float(g.nms_iou) if g is not None and g.enabled else None,
            "test_level": float(g.test_level) if g is not None else None,
            "p_value": float(g.p_value) if g is not None else None,
            "holdout": _precision_block(tp, fp, fn) if members else None}
    return out


def guarantee_statement(cfg) -> str:
    """The promise of a run, in words (report.md and README use the same sentences)."""
    t = cfg.tuning
    kind = kind_of(t.objective)
    if not kind.certifiable:
        return (f"Estimate, not guaranteed: {t.objective} is optimized on the tune images; the "
                "held-out numbers show how it carries over.")
    what, target = kind.metric, kind.target(t)
    if t.confidence is None:
        return (f"Estimate, not guaranteed: thresholds reach {what} >= {target} on the tune "
                "images (point estimate); new images may fall below it, as the held-out numbers "
                "show.")
    level = f"{t.confidence:.0%}"
    if t.scope == "pooled":
        return (f"With probability >= {level} over the draw of the tune images, the {what} of "
                f"all emitted detections pooled is >= {target} on new images from the same "
                f"distribution. Single classes carry no promise of their own.")
    who = ("each class marked certified" if t.confidence_budget == "per_class"
           else "all classes marked certified, at once,")
    tail = (" (each class on its own; not all classes at once)"
            if t.confidence_budget == "per_class" else "")
    group = ""
    if t.on_unreachable == "pool":
        group = (f" Every class the learn images do not show below the target is a member of "
                 f"one group with one threshold on calibrated scores: with probability >= "
                 f"{level}, the members' detections at that threshold, taken together, have "
                 f"{what} >= {target}. A class marked pooled is emitted at the group's threshold "
                 f"and carries only that statement, none of its own; a class marked certified "
                 f"is emitted at its own certified threshold."
                 + (" Whichever of the two a class carries holds with that probability (its "
                    "own test and the group's share its error)."
                    if t.confidence_budget == "per_class" else ""))
    return (f"With probability >= {level} over the draw of the tune images, {who} has {what} >= "
            f"{target} on new images from the same distribution{tail}.{group} Classes not "
            f"marked certified{' or pooled' if group else ''} (pooled fallback, best effort, "
            f"disabled) carry no such promise. Assumes the served images are drawn like the tune "
            f"images, and counts detections as independent.")


def _maybe(fn, probs, labels):
    return float(fn(probs, labels)) if labels.size else None


def _class_calibration(calib, col: int) -> dict:
    return {} if calib is None else calib.report_entry(col)


def _fallback_ids(calib, prep) -> list[int]:
    if calib is None:
        return []
    ids = prep.mapping.column_category_ids
    return [int(ids[c]) for c in calib.fallback_classes if ids[c] >= 0]


def _subgroups(cfg, prep, holdout_idx, f_match, b_match, keep, p_after, labels,
               seen_after) -> list[dict]:
    out = []
    images = prep.dataset.dataset["images"]
    gt_mask = ~prep.dataset.ann_iscrowd
    objective = cfg.tuning.objective
    for field in cfg.data.subgroups:
        values = {}
        for r in holdout_idx:
            values.setdefault(str(images[r][field]), []).append(int(prep.dataset.image_ids[r]))
        for value, ids in sorted(values.items()):
            ids = np.array(ids, dtype=np.int64)
            fm = np.isin(f_match.image_id, ids)
            tp = int(f_match.tp[fm].sum())
            fp = int(f_match.fp[fm].sum())
            gt_cols = np.isin(prep.dataset.ann_image_ids, ids) & gt_mask
            n_gt = int((gt_cols & np.isin(prep.dataset.ann_category_ids,
                                          prep.mapping.category_ids)).sum())
            block = _precision_block(tp, fp, n_gt - tp)
            bm = np.isin(b_match.image_id[keep], ids) & seen_after
            ece = (float(expected_calibration_error(p_after[bm], labels[bm]))
                   if bm.any() else None)
            below = kind_of(objective).meets(cfg.tuning, block) is False
            out.append({"field": field, "value": value, "images": int(len(ids)), **block,
                        "ece": ece, "below_target": bool(below)})
    return out


def _notes(cfg, prep, classes, calib) -> list[str]:
    notes = []
    unused = int((prep.mapping.column_category_ids < 0).sum())
    if unused:
        notes.append(f"{unused} score column{'s map' if unused != 1 else ' maps'} to no category of "
                     "the annotations: they cannot be evaluated, so the tuned post-processing "
                     "never emits them.")
    for status, text in (("unreachable", "could not reach the target on the tune split"),
                         ("insufficient_data", "had too little support and use the pooled "
                                               "choice"),
                         ("pooled", "share the group's certified threshold (on_unreachable: "
                                    "pool)"),
                         ("below_target", "are shown below the target by the learn part (upper "
                                          "confidence bound under it at every threshold) and "
                                          "disabled"),
                         ("disabled", "are disabled (never emitted)")):
        names = [c["name"] for c in classes if c["status"] == status]
        if names:
            notes.append(f"{_count(len(names), 'class', 'classes')} {text}: "
                         f"{', '.join(names[:12])}"
                         + (" ..." if len(names) > 12 else ""))
    missed = [c["name"] for c in classes if c["holdout"].get("meets_target") is False]
    if missed:
        notes.append(f"{_count(len(missed), 'enabled class misses', 'enabled classes miss')} "
                     f"the target on the holdout images: "
                     f"{', '.join(missed[:12])}" + (" ..." if len(missed) > 12 else "")
                     + ". Small holdout counts make wide intervals: read the interval column.")
    shrunk = _fallback_ids(calib, prep) if calib is not None else []
    if shrunk:
        notes.append(f"calibration shrank {_count(len(shrunk), 'category', 'categories')} toward "
                     f"the pooled fit (fewer than {cfg.calibration.min_samples} tune detections, "
                     f"a single label value, or a fit stopped at a bound).")
    return notes


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _curves(prep, found, classes, p_before, p_after, labels, seen_before, seen_after) -> dict:
    by_support = sorted((c for c in classes if c["enabled"] and c["tune"]["num_gt"] > 0),
                        key=lambda c: -c["tune"]["num_gt"])[:PLOTTED_CLASSES]
    grid = list(found.nms_iou_grid)
    out_classes = []
    for c in by_support:
        curves = found.curves[grid.index(c["nms_iou"])]
        thr, prec, rec = curves.for_class(c["column"])
        if thr.size == 0:
            continue
        t, p, r = _downsample(thr, prec, rec)
        out_classes.append({"category_id": c["category_id"], "name": c["name"],
                            "nms_iou": c["nms_iou"], "threshold": t, "precision": p,
                            "recall": r, "chosen": {"threshold": c["threshold"],
                                                    "precision": c["tune"]["precision"],
                                                    "recall": c["tune"]["recall"]}})
    table = np.asarray(found.iou_table, dtype=np.float64)  # [G, K] best value, NaN: infeasible
    scored = [c["column"] for c in classes if c["tune"]["num_gt"] > 0]
    sub = table[:, scored] if scored else np.full((len(grid), 1), np.nan)
    feasible = np.isfinite(sub)
    objective = classes[0]["objective"] if classes else "value"
    with np.errstate(invalid="ignore"):
        mean_value = np.where(feasible.any(axis=1),
                              np.nansum(np.where(feasible, sub, 0.0), axis=1)
                              / np.maximum(feasible.sum(axis=1), 1), np.nan)
    return {
        "reliability": {"confidence_before": p_before[seen_before].tolist(),
                        "label_before": labels[seen_before].tolist(),
                        "confidence_after": p_after[seen_after].tolist(),
                        "label_after": labels[seen_after].tolist(),
                        "num_bins": 10} if seen_before.any() and seen_after.any() else None,
        "classes": out_classes,
        "iou_grid": {"nms_iou": grid,
                     "classes reaching the target (fraction)": feasible.mean(axis=1).tolist(),
                     f"mean best {KINDS[objective].value_name if objective in KINDS else 'value'} "
                     "(feasible classes)":
                         [None if math.isnan(v) else float(v) for v in mean_value]},
    }


