"""The tuning job end to end, and the `tfcal tune` / `tfcal export` commands: it orders the
steps that the other modules own; nothing in tfcal but the command line imports it.

Data flows one way: `prepare` (validated data, raw outputs, cached) -> `calibrate` (fit on
the tune split) -> `search` (per-class thresholds and NMS IoU) -> `evaluate` (every reported
number, on images that took no part in tuning) -> report and postprocess.json (one generation
of output.dir) -> export. The detector runs once (its raw, pre-NMS outputs are cached); images
are split into a tune part and a holdout part (or k folds). The final check runs the exact
serving `PostProcessor` on the cached raw outputs of the holdout images and evaluates it with
pycocotools.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

import tfcal
from tfcal import TfcalError, atomic, locks, rundir
from tfcal.config import Config
from tfcal.detectors import describe, servable
from tfcal.export import (ExportOptions, ModelOptions, TFLiteVerifyInputs, export_handoff,
                          export_tflite_handoff)
from tfcal.handoff import DETECTOR_FILE, POSTPROCESS_FILE, DetectorDescription
from tfcal.postprocess import PostProcessConfig
from tfcal.raw import file_sha256
from tfcal.tuning import baseline, report as report_lib
from tfcal.tuning.holdout import HoldoutEvidence, collect_evidence, holdout_report
from tfcal.tuning.prepare import Prepared, prepare
from tfcal.tuning.split import kfold, split_images
from tfcal.tuning.tune import tune_on

log = logging.getLogger(__name__)


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
        cmp = s.get("comparison") or {}
        lines = [f"verdict:     {cmp['line']}"] if cmp.get("line") else []
        lines += [
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
    prep = prepare(cfg)
    presence = prep.class_presence()
    ids = prep.dataset.image_ids
    if cfg.data.kfold:
        k = cfg.data.kfold
        parts, folds = [], []
        for fold, (fold_tune, fold_eval) in enumerate(kfold(ids, presence, k, cfg.data.seed)):
            log.info("fold %d/%d: tune on %d images, evaluate %d", fold + 1, k, len(fold_tune),
                     len(fold_eval))
            f_idx = np.sort(prep.dataset.image_index(fold_eval))
            f_tune = np.sort(prep.dataset.image_index(fold_tune))
            f = tune_on(cfg, prep, f_tune)
            parts.append(collect_evidence(cfg, prep, f.ppc, f.calib, f.found.default_nms_iou,
                                          f_idx, baseline.choose(cfg, prep, f_tune)))
            folds.append(sorted(int(i) for i in fold_eval))
        evidence = HoldoutEvidence.concat(parts)
        eval_idx = np.arange(prep.dataset.num_images)
        tuned = tune_on(cfg, prep, eval_idx)
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
        tuned = tune_on(cfg, prep, tune_idx)
        log.info("final check: the serving post-processing on %d holdout images", len(eval_idx))
        evidence = collect_evidence(cfg, prep, tuned.ppc, tuned.calib,
                                    tuned.found.default_nms_iou, eval_idx,
                                    baseline.choose(cfg, prep, tune_idx))
        split = {"mode": "holdout", "holdout_fraction": cfg.data.holdout_fraction,
                 "seed": cfg.data.seed, "tune_images": int(len(tune_idx)),
                 "holdout_images": int(len(eval_idx)),
                 "tune_image_ids": [int(i) for i in ids[tune_idx]],
                 "holdout_image_ids": [int(i) for i in ids[eval_idx]]}
        if tuned.parts.learn is not None:
            split.update(learn_images=int(len(tuned.parts.learn)),
                         certify_images=int(len(tuned.parts.certify)),
                         learn_image_ids=[int(i) for i in ids[tuned.parts.learn]])
    calib, found = tuned.calib, tuned.found
    ppc = tuned.ppc.replace(metadata=_provenance(cfg, prep, found))
    report = holdout_report(cfg, prep, ppc, calib, found, split, eval_idx, evidence)
    run_dir = cfg.output.dir
    ppc = ppc.replace(metadata={**ppc.metadata, "report_summary": _short(report)})
    postprocess_path = run_dir / POSTPROCESS_FILE
    detector = describe_detector(cfg, prep)
    with rundir.new_run(run_dir) as generation:  # one commit: the old set or the new one
        ppc.save(generation / POSTPROCESS_FILE)
        detector.save(generation / DETECTOR_FILE)
        report_lib.write_report(generation, report, plots=cfg.output.plots)
    exported = None
    if export:
        exported = _export(cfg, ppc, detector, _export_options(cfg, detector),
                           source=postprocess_path)
        if cfg.export.tflite:
            final_idx = eval_idx if cfg.data.kfold else tune_idx  # the final fit's images
            exported = _Exports((exported, _export_tflite(cfg, ppc, detector, prep=prep,
                                                          tune_idx=final_idx)))
    return TuneResult(run_dir=run_dir, report=report, postprocess_path=postprocess_path,
                      export=exported)




def _versions() -> dict[str, str]:
    return {"tfcal": tfcal.__version__, "tensorflow": tf.__version__,
            "numpy": np.__version__, "pycocotools": package_version("pycocotools"),
            "python": platform.python_version()}


def _provenance(cfg: Config, prep: Prepared, found) -> dict:
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
# Output places and the export

#: Room asked of output.dir before a run (report, plots and postprocess.json take a few MB).
OUTPUT_ROOM_BYTES = 32 << 20
#: Room asked of export.dir beyond the detector's own size (graph, warmup records).
EXPORT_EXTRA_BYTES = 32 << 20


def _check_output_places(cfg: Config, *, export: bool) -> None:
    """Fails before any work when an output place cannot take the outputs (naming it)."""
    atomic.check_room(cfg.output.dir, OUTPUT_ROOM_BYTES, "output.dir")
    if export:
        atomic.check_room(cfg.export.dir, _export_room(cfg.model.detector_path), "export.dir")


def _export_room(saved_model) -> int:
    """Bytes an export takes: about the detector's model, plus the post-processing."""
    size = 0
    if saved_model is not None and Path(saved_model).is_dir():
        size = sum(p.stat().st_size for p in Path(saved_model).rglob("*") if p.is_file())
    elif saved_model is not None and Path(saved_model).is_file():
        size = Path(saved_model).stat().st_size
    return size + EXPORT_EXTRA_BYTES


