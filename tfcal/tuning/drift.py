"""`tfcal drift`: re-measure calibration and per-class precision on newly labelled data.

The deployed post-processing (the current run of `output.dir`, see `tfcal.rundir`) runs on the
new images' raw outputs: the config's model run on `--images`, or precomputed outputs given
with `--raw-outputs` (else the config's `model.raw_outputs`, which must then hold the new
images). The detector must be the one tuned: its fingerprint is compared with
``metadata.model_fingerprint`` of postprocess.json first (a different one is refused, exit 2).
Then, against the tuning report:

- ECE of the calibrated detection scores (every detection at the report's default NMS IoU,
  no threshold), against the report's holdout `ece_after`: drift when it rose by more than
  `drift.ece_tolerance`.
- LaECE_0 and LaACE_0 of the same detections (`tfcal.tuning.localization.localization_drift`),
  against the report's `summary.localization.after`: drift when either rose by more than
  `drift.ece_tolerance` (reports without them are not checked).
- Each enabled class's precision at its deployed threshold, judged by two one-sided exact
  tests, each needing `drift.min_support` detections on both sides it compares:

  - against the target (classes that met it when tuned, objective ``precision_target``): an
    exact binomial test of H0 "new precision >= target", p = P(X <= TP | n = TP + FP,
    target) (`scipy.stats.binomtest`, ``alternative="less"``);
  - against the reference, the report's holdout counts: Fisher's exact test of H0 "new
    precision >= holdout precision" on the 2 x 2 table [[TP_new, FP_new], [TP_ref, FP_ref]]
    (`scipy.stats.fisher_exact`, ``alternative="less"``), counted only when the point
    estimate also fell by more than `drift.precision_tolerance`.

  The p-values of every test run are adjusted together (Holm, `drift.multiple_testing`), so
  with nothing drifted the chance that any class is flagged stays at most
  `drift.significance`. A class is `drift` when an adjusted p-value is below
  `drift.significance`, `low_support` when no test had the support, `ok` otherwise.

Each run writes a new file, ``<output.dir>/drift/drift-<UTC time>.json`` (or `--out`), and
never replaces an earlier one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, fisher_exact

from tfcal import TfcalError, atomic, rundir
from tfcal.config import Config
from tfcal.metrics import expected_calibration_error
from tfcal.postprocess import PostProcessConfig
from tfcal.tuning.detections import ODAPI_DEFAULT_SCORE_THRESH, match, postprocess_images
from tfcal.objective_kinds import KINDS
from tfcal.tuning.holdout import ECE_MIN_SCORE
from tfcal.tuning.localization import localization_drift
from tfcal.tuning.prepare import check_model_fingerprint, prepare
from tfcal.tuning.report import jsonable, load_report

DRIFT_FOLDER = "drift"


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
        loc = r.get("localization")
        if loc:
            lines.append(f"LaECE_0: {_f(loc['la_ece_0_report'])} in the tuning report, "
                         f"{_f(loc['la_ece_0_new'])} now; LaACE_0: "
                         f"{_f(loc['la_ace_0_report'])} -> {_f(loc['la_ace_0_new'])}")
        lines += [f"  {x}" for x in r["failures"]]
        return "\n".join(lines)


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def binomial_p_below(tp: int, n: int, target: float) -> float:
    """One-sided exact p-value of H0 "precision >= target" given `tp` of `n`: P(X <= tp)."""
    return float(binomtest(int(tp), int(n), float(target), alternative="less").pvalue)


def fisher_p_below(tp_new: int, fp_new: int, tp_ref: int, fp_ref: int) -> float:
    """One-sided Fisher exact p-value of H0 "new precision >= reference precision"."""
    table = [[int(tp_new), int(fp_new)], [int(tp_ref), int(fp_ref)]]
    return float(fisher_exact(table, alternative="less").pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control), in the input order."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def judge_classes(classes: list[dict], *, significance: float, min_support: int,
                  precision_tolerance: float, multiple_testing: str = "holm") -> list[str]:
    """Runs the tests on `classes` (each with ``tp``, ``fp``, ``tp_report``, ``fp_report``,
    ``target`` (or None), ``name``), filling ``p_target``, ``p_reference``, their adjusted
    values and ``status`` in place; returns the failure messages."""
    tests = []  # (class index, kind, p)
    for i, c in enumerate(classes):
        n_new = c["tp"] + c["fp"]
        c.update(p_target=None, p_reference=None, p_target_adjusted=None,
                 p_reference_adjusted=None)
        if n_new < min_support:
            continue
        if c["target"] is not None:
            c["p_target"] = binomial_p_below(c["tp"], n_new, c["target"])
            tests.append((i, "target", c["p_target"]))
        n_ref = (c["tp_report"] or 0) + (c["fp_report"] or 0)
        if c["tp_report"] is not None and n_ref >= min_support:
            c["p_reference"] = fisher_p_below(c["tp"], c["fp"], c["tp_report"], c["fp_report"])
            tests.append((i, "reference", c["p_reference"]))
    ps = [p for _, _, p in tests]
    adjusted = holm(ps) if multiple_testing == "holm" else ps
    for (i, kind, _), q in zip(tests, adjusted):
        classes[i][f"p_{kind}_adjusted"] = q
    failures = []
    for c in classes:
        if c["p_target"] is None and c["p_reference"] is None:
            c["status"] = "low_support"
            continue
        c["status"] = "ok"
        now = c["tp"] / (c["tp"] + c["fp"])
        n = c["tp"] + c["fp"]
        if c["p_target_adjusted"] is not None and c["p_target_adjusted"] < significance:
            c["status"] = "drift"
            failures.append(f"{c['name']}: precision {now:.3f} on {n} detections is below its "
                            f"target {c['target']} (exact binomial p {c['p_target']:.2g}, "
                            f"adjusted {c['p_target_adjusted']:.2g} < {significance})")
        if c["p_reference_adjusted"] is not None and c["p_reference_adjusted"] < significance:
            before = c["tp_report"] / (c["tp_report"] + c["fp_report"])
            if before - now > precision_tolerance:
                c["status"] = "drift"
                failures.append(
                    f"{c['name']}: precision {before:.3f} -> {now:.3f} ({c['tp_report']} TP, "
                    f"{c['fp_report']} FP in the report; {c['tp']} TP, {c['fp']} FP now; "
                    f"Fisher p {c['p_reference']:.2g}, adjusted "
                    f"{c['p_reference_adjusted']:.2g} < {significance}; drop > "
                    f"{precision_tolerance})")
    return failures


def _reference(report: dict, report_path: Path) -> list[dict]:
    """The judged classes of the tuning report: name, column, target and holdout counts."""
    try:
        target = report["target"]
        out = []
        for c in report["classes"]:
            if not c.get("enabled", True):
                continue
            h = c.get("holdout") or {}
            tp, fp = h.get("tp"), h.get("fp")
            objective = c.get("objective", target.get("objective"))
            goal = None
            kind = KINDS.get(objective)
            if kind is not None and kind.metric == "precision" and c.get("status") == "ok":
                goal = float(c.get("target_precision", target["target_precision"]))
            out.append({"category_id": int(c["category_id"]), "name": str(c["name"]),
                        "column": int(c["column"]), "threshold": c["threshold"],
                        "target": goal,
                        "tp_report": None if tp is None else int(tp),
                        "fp_report": None if fp is None else int(fp)})
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TfcalError(f"{report_path}: classes: not as tfcal writes them "
                         f"({type(e).__name__}: {e})") from None


def _new_path(folder: Path) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"drift-{stamp}.json"


def _write_new(result: dict, out: Path | None, run_dir: Path) -> Path:
    """Writes `result` to a new file (never replacing one): `out` if it is a file name, else
    ``drift-<UTC time>[-<n>].json`` in `out` (a folder) or ``<run_dir>/drift/``."""
    if out is not None and not (out.is_dir() or str(out).endswith(("/", "\\"))):
        try:
            return atomic.write_json_new(out, result)
        except FileExistsError:
            raise TfcalError(f"--out {out}: already exists; drift results are never replaced "
                             "(give a new file name, or a folder)") from None
    folder = out if out is not None else run_dir / DRIFT_FOLDER
    first = _new_path(folder)
    for n in range(1, 10_000):
        path = first if n == 1 else first.with_name(f"{first.stem}-{n}.json")
        try:
            return atomic.write_json_new(path, result)
        except FileExistsError:
            continue
    raise TfcalError(f"{folder}: too many drift files for {first.stem}")  # pragma: no cover


def run_drift(cfg: Config, annotations: Path, images: Path | None = None, *,
              raw_outputs: Path | None = None, out: Path | None = None) -> DriftResult:
    """Runs the drift check; writes its result to a new JSON file. See the module docstring.

    Args:
      cfg: the config used by `tfcal tune`.
      annotations: the new COCO instances JSON.
      images: the new images' directory; needed to run `model.saved_model` on them.
      raw_outputs: precomputed raw outputs (npz or cache folder) of the new images, used instead
        of the config's model.
      out: a new file to write, or a folder for ``drift-<UTC time>.json`` (default
        `<output.dir>/drift/`).
    """
    run_dir = cfg.output.dir
    run = rundir.current_run(run_dir)  # postprocess.json and report.json of one run
    ppc_path = run / "postprocess.json"
    if not ppc_path.exists():
        raise TfcalError(f"{run_dir / 'postprocess.json'}: missing; run `tfcal tune "
                         f"{cfg.source}` first")
    ppc = PostProcessConfig.load(ppc_path)
    report = load_report(run / "report.json")
    reference = _reference(report, run / "report.json")
    if out is not None and out.exists() and not out.is_dir():
        raise TfcalError(f"--out {out}: already exists; drift results are never replaced "
                         "(give a new file name, or a folder)")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, subgroups=()))
    if raw_outputs is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, saved_model=None, path=None, raw_outputs=Path(raw_outputs)))
    elif cfg.model.detector_path is not None and images is None:
        raise TfcalError(f"{annotations}: --images: the new images are needed to run "
                         f"{cfg.model.detector_path} (or give --raw-outputs)")
    check_model_fingerprint(cfg, ppc, ppc_path)  # before running the model
    prep = prepare(cfg, annotations=annotations, images=images,
                   cache_dir=cfg.model.cache_dir or run_dir / "cache")
    check_model_fingerprint(cfg, ppc, ppc_path, model_fp=prep.raw.model_fingerprint,
                            what=f"--raw-outputs {raw_outputs}" if raw_outputs is not None
                            else f"model {cfg.model.detector_path or cfg.model.raw_outputs}")
    if prep.num_classes != ppc.num_classes:
        raise TfcalError(f"{ppc_path}: num_classes: {ppc.num_classes} does not match the "
                         f"detector's {prep.num_classes} class columns")
    every = np.arange(prep.dataset.num_images)

    default_iou = report["target"].get("default_nms_iou") or ppc.nms_iou[0]
    all_dets = dataclasses.replace(ppc, min_score_thresh=(ODAPI_DEFAULT_SCORE_THRESH,),
                                   nms_iou=(float(default_iou),), class_enabled=())
    dets = postprocess_images(all_dets, prep.raw, every)
    m, _, _ = match(prep, dets, every, cfg)

    keep = ~m.ignored & (m.score >= ECE_MIN_SCORE)  # the report's ECE definition
    ece_new = (float(expected_calibration_error(m.score[keep], m.tp[keep].astype(np.int64)))
               if keep.any() else None)

    final = postprocess_images(ppc, prep.raw, every)
    fm, fcols, num_gt = match(prep, final, every, cfg)
    d = cfg.drift
    ece_report = report["summary"].get("ece_after")
    failures = []
    if ece_new is not None and ece_report is not None and ece_new > ece_report + d.ece_tolerance:
        failures.append(f"ECE rose from {ece_report:.3f} to {ece_new:.3f} "
                        f"(> +{d.ece_tolerance})")
    localization = localization_drift(prep, dets, every, report, tolerance=d.ece_tolerance,
                                      min_score=ECE_MIN_SCORE,
                                      max_dets=cfg.tuning.max_total_detections)
    failures += localization.pop("failures")
    classes = []
    for c in reference:
        if not 0 <= c["column"] < prep.num_classes:
            raise TfcalError(f"{run / 'report.json'}: classes[{c['name']}].column: "
                             f"{c['column']} is not a class column of the detector")
        sel = fcols == c["column"]
        tp, fp = int(fm.tp[sel].sum()), int(fm.fp[sel].sum())
        classes.append({**c, "tp": tp, "fp": fp, "fn": int(num_gt[c["column"]] - tp),
                        "precision_new": tp / (tp + fp) if tp + fp else None,
                        "precision_report": (c["tp_report"] / (c["tp_report"] + c["fp_report"])
                                             if c["tp_report"] else
                                             (0.0 if c["fp_report"] else None))})
    failures += judge_classes(classes, significance=d.significance, min_support=d.min_support,
                              precision_tolerance=d.precision_tolerance,
                              multiple_testing=d.multiple_testing)
    result = {
        "ok": not failures, "failures": failures,
        "ece_report": ece_report, "ece_new": ece_new,
        "localization": localization,
        "tolerances": {"ece": d.ece_tolerance, "precision": d.precision_tolerance,
                       "min_support": d.min_support, "significance": d.significance,
                       "multiple_testing": d.multiple_testing},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "postprocess": str(ppc_path),
        "model_fingerprint": prep.model_fingerprint,
        "annotations": str(annotations), "images": int(prep.dataset.num_images),
        "raw_outputs": prep.model_fingerprint,
        "classes": classes,
    }
    path = _write_new(jsonable(result), out, run_dir)
    return DriftResult(ok=not failures, report=result, out=path)


__all__ = ["DriftResult", "run_drift", "binomial_p_below", "fisher_p_below", "holm",
           "judge_classes"]
