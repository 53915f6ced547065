"""The tuning job end to end: config -> raw outputs -> calibration -> search -> report -> export.

Data flows one way. The detector runs once (its raw, pre-NMS outputs are cached); images are
split into a tune part (calibration fit and threshold/IoU search) and a holdout part (every
reported number). The final check runs the exact serving `PostProcessor` on the cached raw
outputs of the holdout images and evaluates it with pycocotools.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

import tfcal
from tfcal import TfcalError, atomic, locks, rundir
from tfcal.config import Config, config_to_dict

log = logging.getLogger(__name__)

#: The detector's own post-processing we compare against (the OD API default).
ODAPI_DEFAULT_SCORE_THRESH = 1e-8
#: Two-sided level of the holdout precision intervals in the report.
HOLDOUT_CONFIDENCE = 0.95
#: Classes plotted as precision/recall against threshold (the most frequent ones).
PLOTTED_CLASSES = 6
#: Points kept per curve in report.json.
CURVE_POINTS = 120
#: Images per post-processing call over cached raw outputs.
POSTPROCESS_BATCH = 32


# ----------------------------------------------------------------------------------------------
# Preparation: validated data, category mapping, raw outputs


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Validated inputs of a job.

    Attributes:
      dataset: the `CocoDataset`.
      mapping: the `CategoryMapping` of score columns to category ids.
      raw: the `RawOutputs` (image_ids, boxes, scores, ...), in `dataset.image_ids` order.
      num_classes: K, class score columns after dropping background.
      model_fingerprint: sha256 of the SavedModel and its keys, or ``raw_outputs:<sha256>`` of
        the precomputed outputs' file (or cache meta).
      data_fingerprint: sha256 of the image list (the cache key's data half).
    """

    dataset: Any
    mapping: Any
    raw: Any
    num_classes: int
    model_fingerprint: str
    data_fingerprint: str


def load_dataset(cfg: Config, annotations: Path | None = None, images: Path | None = None):
    """Loads and validates the COCO set (and, with a model, its images) before any work."""
    from tfcal.coco.dataset import load_coco

    annotations = annotations or cfg.data.annotations
    images = images if images is not None else cfg.data.images
    need_images = cfg.model.saved_model is not None
    if need_images and images is None:
        raise TfcalError(f"{cfg.source}: data.images: is required to run model.saved_model")
    dataset = load_coco(annotations, images if need_images else None, check_images=need_images)
    for field in cfg.data.subgroups:
        missing = [img.get("id") for img in dataset.dataset["images"] if field not in img]
        if missing:
            raise TfcalError(f"{annotations}: images[id={missing[0]}].{field}: missing "
                             f"(data.subgroups lists it; {len(missing)} images lack it)")
    return dataset


def prepare(cfg: Config, *, annotations: Path | None = None, images: Path | None = None,
            cache_dir: Path | None = None) -> Prepared:
    """Validates the data, maps categories to columns and gets the raw outputs (cached)."""
    from tfcal.coco import runner
    from tfcal.coco.cache import check_value_ranges, load_raw_outputs
    from tfcal.coco.dataset import CategoryMapping

    dataset = load_dataset(cfg, annotations, images)
    m = cfg.model
    if m.saved_model is not None:
        keys = runner.SignatureKeys(signature=m.signature, input=m.input, raw_boxes=m.raw_boxes,
                                    raw_scores=m.raw_scores)
        raw = runner.run_detector(
            m.saved_model, dataset, keys=keys, batch_size=m.batch_size,
            cache_dir=cache_dir or m.cache_dir or (cfg.output.dir / "cache"))
    else:
        raw = load_raw_outputs(m.raw_outputs, dataset)
    model_run = m.saved_model is not None
    check_value_ranges(raw, score_converter=m.score_converter,
                       source=str(m.saved_model or m.raw_outputs),
                       boxes_key=m.raw_boxes if model_run else "boxes",
                       scores_key=m.raw_scores if model_run else "scores")
    num_columns = raw.scores.shape[-1]
    num_classes = num_columns - 1 if m.background_column else num_columns
    if num_classes < 1:
        raise TfcalError(f"{m.saved_model or m.raw_outputs}: {m.raw_scores}: needs at least one "
                         f"class column, got {num_columns} columns")
    if m.category_columns is not None:
        mapping = CategoryMapping.from_category_columns(dataset, m.category_columns, num_classes)
    else:
        mapping = CategoryMapping.odapi(dataset, num_classes, label_offset=m.label_offset)
    # Precomputed outputs have no model to hash: their own file identifies what was measured.
    model_fp = raw.model_fingerprint or f"raw_outputs:{raw.fingerprint}"
    return Prepared(dataset=dataset, mapping=mapping, raw=raw, num_classes=num_classes,
                    model_fingerprint=model_fp, data_fingerprint=raw.data_fingerprint)