def describe_detector(cfg: Config, prep: Prepared) -> DetectorDescription:
    """The detector record `tfcal tune` hands to the export beside postprocess.json."""
    m = cfg.model
    paths = prep.dataset.image_paths
    return dataclasses.replace(
        describe(m),
        input_dtype="uint8" if m.detector_path is not None else None,  # what the runner runs
        category_ids=tuple(int(c) for c in prep.mapping.column_category_ids),
        model_fingerprint=prep.model_fingerprint,
        warmup_image=str(Path(paths[0]).resolve()) if paths else None)


def _config_detector(cfg: Config, ppc: PostProcessConfig) -> DetectorDescription:
    """The config's model section as a detector record, for a run folder without one (tuned
    by an older tfcal, or from precomputed raw outputs): no warmup image."""
    return dataclasses.replace(
        describe(cfg.model), score_converter=ppc.score_converter,
        background_column=ppc.background_column, label_offset=ppc.label_offset,
        category_ids=tuple(ppc.class_ids))


def _export_options(cfg: Config, detector: DetectorDescription | None, *, version=None,
                    overwrite=None, postprocess_only: bool = False) -> ExportOptions:
    e = cfg.export
    name = e.model_name
    if postprocess_only or detector is None or not servable(detector):
        # Different inputs (raw boxes and scores): never a new version of the image model.
        name = f"{e.model_name}_postprocess"
    return ExportOptions(export_root=e.dir, model_name=name,
                         version=version if version is not None else e.version,
                         overwrite=e.overwrite if overwrite is None else overwrite,
                         verify=e.verify,
                         model=ModelOptions(include_raw_outputs=e.include_raw_outputs,
                                            extra_outputs=e.extra_outputs,
                                            input_type=e.input_type))


