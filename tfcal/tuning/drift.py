"""`tfcal drift`: re-measure calibration and per-class precision on newly labelled data.

The deployed post-processing (`<output.dir>/postprocess.json`) runs on the new images' raw
outputs: the config's model run on `--images`, or precomputed outputs given with
`--raw-outputs` (else the config's `model.raw_outputs`, which must then hold the new images). Two things are compared with the tuning report:

- ECE of the calibrated detection scores (every detection at the report's default NMS IoU,
  no threshold), against the report's holdout `ece_after`: drift when it rose by more than
  `drift.ece_tolerance`.
- Each enabled class's precision at its deployed threshold, against the report's holdout
  precision: drift when it fell by more than `drift.precision_tolerance`. Classes with fewer
  than `drift.min_support` new detections are listed as `low_support`, not judged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tfcal import TfcalError, atomic
from tfcal.config import Config
from tfcal.tuning import pipeline as pl


@dataclasses.dataclass(frozen=True)
class DriftResult:
    """The comparison; `ok` is False when anything is outside tolerance."""

    ok: bool
    report: dict
    out: Path

    def summary(self) -> str:
        r = self.report
        lines = [f"drift: {'OK' if self.ok else 'DRIFT DETECTED'} ({self.out})",
                 f"ECE: {_f(r['ece_report'])} in the tuning report, {_f(r['ece_new'])} now "
                 f"(tolerance +{r['tolerances']['ece']})"]
        lines += [f"  {x}" for x in r["failures"]]
        return "\n".join(lines)


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def run_drift(cfg: Config, annotations: Path, images: Path | None = None, *,
              raw_outputs: Path | None = None, out: Path | None = None) -> DriftResult:
    """Runs the drift check; writes drift.json atomically. See the module docstring.

    Args:
      cfg: the config used by `tfcal tune`.
      annotations: the new COCO instances JSON.
      images: the new images' directory; needed to run `model.saved_model` on them.
      raw_outputs: precomputed raw outputs (npz or cache folder) of the new images, used instead
        of the config's model.
      out: where drift.json goes (default `<output.dir>/drift.json`).
    """
    from tfcal.metrics import expected_calibration_error
    from tfcal.postprocess import PostProcessConfig
    from tfcal.tuning.report import load_report

    run_dir = cfg.output.dir
    ppc_path = run_dir / "postprocess.json"
    if not ppc_path.exists():
        raise TfcalError(f"{ppc_path}: missing; run `tfcal tune {cfg.source}` first")
    ppc = PostProcessConfig.load(ppc_path)
    report = load_report(run_dir / "report.json")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, subgroups=()))
    if raw_outputs is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, saved_model=None, raw_outputs=Path(raw_outputs)))
    elif cfg.model.saved_model is not None and images is None:
        raise TfcalError(f"{annotations}: --images: the new images are needed to run "
                         f"{cfg.model.saved_model} (or give --raw-outputs)")
    prep = pl.prepare(cfg, annotations=annotations, images=images,
                      cache_dir=cfg.model.cache_dir or run_dir / "cache")
    if prep.num_classes != ppc.num_classes:
        raise TfcalError(f"{ppc_path}: num_classes: {ppc.num_classes} does not match the "
                         f"detector's {prep.num_classes} class columns")
    every = np.arange(prep.dataset.num_images)

    default_iou = report["target"].get("default_nms_iou") or ppc.nms_iou[0]
    all_dets = dataclasses.replace(ppc, min_score_thresh=(pl.ODAPI_DEFAULT_SCORE_THRESH,),
                                   nms_iou=(float(default_iou),), class_enabled=())
    dets = pl.postprocess_images(all_dets, prep.raw, every)
    m, _, _ = pl.match(prep, dets, every, cfg)
    from tfcal.tuning.evaluate import ECE_MIN_SCORE

    keep = ~m.ignored & (m.score >= ECE_MIN_SCORE)  # the report's ECE definition
    ece_new = (float(expected_calibration_error(m.score[keep], m.tp[keep].astype(np.int64)))
               if keep.any() else None)

    final = pl.postprocess_images(ppc, prep.raw, every)
    fm, fcols, num_gt = pl.match(prep, final, every, cfg)
    d = cfg.drift
    ece_report = report["summary"].get("ece_after")
    failures = []
    if ece_new is not None and ece_report is not None and ece_new > ece_report + d.ece_tolerance:
        failures.append(f"ECE rose from {ece_report:.3f} to {ece_new:.3f} "
                        f"(> +{d.ece_tolerance})")
    classes = []
    for c in report["classes"]:
        if not c.get("enabled", True):
            continue
        col = c["column"]
        sel = fcols == col
        tp, fp = int(fm.tp[sel].sum()), int(fm.fp[sel].sum())
        before = c["holdout"].get("precision")
        if before is None:
            before = c["tune"].get("precision")
        now = tp / (tp + fp) if tp + fp else None
        if tp + fp < d.min_support or before is None:
            status = "low_support"
        elif now < before - d.precision_tolerance:
            status = "drift"
            failures.append(f"{c['name']}: precision {before:.3f} -> {now:.3f} "
                            f"(> -{d.precision_tolerance}, {tp + fp} detections)")
        else:
            status = "ok"
        classes.append({"category_id": c["category_id"], "name": c["name"],
                        "threshold": c["threshold"], "precision_report": before,
                        "precision_new": now, "tp": tp, "fp": fp,
                        "fn": int(num_gt[col] - tp), "status": status})
    result = {
        "ok": not failures, "failures": failures,
        "ece_report": ece_report, "ece_new": ece_new,
        "tolerances": {"ece": d.ece_tolerance, "precision": d.precision_tolerance,
                       "min_support": d.min_support},
        "annotations": str(annotations), "images": int(prep.dataset.num_images),
        "raw_outputs": prep.model_fingerprint,
        "classes": classes,
    }
    out = out or run_dir / "drift.json"
    atomic.write_json(out, pl.jsonable(result))
    return DriftResult(ok=not failures, report=result, out=out)


__all__ = ["DriftResult", "run_drift"]