# ----------------------------------------------------------------------------------------------
# Running the real post-processing ops over cached raw outputs


@dataclasses.dataclass(frozen=True, eq=False)
class FlatDetections:
    """Post-processed detections of many images, flattened.

    Attributes:
      image_index: int64 `[D]` row in the raw outputs. column: int64 `[D]` class column.
      score: float32 `[D]`. boxes: float32 `[D, 4]` normalized `[ymin, xmin, ymax, xmax]`.
    """

    image_index: np.ndarray
    column: np.ndarray
    score: np.ndarray
    boxes: np.ndarray

    def subset(self, mask: np.ndarray) -> "FlatDetections":
        return FlatDetections(self.image_index[mask], self.column[mask], self.score[mask],
                              self.boxes[mask])


def postprocess_images(ppc, raw, indices: np.ndarray, *, batch_size: int | None = None
                       ) -> FlatDetections:
    """Runs the serving `PostProcessor` of `ppc` over the raw outputs of `indices`."""
    from tfcal.layers import PostProcessor

    layer = PostProcessor.from_postprocess_config(ppc)
    fn = _compiled(layer)
    batch_size = batch_size or POSTPROCESS_BATCH
    parts = []
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start:start + batch_size])
        out = fn(raw.boxes[idx], raw.scores[idx])
        n = out["num_detections"].numpy().astype(np.int64)
        valid = np.arange(out["detection_scores"].shape[1])[None, :] < n[:, None]
        parts.append((np.repeat(idx, n),
                      out["detection_classes"].numpy()[valid].astype(np.int64) - ppc.label_offset,
                      out["detection_scores"].numpy()[valid],
                      out["detection_boxes"].numpy()[valid]))
    if not parts:
        return FlatDetections(np.zeros(0, np.int64), np.zeros(0, np.int64),
                              np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    return FlatDetections(*(np.concatenate(p) for p in zip(*parts)))


def _compiled(layer):
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fn(boxes, scores):
        return layer(boxes, scores)

    return fn


def to_coco_detections(dets: FlatDetections, prep: Prepared):
    """Normalized boxes of used columns -> `Detections` in COCO pixel xywh."""
    from tfcal.coco.matching import Detections

    cat = prep.mapping.columns_to_category_ids(dets.column)
    keep = cat >= 0
    d = dets.subset(keep)
    h = prep.dataset.image_heights[d.image_index].astype(np.float64)
    w = prep.dataset.image_widths[d.image_index].astype(np.float64)
    b = d.boxes.astype(np.float64)
    x0, y0 = b[:, 1] * w, b[:, 0] * h
    xywh = np.stack([x0, y0, b[:, 3] * w - x0, b[:, 2] * h - y0], axis=1)
    return Detections.from_arrays(prep.dataset.image_ids[d.image_index], cat[keep], xywh,
                                  d.score), keep


def match(prep: Prepared, dets: FlatDetections, image_indices: np.ndarray, cfg: Config):
    """Matches `dets` on the images `image_indices`; returns (MatchResult, per-row column)."""
    from tfcal.coco.matching import match_detections

    coco_dets, _ = to_coco_detections(dets, prep)
    result = match_detections(prep.dataset, coco_dets, iou_threshold=cfg.tuning.match_iou,
                              max_dets=cfg.tuning.max_total_detections,
                              image_ids=prep.dataset.image_ids[image_indices])
    columns = np.array([prep.mapping.column_of(c) for c in result.category_ids], dtype=np.int64)
    num_gt = np.zeros(prep.num_classes, dtype=np.int64)
    num_gt[columns] = result.num_gt
    return result, columns[np.searchsorted(result.category_ids, result.category_id)], num_gt


# ----------------------------------------------------------------------------------------------
# The job


def _base_postprocess_config(cfg: Config, prep: Prepared, **fields):
    from tfcal.postprocess import PostProcessConfig

    base = dict(
        num_classes=prep.num_classes,
        score_converter=cfg.model.score_converter,
        background_column=cfg.model.background_column,
        max_detections_per_class=cfg.tuning.max_detections_per_class,
        max_total_detections=cfg.tuning.max_total_detections,
        label_offset=cfg.model.label_offset,
        class_ids=tuple(int(c) for c in prep.mapping.column_category_ids),
    )
    base.update(fields)
    return PostProcessConfig(**base)


def fit_calibration(cfg: Config, prep: Prepared, tune_idx: np.ndarray):
    """Fits the calibration on the tune split's detections (default IoU, no threshold).

    Returns:
      `(PerClassCalibration or None, FlatDetections, tp labels)`; the detections and labels are
      the tune samples the fit used (None for method `none`).
    """
    from tfcal import calibration
    from tfcal.tuning.search import default_iou

    method = calibration.get(cfg.calibration.method)
    if method.name == "none":
        return None
    try:
        method.check_fit_converter(cfg.model.score_converter)
    except ValueError as e:
        raise TfcalError(f"{cfg.source}: calibration.method: {e}") from None
    iou = cfg.tuning.default_nms_iou or default_iou(cfg.tuning.nms_iou_grid)
    plain = _base_postprocess_config(cfg, prep, nms_iou=(iou,),
                                     min_score_thresh=(ODAPI_DEFAULT_SCORE_THRESH,))
    dets = postprocess_images(plain, prep.raw, tune_idx)
    result, columns, _ = match(prep, dets, tune_idx, cfg)
    keep = ~result.ignored
    probs = result.score[keep].astype(np.float64)
    labels = result.tp[keep].astype(np.int64)
    cols = columns[keep]
    if labels.size == 0:
        raise TfcalError(f"{cfg.data.annotations}: no detections on the tune images to "
                         "calibrate with (check model.score_converter and the data)")
    x = method.to_space(probs)
    if cfg.calibration.per_class:
        names = [_column_label(prep, k) for k in range(prep.num_classes)]
        return calibration.fit_per_class(method.name, x, labels, cols, prep.num_classes,
                                         min_samples=cfg.calibration.min_samples,
                                         class_labels=names)
    pooled = calibration.fit_per_class(method.name, x, labels, np.zeros_like(cols), 1,
                                       min_samples=cfg.calibration.min_samples)
    return _broadcast_pooled(pooled, prep.num_classes)


def _column_label(prep: Prepared, column: int, detail: str = "") -> str:
    """``name (id N<detail>)`` of the category a class column predicts (or ``column k``)."""
    i = int(prep.mapping.column_category_ids[column])
    if i < 0:
        return f"column {column}"
    return f"{prep.dataset.category_name(i)} (id {i}{detail})"


def _broadcast_pooled(pooled, num_classes: int):
    """A one-class fit repeated for every class column."""
    return pooled.broadcast(num_classes)


def _calibration_fields(calib) -> dict:
    if calib is None:
        return {"calibration": "none"}
    return calib.config_fields()


def _objectives(cfg: Config, prep: Prepared):
    from tfcal.tuning.search import Objective

    t = cfg.tuning
    base = Objective(name=t.objective, target_precision=t.target_precision,
                     target_recall=t.target_recall, beta=t.beta, c_fp=t.c_fp, c_fn=t.c_fn,
                     confidence=t.confidence, on_unreachable=t.on_unreachable)
    overrides = {}
    for key, ov in t.classes.items():
        cat_id = _resolve_category_key(cfg, prep, key)
        try:
            column = prep.mapping.column_of(cat_id)
        except ValueError:
            raise TfcalError(f"{cfg.source}: tuning.classes.{key}: category {cat_id} has no "
                             "score column") from None
        fields = {f.name: getattr(ov, f.name) for f in dataclasses.fields(ov)}
        overrides[column] = base.with_overrides(**fields)
    return base, overrides


def _resolve_category_key(cfg: Config, prep: Prepared, key: str) -> int:
    ds = prep.dataset
    names = {n: int(i) for i, n in zip(ds.category_ids, ds.category_names)}
    if key in names:
        return names[key]
    if key.lstrip("-").isdigit() and int(key) in set(int(i) for i in ds.category_ids):
        return int(key)
    raise TfcalError(f"{cfg.source}: tuning.classes.{key}: not a category id or name of "
                     f"{cfg.data.annotations}")


def _calibrate_fn(cfg: Config, calib):
    """The calibration op (as the serving graph runs it) for `collect_candidates`."""
    from tfcal import calibration

    method = calibration.get("none" if calib is None else calib.method)
    weights = method.weights({} if calib is None else calib.params)

    def calibrate(raw_scores):
        return method.calibrate_tf(raw_scores, weights, score_converter=cfg.model.score_converter,
                                   background_column=cfg.model.background_column)

    return calibrate


def _raw_batches(raw, indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield raw.image_ids[idx], raw.boxes[idx], raw.scores[idx]


def matched_candidates(cfg: Config, prep: Prepared, calib, tune_idx: np.ndarray,
                       nms_iou_grid=None) -> dict:
    """`{nms_iou: MatchedDetections}` of the images `tune_idx`: post-processed once per NMS IoU
    (streamed) with the serving ops (calibration `calib`, or none, then combined NMS at
    `tuning.min_candidate_thresh`), matched once. For hard NMS any higher threshold applied to
    them equals post-processing at that threshold."""
    from tfcal.tuning.candidates import collect_candidates
    from tfcal.tuning.search import MatchedDetections

    t = cfg.tuning
    candidates = collect_candidates(
        _raw_batches(prep.raw, tune_idx, POSTPROCESS_BATCH), _calibrate_fn(cfg, calib),
        tuple(nms_iou_grid or t.nms_iou_grid), t.min_candidate_thresh,
        t.max_detections_per_class, t.max_total_detections)
    matched = {}
    for iou, cand in candidates.items():
        dets = FlatDetections(prep.dataset.image_index(cand.image_id), cand.column.astype(np.int64),
                              cand.score, cand.box)
        result, columns, num_gt = match(prep, dets, tune_idx, cfg)
        matched[iou] = MatchedDetections(score=result.score, column=columns, tp=result.tp,
                                         ignored=result.ignored, num_gt=num_gt)
    return matched


def learn_split(cfg: Config, prep: Prepared, tune_idx: np.ndarray):
    """`(learn_idx, certify_idx)`: the tune images split, stratified by class presence and seeded
    by `data.seed`, `tuning.learn_fraction` of them to plan the certified tests."""
    from tfcal.tuning.split import split_images

    ids = prep.dataset.image_ids[tune_idx]
    presence = _class_presence(prep)[tune_idx]
    cert_ids, learn_ids = split_images(ids, presence, holdout_fraction=cfg.tuning.learn_fraction,
                                       seed=cfg.data.seed + 1)
    return (np.sort(prep.dataset.image_index(learn_ids)),
            np.sort(prep.dataset.image_index(cert_ids)))


def _uses_learn_split(cfg: Config, prep: Prepared, num_tune: int) -> bool:
    """Certified objectives with `tuning.learn_fraction > 0` split the tune images again (when
    there are at least 2; with fewer the grid is paid for by Bonferroni instead)."""
    objective, overrides = _objectives(cfg, prep)
    certified = objective.certified or any(o.certified for o in overrides.values())
    if not (certified and cfg.tuning.learn_fraction > 0):
        return False
    if num_tune < 2:
        log.warning("certification: %d tune image cannot be split into learn and certify "
                    "parts; the NMS IoU grid is paid for by Bonferroni instead", num_tune)
        return False
    return True


def search(cfg: Config, prep: Prepared, calib, tune_idx: np.ndarray):
    """The per-class joint search (or, with `tuning.scope: pooled`, the one shared decision)
    over the tune split's calibrated candidates."""
    from tfcal.tuning.search import UnreachableTargetError, joint_search, pooled_search

    t = cfg.tuning
    objective, overrides = _objectives(cfg, prep)
    learn = None
    if _uses_learn_split(cfg, prep, len(tune_idx)):
        learn_idx, cert_idx = learn_split(cfg, prep, tune_idx)
        log.info("certification: %d tune images plan the tests, %d certify them",
                 len(learn_idx), len(cert_idx))
        learn = matched_candidates(cfg, prep, calib, learn_idx)
        matched = matched_candidates(cfg, prep, calib, cert_idx)
    else:
        matched = matched_candidates(cfg, prep, calib, tune_idx)
    if t.scope == "pooled":
        return pooled_search(matched, objective, default_nms_iou=t.default_nms_iou, learn=learn)
    try:
        return joint_search(matched, objective, overrides=overrides,
                            default_nms_iou=t.default_nms_iou, min_support=t.min_support,
                            confidence_budget=t.confidence_budget, learn=learn)
    except UnreachableTargetError as e:
        names = ", ".join(_column_label(prep, c, f", {n} ground truths")
                          for c, n in zip(e.columns, e.num_gt))
        raise TfcalError(f"{cfg.source}: tuning.on_unreachable: error, and the target "
                         f"({t.objective}) is unreachable on the tune split for {names}; "
                         f"relax the target, or set on_unreachable to disable or "
                         f"best_effort") from None


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What `tfcal tune` produced."""

    run_dir: Path
    report: dict
    postprocess_path: Path
    export: Any = None

    def summary(self) -> str:
        s = self.report["summary"]
        h = s["holdout"]
        statuses = {}
        for c in self.report["classes"]:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        lines = [
            f"report:      {self.run_dir / 'report.md'} (and report.json, plots/)",
            f"postprocess: {self.postprocess_path}",
            f"classes:     " + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())),
            f"holdout:     precision {_f(h['precision'])}, recall {_f(h['recall'])} "
            f"(TP {h['tp']}, FP {h['fp']}, FN {h['fn']}) on {self.report['split']['holdout_images']} images",
            f"ECE:         {_f(s['ece_before'])} before -> {_f(s['ece_after'])} after calibration",
            f"COCO AP50:   {_f(s['coco_stats_before']['AP50'])} default post-processing -> "
            f"{_f(s['coco_stats_after']['AP50'])} tuned (holdout)",
        ]
        g, b = s.get("guarantee"), s.get("baseline")
        if g:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(g["classes"].items()))
            lines.append(f"guarantee:   {g['statement']} Classes: {kinds}.")
        if b:
            lines.append(f"baseline:    one global raw threshold on the same tune images: precision "
                         f"{_f(b['holdout']['precision'])}, recall {_f(b['holdout']['recall'])} "
                         f"(holdout)")
        if self.export is not None:
            lines.append(f"export:      {self.export.summary()}")
        return "\n".join(lines)


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def tune_on(cfg: Config, prep: Prepared, tune_idx: np.ndarray):
    """Calibration fit and search on the images `tune_idx`; returns (calib, found, ppc)."""
    calib = fit_calibration(cfg, prep, tune_idx)
    used = prep.mapping.column_category_ids >= 0
    if calib is not None:
        log.info("calibration: %s fitted on %d images (%d categories shrunk toward the pooled "
                 "fit)", calib.method, len(tune_idx),
                 sum(bool(used[k]) for k in calib.fallback_classes))
    found = search(cfg, prep, calib, tune_idx)
    mapped = [c for c in found.classes if used[c.column]]
    log.info("search: %d categories ok, %d unreachable, %d insufficient data",
             *(sum(c.status == s for c in mapped)
               for s in ("ok", "unreachable", "insufficient_data")))
    ppc = _base_postprocess_config(cfg, prep, **_calibration_fields(calib),
                                   **found.postprocess_fields())
    if not used.all():
        # A column no annotated category maps to cannot be checked: never emit it.
        enabled = np.asarray(ppc.enabled()) & used
        ppc = ppc.replace(class_enabled=tuple(bool(e) for e in enabled))
    return calib, found, ppc


def run_tune(cfg: Config, *, export: bool = True) -> TuneResult:
    """`tfcal tune`: the whole job. See the module docstring.

    With `data.kfold: k`, every image is evaluated once, by parameters tuned on the other
    k - 1 folds; the deployed parameters are then tuned on all images.

    Before any work, output.dir (and export.dir when exporting) must be writable with room
    to spare, and output.dir's lock is taken for the whole run (`tfcal.locks`: a second run on
    the same folder fails at once, naming the holder). The run's files are published together
    as one generation of output.dir (`tfcal.rundir`).
    """
    export = export and cfg.export.enabled
    _check_output_places(cfg, export=export)
    with locks.hold(cfg.output.dir, locks.command_line(), what="output.dir"):
        return _tune(cfg, export=export)


def _tune(cfg: Config, *, export: bool) -> TuneResult:
    from tfcal.tuning import baseline
    from tfcal.tuning.evaluate import HoldoutEvidence, collect_evidence, holdout_report
    from tfcal.tuning.report import write_report
    from tfcal.tuning.split import kfold, split_images

    prep = prepare(cfg)
    presence = _class_presence(prep)
    ids = prep.dataset.image_ids
    if cfg.data.kfold:
        k = cfg.data.kfold
        parts, folds = [], []
        for fold, (fold_tune, fold_eval) in enumerate(kfold(ids, presence, k, cfg.data.seed)):
            log.info("fold %d/%d: tune on %d images, evaluate %d", fold + 1, k, len(fold_tune),
                     len(fold_eval))
            f_idx = np.sort(prep.dataset.image_index(fold_eval))
            f_tune = np.sort(prep.dataset.image_index(fold_tune))
            f_calib, f_found, f_ppc = tune_on(cfg, prep, f_tune)
            parts.append(collect_evidence(cfg, prep, f_ppc, f_calib, f_found.default_nms_iou, f_idx,
                                          baseline.choose(cfg, prep, f_tune)))
            folds.append(sorted(int(i) for i in fold_eval))
        evidence = HoldoutEvidence.concat(parts)
        eval_idx = np.arange(prep.dataset.num_images)
        calib, found, ppc = tune_on(cfg, prep, eval_idx)
        split = {"mode": "kfold", "k": k, "seed": cfg.data.seed,
                 "tune_images": int(len(ids)), "holdout_images": int(len(ids)),
                 "fold_image_ids": folds}
    else:
        tune_ids, holdout_ids = split_images(ids, presence,
                                             holdout_fraction=cfg.data.holdout_fraction,
                                             seed=cfg.data.seed)
        tune_idx = np.sort(prep.dataset.image_index(tune_ids))
        eval_idx = np.sort(prep.dataset.image_index(holdout_ids))
        log.info("split: %d tune images, %d holdout images", len(tune_idx), len(eval_idx))
        calib, found, ppc = tune_on(cfg, prep, tune_idx)
        log.info("final check: the serving post-processing on %d holdout images", len(eval_idx))
        evidence = collect_evidence(cfg, prep, ppc, calib, found.default_nms_iou, eval_idx,
                                    baseline.choose(cfg, prep, tune_idx))
        split = {"mode": "holdout", "holdout_fraction": cfg.data.holdout_fraction,
                 "seed": cfg.data.seed, "tune_images": int(len(tune_idx)),
                 "holdout_images": int(len(eval_idx)),
                 "tune_image_ids": [int(i) for i in ids[tune_idx]],
                 "holdout_image_ids": [int(i) for i in ids[eval_idx]]}
        if _uses_learn_split(cfg, prep, len(tune_idx)):
            learn_idx, cert_idx = learn_split(cfg, prep, tune_idx)
            split.update(learn_images=int(len(learn_idx)), certify_images=int(len(cert_idx)),
                         learn_image_ids=[int(i) for i in ids[learn_idx]])
    ppc = ppc.replace(metadata=_provenance(cfg, prep, found))
    report = holdout_report(cfg, prep, ppc, calib, found, split, eval_idx, evidence)
    run_dir = cfg.output.dir
    ppc = ppc.replace(metadata={**ppc.metadata, "report_summary": _short(report)})
    postprocess_path = run_dir / "postprocess.json"
    with rundir.new_run(run_dir) as generation:  # one commit: the old set or the new one
        ppc.save(generation / "postprocess.json")
        write_report(generation, report, plots=cfg.output.plots)
    exported = None
    if export:
        exported = _export(cfg, ppc, prep)
    return TuneResult(run_dir=run_dir, report=report, postprocess_path=postprocess_path,
                      export=exported)


def _class_presence(prep: Prepared) -> np.ndarray:
    """bool `[I, K]`: image i has a (non-crowd) box of class column k."""
    ds = prep.dataset
    presence = np.zeros((ds.num_images, prep.num_classes), dtype=bool)
    ok = ~ds.ann_iscrowd
    rows = ds.image_index(ds.ann_image_ids[ok]) if ok.any() else np.zeros(0, np.int64)
    cats = ds.ann_category_ids[ok]
    col_of = {int(c): prep.mapping.column_of(int(c)) for c in np.unique(cats)}
    cols = np.array([col_of[int(c)] for c in cats], dtype=np.int64)
    presence[rows, cols] = True
    return presence


def _versions() -> dict[str, str]:
    import tensorflow as tf
    import pycocotools  # noqa: F401 - version of the evaluator
    from importlib.metadata import version

    return {"tfcal": tfcal.__version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, "pycocotools": version("pycocotools"),
            "python": platform.python_version()}


def _provenance(cfg: Config, prep: Prepared, found) -> dict:
    from tfcal.coco.cache import file_sha256

    t = cfg.tuning
    return {
        "config_sha256": cfg.sha256,
        "config_path": str(cfg.source),
        "model_fingerprint": prep.model_fingerprint,
        "data_fingerprint": prep.data_fingerprint,
        "annotations_sha256": file_sha256(prep.dataset.path),
        "target": {"objective": t.objective, "target_precision": t.target_precision,
                   "target_recall": t.target_recall, "confidence": t.confidence,
                   "confidence_budget": t.confidence_budget, "scope": t.scope,
                   "match_iou": t.match_iou},
        "versions": _versions(),
    }


def _short(report: dict) -> dict:
    s = report["summary"]
    return {"holdout": s["holdout"], "ece_before": s["ece_before"], "ece_after": s["ece_after"],
            "coco_AP50_after": s["coco_stats_after"]["AP50"],
            "classes": {c["category_id"]: c["status"] for c in report["classes"]}}


# ----------------------------------------------------------------------------------------------
# Export and evaluate

#: Room asked of output.dir before a run (report, plots and postprocess.json take a few MB).
OUTPUT_ROOM_BYTES = 32 << 20
#: Room asked of export.dir beyond the detector's own size (graph, warmup records).
EXPORT_EXTRA_BYTES = 32 << 20


def _check_output_places(cfg: Config, *, export: bool) -> None:
    """Fails before any work when an output place cannot take the outputs (naming it)."""
    atomic.check_room(cfg.output.dir, OUTPUT_ROOM_BYTES, "output.dir")
    if export:
        atomic.check_room(cfg.export.dir, _export_room(cfg), "export.dir")


def _export_room(cfg: Config) -> int:
    """Bytes an export takes: about the detector's SavedModel, plus the post-processing."""
    size = 0
    if cfg.model.saved_model is not None and Path(cfg.model.saved_model).is_dir():
        size = sum(p.stat().st_size for p in Path(cfg.model.saved_model).rglob("*")
                   if p.is_file())
    return size + EXPORT_EXTRA_BYTES


def check_model_fingerprint(cfg: Config, ppc, ppc_path: Path, *, model_fp: str | None = None,
                            what: str = "model.saved_model") -> None:
    """Refuses a detector other than the one `ppc` was tuned for (TfcalError naming both).

    Compares `model_fp` (default: the fingerprint of the config's `model.saved_model` and keys)
    with ``metadata.model_fingerprint`` of `ppc_path`. Nothing is compared when either side has
    no model to fingerprint (tuned from, or given, precomputed raw outputs without one).
    """
    from tfcal.coco.cache import model_fingerprint

    tuned = str((ppc.metadata or {}).get("model_fingerprint") or "")
    if model_fp is None:
        if cfg.model.saved_model is None or not (Path(cfg.model.saved_model) /
                                                 "saved_model.pb").is_file():
            return
        m = cfg.model
        model_fp = model_fingerprint(m.saved_model,
                                     keys=(m.signature, m.input, m.raw_boxes, m.raw_scores))
        what = f"model.saved_model {m.saved_model}"
    if not tuned or tuned.startswith("raw_outputs:") or not model_fp or \
            model_fp.startswith("raw_outputs:"):
        return
    if model_fp != tuned:
        raise TfcalError(f"{what}: model fingerprint {model_fp[:16]}... differs from the one "
                         f"tuned ({ppc_path} metadata.model_fingerprint {tuned[:16]}...): this "
                         f"is not the detector the thresholds were tuned for; run `tfcal tune` "
                         f"for it, or point the config at the tuned detector")


def _export(cfg: Config, ppc, prep: Prepared | None, *, version=None, overwrite=None,
            postprocess_only: bool = False, source: Path | None = None):
    """Writes the TF Serving package (export.dir/<model_name>/<version>/ + models.config)."""
    from tfcal.export import export_for_serving

    e = cfg.export
    warmup = ()
    if prep is not None and prep.dataset.image_paths:
        warmup = tuple(prep.dataset.image_paths[:1])
    elif cfg.data.images is not None and cfg.data.annotations is not None and \
            not postprocess_only:
        warmup = tuple(load_dataset(cfg).image_paths[:1])
    name = e.model_name
    if postprocess_only and cfg.model.saved_model is not None:
        # Different inputs (raw boxes and scores): never a new version of the image model.
        name = f"{e.model_name}_postprocess"
    try:
        return export_for_serving(
            None if postprocess_only else cfg.model.saved_model, ppc, e.dir, name,
            version=version if version is not None else e.version,
            overwrite=e.overwrite if overwrite is None else overwrite,
            warmup_images=warmup, verify=e.verify, signature_key=cfg.model.signature,
            raw_boxes_key=cfg.model.raw_boxes, raw_scores_key=cfg.model.raw_scores,
            include_raw_outputs=e.include_raw_outputs,
            config_source=source or cfg.output.dir / "postprocess.json")
    except FileExistsError as err:
        where = str(err).split(";")[0]  # "<version dir> already exists"
        raise TfcalError(f"{cfg.source}: export.version (or --version): {where}; pass "
                         "--overwrite (or set export.overwrite: true) to replace it, or leave "
                         "the version out to write the next one") from None


def run_export(cfg: Config, *, version: int | None = None, overwrite: bool = False,
               postprocess_only: bool = False):
    """`tfcal export`: exports `<output.dir>/postprocess.json` with the config's detector."""
    from tfcal.postprocess import PostProcessConfig

    from tfcal import rundir

    path = rundir.current_run(cfg.output.dir) / "postprocess.json"
    if not path.exists():
        raise TfcalError(f"{cfg.output.dir / 'postprocess.json'}: missing; run "
                         f"`tfcal tune {cfg.source}` first")
    ppc = PostProcessConfig.load(path)
    if cfg.model.saved_model is None and not postprocess_only:
        raise TfcalError(f"{cfg.source}: model.saved_model: needed to export a detector "
                         "(or pass --postprocess-only)")
    if not postprocess_only:
        check_model_fingerprint(cfg, ppc, path)
    atomic.check_room(cfg.export.dir, _export_room(cfg), "export.dir")
    return _export(cfg, ppc, None, version=version, overwrite=overwrite or None,
                   postprocess_only=postprocess_only, source=path)


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """What `tfcal evaluate` measured."""

    report: dict
    out: Path | None

    def summary(self) -> str:
        s = self.report["coco_stats"]
        head = "  ".join(f"{k} {s[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR_100"))
        where = f"\nreport: {self.out}" if self.out else ""
        return f"{head}{where}"


def run_evaluate(annotations: Path, detections: Path, *, match_iou: float = 0.5,
                 out: Path | None = None) -> EvaluateResult:
    """`tfcal evaluate`: COCO stats and per-class TP/FP/FN of a COCO results file."""
    from tfcal.coco.evaluation import evaluate_detections_file

    if not 0.0 < match_iou < 1.0:
        raise TfcalError(f"--match-iou: must be in (0, 1), got {match_iou}")
    report = evaluate_detections_file(annotations, detections, match_iou=match_iou)
    if out is not None:
        atomic.write_json(out, report)
    return EvaluateResult(report=report, out=out)


def jsonable(obj: Any) -> Any:
    """NumPy scalars/arrays and NaN -> plain JSON values (NaN becomes None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if not math.isfinite(v) else v
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