def _export(cfg: Config, ppc: PostProcessConfig, detector: DetectorDescription,
            options: ExportOptions, *, postprocess_only: bool = False, source: Path):
    """Writes the TF Serving package (export.dir/<model_name>/<version>/ + models.config)."""
    try:
        served = None if postprocess_only or not servable(detector) else detector
        if served is None and not postprocess_only:
            log.info("%s: the detector cannot be baked into a SavedModel; exporting the "
                     "post-processing alone as %s", detector.saved_model or "raw outputs",
                     options.model_name)
        return export_handoff(ppc, served, options, config_source=source,
                              category_ids=detector.category_ids or None)
    except FileExistsError as err:
        where = str(err).split(";")[0]  # "<version dir> already exists"
        raise TfcalError(f"{cfg.source}: export.version (or --version): {where}; pass "
                         "--overwrite (or set export.overwrite: true) to replace it, or leave "
                         "the version out to write the next one") from None


def run_export(cfg: Config, *, version: int | None = None, overwrite: bool = False,
               postprocess_only: bool = False, formats: tuple[str, ...] | None = None):
    """`tfcal export`: exports the current run's two handoff records.

    Reads `<output.dir>/postprocess.json` and `<output.dir>/detector.json` (the detector
    `tfcal tune` described; for a run folder without one, or tuned from precomputed raw
    outputs, the config's model section) and nothing of the data section or the data set.
    `formats`: any of "saved_model", "tflite"; default the SavedModel, plus TFLite when
    `export.tflite` is set. The TFLite export is verified on seeded inputs here (no data set).
    """
    formats = formats or ("saved_model",) + (("tflite",) if cfg.export.tflite else ())
    run = rundir.current_run(cfg.output.dir)
    path = run / POSTPROCESS_FILE
    if not path.exists():
        raise TfcalError(f"{cfg.output.dir / POSTPROCESS_FILE}: missing; run "
                         f"`tfcal tune {cfg.source}` first")
    ppc = PostProcessConfig.load(path)
    detector = None
    if (run / DETECTOR_FILE).is_file():
        detector = DetectorDescription.load(run / DETECTOR_FILE)
    if detector is None or detector.saved_model is None:
        detector = _config_detector(cfg, ppc)
    lite = None
    if "tflite" in formats:
        lite = _export_tflite(cfg, ppc, detector, overwrite=overwrite)
        if "saved_model" not in formats:
            return lite
    if detector.saved_model is None and not postprocess_only:
        key = "saved_model" if cfg.model.format == "odapi" else "path"
        raise TfcalError(f"{cfg.source}: model.{key}: needed to export a detector "
                         "(or pass --postprocess-only)")
    options = _export_options(cfg, detector, version=version, overwrite=overwrite or None,
                              postprocess_only=postprocess_only)
    atomic.check_room(cfg.export.dir, _export_room(detector.saved_model), "export.dir")
    served = _export(cfg, ppc, detector, options, postprocess_only=postprocess_only, source=path)
    return served if lite is None else _Exports((served, lite))


#: Tune images the TFLite export is verified on (their cached raw outputs).
TFLITE_VERIFY_IMAGES = 32


@dataclasses.dataclass(frozen=True)
class _Exports:
    """Several exports of one run, summarized together."""

    parts: tuple

    def summary(self) -> str:
        return "\n".join(p.summary() for p in self.parts)


def _export_tflite(cfg: Config, ppc: PostProcessConfig, detector: DetectorDescription, *,
                   prep: Prepared | None = None, tune_idx=None, overwrite: bool = False):
    """The on-device export (`tfcal.export.tflite`), verified on up to TFLITE_VERIFY_IMAGES
    tune images' cached raw outputs when the run has them, else on seeded inputs."""
    inputs, names = None, None
    if prep is not None and tune_idx is not None and len(tune_idx):
        rows = np.asarray(tune_idx)[:TFLITE_VERIFY_IMAGES]
        boxes, scores = prep.raw.boxes[rows], prep.raw.scores[rows]
        inputs = TFLiteVerifyInputs([(boxes[i:i + 1], scores[i:i + 1]) for i in range(len(rows))],
                                    "tune images' cached raw outputs")
        names = dict(zip((int(i) for i in prep.dataset.category_ids),
                         prep.dataset.category_names))
    return export_tflite_handoff(ppc, detector, cfg.export.dir, cfg.export.model_name,
                                 raw_inputs=inputs, category_names=names,
                                 overwrite=overwrite or cfg.export.overwrite)
