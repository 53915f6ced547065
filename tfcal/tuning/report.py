"""The tuning report: report.json's schema, report.md rendering, and the plots/ folder.

`report.json` is the record; `report.md` and `plots/` are views of it and can be rebuilt with
`tfcal report RUN_DIR`. Schema (every number measured on the holdout images unless the key
says `tune`):

- `classes`: one entry per category: `category_id`, `name`, `column`, `status`
  (`ok` | `unreachable` | `insufficient_data` | `pooled` | `disabled`), `threshold`
  (`min_score_thresh`, calibrated probability), `nms_iou`, `calibration` (the fitted
  parameters: `temperature`, or `a`/`b`, or isotonic `knots`), `temperature` when the method
  is temperature, `tune: {tp, fp, fn, precision, recall}`, and
  `guarantee: {kind, test_level, p_value, boxes_to_certify, boxes_available}` (`kind`: `certified` |
  `estimate` | `pooled` | `none`; `boxes_to_certify`: estimated labelled boxes an uncertified
  class would need), and
  `holdout: {tp, fp, fn, precision, precision_lower, precision_upper, recall, meets_target,
  clearly_below}` (`meets_target`: the held-out point estimate; `clearly_below`: >= 20
  detections and the 95% interval under the target).
- `summary`: `coco_stats_before` / `coco_stats_after` (12 COCO stats keyed `AP` ... `AR_large`),
  `ece_before` / `ece_after`, `brier_before` / `brier_after`, holdout totals, `guarantee`
  (the promise in words: `statement`, `confidence`, `budget`, `scope`, classes per kind), and
  `baseline` (one global raw-score threshold chosen on the same tune images: its thresholds,
  held-out precision/recall, emitted and clearly-below classes beside tfcal's, and
  `same_precision`: the recall one raw threshold reaches at tfcal's held-out precision).
- `summary.localization`: `tfcal.tuning.localization`: `before` / `after` calibration, each
  `la_ece_0`, `la_ace_0`, per-class `classes`, `d_ece` (`score`, `score_x_size`,
  `score_x_position`) and `reliability_by_size` (COCO small / medium / large curves).
- `split`: how images were split, with `tune_image_ids` / `holdout_image_ids` (k-fold:
  `fold_image_ids`, the evaluated images of each fold).
- `subgroups`: per image-level field value: images, TP/FP/FN, precision with its bounds, recall,
  ECE, and `below_target`.
- `provenance`: config hash, model and data fingerprints, package versions.
- `curves`: compact per-class precision/recall curves and the IoU-grid trade-off, for plots.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tfcal import TfcalError, atomic, locks, rundir
from tfcal import plots as plot_lib
from tfcal.objective_kinds import KINDS
from tfcal.tuning.localization_text import markdown_lines

log = logging.getLogger(__name__)

STAT_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _interval(h: dict) -> str:
    lo, hi = h.get("precision_lower"), h.get("precision_upper")
    if lo is None or hi is None:
        return "–"
    return f"[{lo:.3f}, {hi:.3f}]"


def render_markdown(report: dict) -> str:
    """Renders the readable summary of a report dict (as written to report.json)."""
    s = report["summary"]
    t = report["target"]
    lines = ["# tfcal tuning report", ""]
    cmp = s.get("comparison") or {}
    b = s.get("baseline")
    if cmp.get("line"):
        lines += [f"**{cmp['line']}.**", ""]
    if b:
        bh, same = b["holdout"], b["same_precision"]
        lines += [
            "| on the holdout images | precision | recall | emitted classes | clearly below "
            "target |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| tfcal | {_fmt(s['holdout']['precision'])} | {_fmt(s['holdout']['recall'])} | "
            f"{b['tfcal_emitted_classes']} | {b['tfcal_clearly_below_classes']} |",
            f"| one global raw threshold, same precision | {_fmt(same['precision'])} | "
            f"{_fmt(same['recall'])} | – | – |",
            f"| one global raw threshold, chosen on the tune images | {_fmt(bh['precision'])} | "
            f"{_fmt(bh['recall'])} | {b['emitted_classes']} | {b['clearly_below_classes']} |",
            ""]
    target = t["objective"]
    kind = KINDS.get(target)
    certifiable = kind is not None and kind.certifiable
    if certifiable:
        target += f" ({kind.metric} >= {t['target_' + kind.metric]}"
        target += (f", certified at {t['confidence']:.0%}, budget "
                   f"{t.get('confidence_budget', 'per_class')})" if t.get("confidence")
                   else ", point estimate: not guaranteed)")
    if t.get("scope") == "pooled":
        target += ", one pooled threshold for all classes"
    elif t.get("on_unreachable") == "pool":
        target += (", every class not shown below the target is in one group with one certified "
                   "threshold; classes certified alone keep their own")
    lines += [
        f"- Target: {target}; match IoU {t['match_iou']}; NMS IoU grid {t['nms_iou_grid']}.",
        _split_text(report["split"]),
        f"- Calibration: {report['calibration']['method']}"
        + (" per class" if report["calibration"].get("per_class") else " pooled")
        + (", fitted on the learn part of the tune images only (the pooled decision compares "
           "classes by calibrated score, so the certify part must not shape it)"
           if report["calibration"].get("fitted_on") == "learn" else "")
        + (f"; pooled fallback for {len(report['calibration']['fallback_classes'])} classes"
           if report["calibration"].get("fallback_classes") else "") + ".",
        f"- ECE (holdout detections scoring >= {s.get('ece_min_score', 0)}): "
        f"{_fmt(s.get('ece_before'))} before, {_fmt(s.get('ece_after'))} after calibration "
        f"(all detections: {_fmt(s.get('ece_all_detections_before'))} -> "
        f"{_fmt(s.get('ece_all_detections_after'))}). Brier {_fmt(s.get('brier_before'))} -> "
        f"{_fmt(s.get('brier_after'))}.",
        *markdown_lines(s),
        f"- Holdout at the chosen thresholds: TP {s['holdout']['tp']}, FP {s['holdout']['fp']}, "
        f"FN {s['holdout']['fn']}; precision {_fmt(s['holdout']['precision'])}, "
        f"recall {_fmt(s['holdout']['recall'])}.",
        "",
    ]
    g = s.get("guarantee")
    if g:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(g["classes"].items()))
        lines += ["## What is guaranteed", "", g["statement"], "",
                  f"Classes by guarantee: {kinds}. `certified`: the promise above; `estimate`: "
                  "a point estimate on the tune images, not guaranteed; `pooled`: covered only by "
                  "the pooled promise; `none`: no promise (pooled fallback, best effort, "
                  "disabled). The held-out numbers below are estimates of how it carries over, "
                  "with their intervals.", ""]
        grp = g.get("group")
        if grp:
            h = grp.get("holdout")
            where = (f"threshold {_fmt(grp['threshold'])}, NMS IoU {grp['nms_iou']}"
                     if grp.get("threshold") is not None else "not certified: disabled")
            lines += [f"Pooled group ({grp.get('members', grp['classes'])} members, "
                      f"{grp['classes']} emitted at its threshold, {grp['guarantee']}): {where}"
                      + (f"; holdout precision {_fmt(h['precision'])} "
                         f"[{_fmt(h['precision_lower'])}, {_fmt(h['precision_upper'])}], recall "
                         f"{_fmt(h['recall'])}" if h else "") + ".", ""]
    if b:
        bh, same = b["holdout"], b["same_precision"]
        thr = ", ".join("unreachable" if v is None else f"{v:.3f}" for v in b["thresholds"])
        lines += [
            "## Against one global threshold", "",
            f"The baseline is {b['description']} (threshold {thr}, NMS IoU {b['nms_iou']}).", "",
            "| on the holdout images | precision | recall | TP | FP | emitted classes | "
            "clearly below target |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| tfcal | {_fmt(s['holdout']['precision'])} | {_fmt(s['holdout']['recall'])} | "
            f"{s['holdout']['tp']} | {s['holdout']['fp']} | {b['tfcal_emitted_classes']} | "
            f"{b['tfcal_clearly_below_classes']} |",
            f"| global raw threshold | {_fmt(bh['precision'])} | {_fmt(bh['recall'])} | "
            f"{bh['tp']} | {bh['fp']} | {b['emitted_classes']} | {b['clearly_below_classes']} |",
            "",
            "Clearly below: at least 20 held-out detections and the whole 95% interval under the "
            "target. At tfcal's held-out precision "
            f"({_fmt(same['precision_to_match'])}), the best single raw-score threshold chosen "
            f"on the holdout images themselves reaches recall {_fmt(same['recall'])} "
            f"(threshold {_fmt(same['threshold'])}): an optimistic view of the baseline, since "
            "it peeks at the held-out labels.", ""]
    lines += [
        "## COCO metrics on the holdout images",
        "",
        "Before: the detector's default post-processing (combined NMS, score > 1e-8, one IoU). "
        "After: the tuned post-processing. Thresholding trades AP (which integrates over all "
        "thresholds) for precision at the operating point, so AP after is expected to be lower.",
        "",
        "| stat | before | after |",
        "| --- | ---: | ---: |",
    ]
    before, after = s.get("coco_stats_before") or {}, s.get("coco_stats_after") or {}
    for key in STAT_KEYS:
        lines.append(f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    lines += [
        "",
        "## Per class",
        "",
        "Grouped by the statement each class carries: `certified` (its own), `pooled` (the "
        "group's), `estimate`, then `none`. Precision interval: Clopper–Pearson, "
        f"{report['holdout_confidence']:.0%} two-sided, on the holdout images.",
        "",
        "| id | name | status | guarantee | threshold | NMS IoU | calibration | TP | FP | FN | "
        "precision | interval | recall | meets target | boxes to certify |",
        "| ---: | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | "
        "--- | ---: |",
    ]
    method = report["calibration"]["method"]
    order = {"certified": 0, "pooled": 1, "estimate": 2, "none": 3}
    for c in sorted(report["classes"],
                    key=lambda c: order.get((c.get("guarantee") or {}).get("kind"), 4)):
        h = c["holdout"]
        meets = {True: "yes", False: "**no**", None: "–"}[h.get("meets_target")]
        if h.get("clearly_below"):
            meets = "**clearly below**"
        gu = c.get("guarantee") or {}
        need = gu.get("boxes_to_certify")
        if c.get("guarantee") is None:
            need = None
        lines.append(
            f"| {c['category_id']} | {c['name']} | {c['status']} | {gu.get('kind', '–')} | "
            f"{_fmt(c['threshold']) if c.get('enabled', True) else 'never emitted'} | "
            f"{_fmt(c['nms_iou'], 2)} | {_calibration_text(c.get('calibration'), method)} | "
            f"{h['tp']} | "
            f"{h['fp']} | {h['fn']} | {_fmt(h['precision'])} | {_interval(h)} | "
            f"{_fmt(h['recall'])} | {meets} | "
            f"{_need_text(need, gu.get('boxes_available'))} |")
    if report.get("subgroups"):
        lines += ["", "## Subgroups (holdout)", "",
                  "| field | value | images | TP | FP | FN | precision | interval | recall | ECE | "
                  "below target |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
        for g in report["subgroups"]:
            lines.append(
                f"| {g['field']} | {g['value']} | {g['images']} | {g['tp']} | {g['fp']} | "
                f"{g['fn']} | {_fmt(g['precision'])} | {_interval(g)} | {_fmt(g['recall'])} | "
                f"{_fmt(g['ece'])} | {'**yes**' if g['below_target'] else 'no'} |")
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        for title, rel in report["plots"].items():
            lines.append(f"- [{title}]({rel})")
    p = report["provenance"]
    lines += ["", "## Provenance", "",
              f"- config sha256 `{p['config_sha256']}`",
              f"- model fingerprint `{p['model_fingerprint']}`",
              f"- data fingerprint `{p['data_fingerprint']}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()), ""]
    return "\n".join(lines)


def _need_text(need, have) -> str:
    """Estimated labelled boxes to certify a class (an estimate, from its current curve)."""
    if need is None:
        return "–"
    return f"~{need}" if have is None else f"~{need} (has {have})"


def _split_text(split: dict) -> str:
    if split.get("mode") == "kfold":
        return (f"- Images: {split['tune_images']}, {split['k']}-fold: every number below is "
                "out-of-fold (each image evaluated by parameters tuned on the other folds); the "
                "deployed parameters are tuned on all images.")
    learn = ""
    if split.get("certify_images") is not None:
        learn = (f"; of the tune images {split['learn_images']} plan the certified tests and "
                 f"{split['certify_images']} certify them (the tune counts below are theirs)")
    return (f"- Images: {split['tune_images']} tune (calibration and search{learn}), "
            f"{split['holdout_images']} holdout (every number below).")


def _calibration_text(cal: dict | None, method: str) -> str:
    """The calibration method's own short text for a class's report entry."""
    if not cal:
        return "–"
    # The registry loads TensorFlow: only when there are fitted parameters to describe.
    from tfcal import calibration

    return calibration.get(method).describe(cal)


def write_plots(report: dict, plots_dir: Path) -> dict[str, str]:
    """Draws the report's plots into `plots_dir`; returns {title: path relative to the run dir}.

    Plots need matplotlib (the `[plots]` extra). Without it no plot is written and a log line
    says so; the report itself is complete without plots.
    """
    try:
        return _draw_plots(report, plots_dir)
    except ImportError as err:  # pragma: no cover - depends on the environment
        log.warning("plots skipped: %s (pip install 'tfcal[plots]')", err)
        return {}


def _draw_plots(report: dict, plots_dir: Path) -> dict[str, str]:
    """`write_plots` itself; ImportError without matplotlib (before any file is written)."""
    plots = plot_lib
    curves = report.get("curves") or {}
    out: dict[str, str] = {}
    rel = Path("plots")
    rd = curves.get("reliability")
    if rd:
        plots.plot_reliability_diagram(
            rd["confidence_before"], rd["label_before"], plots_dir / "reliability.png",
            probs_after=rd["confidence_after"], labels_after=rd["label_after"],
            num_bins=rd.get("num_bins", 10),
            title="Holdout detections: reliability before and after calibration")
        out["Reliability diagram (before and after calibration)"] = str(rel / "reliability.png")
    loc = (report.get("summary") or {}).get("localization")
    if loc:
        plots.plot_reliability_by_size(
            loc["before"]["reliability_by_size"], loc["after"]["reliability_by_size"],
            plots_dir / "reliability_by_size.png",
            title="Holdout detections by COCO size: reliability before and after calibration")
        out["Reliability by box size (COCO small / medium / large)"] = str(
            rel / "reliability_by_size.png")
    for c in curves.get("classes", []):
        name = f"pr_threshold_{c['category_id']}.png"
        plots.plot_threshold_curves(
            c["threshold"], c["precision"], c["recall"], plots_dir / name,
            chosen=c.get("chosen"), title=f"{c['name']} (tune split, NMS IoU {c['nms_iou']})")
        out[f"Precision/recall vs threshold: {c['name']}"] = str(rel / name)
    grid = curves.get("iou_grid")
    if grid:
        plots.plot_iou_tradeoff(grid, plots_dir / "iou_tradeoff.png")
        out["Trade-off across the NMS IoU grid"] = str(rel / "iou_tradeoff.png")
    return out


def write_report(run_dir: Path, report: dict, *, plots: bool = True) -> dict[str, Path]:
    """Writes report.json, report.md and plots/ into `run_dir`, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        with atomic.directory(run_dir / "plots", overwrite=True) as tmp:
            written = write_plots(report, tmp)
        report = {**report, "plots": written}
    paths = {"report_json": atomic.write_json(run_dir / "report.json", report)}
    paths["report_md"] = atomic.write_text(run_dir / "report.md", render_markdown(report))
    return paths


def load_report(path: str | Path) -> dict:
    """Reads report.json (or the run directory that holds it), with a clear error if invalid."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except OSError as err:
        raise TfcalError(f"{path}: cannot read report: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise TfcalError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(report, dict):
        raise TfcalError(f"{path}: must be a JSON object, got {type(report).__name__}")
    for key in ("classes", "summary", "target", "split", "calibration", "provenance"):
        if key not in report:
            raise TfcalError(f"{path}: {key}: missing (not a tfcal report.json)")
        kind = list if key == "classes" else dict
        if not isinstance(report[key], kind):
            raise TfcalError(f"{path}: {key}: must be {'a list' if kind is list else 'an object'}"
                             f", got {type(report[key]).__name__}")
    _check_fields(path, report)
    _check_curves(path, report.get("curves"))
    return report


# The fields `render_markdown` reads, by block (a hand-edited report.json is checked against
# them, so that a missing one is named instead of failing inside the renderer).
_HOLDOUT_KEYS = ("tp", "fp", "fn", "precision", "recall")
_CLASS_KEYS = ("category_id", "name", "status", "nms_iou", "holdout")
_BLOCK_KEYS = {
    "target": ("objective", "match_iou", "nms_iou_grid"),
    "calibration": ("method",),
    "summary": ("holdout",),
    "provenance": ("config_sha256", "model_fingerprint", "data_fingerprint", "versions"),
}
_SUBGROUP_KEYS = ("field", "value", "images", "tp", "fp", "fn", "precision", "recall", "ece",
                  "below_target")


def _need(path: Path, where: str, block: Any, keys: tuple[str, ...]) -> None:
    """`block` is an object holding every key of `keys`; else one error naming the field."""
    if not isinstance(block, dict):
        raise TfcalError(f"{path}: {where}: must be an object, got {type(block).__name__}")
    for key in keys:
        if key not in block:
            raise TfcalError(f"{path}: {where}.{key}: missing" if where else
                             f"{path}: {key}: missing")


def _check_fields(path: Path, report: dict) -> None:
    """The fields the renderer reads are present (names the first one that is not)."""
    _need(path, "", report, ("holdout_confidence",))
    for block, keys in _BLOCK_KEYS.items():
        _need(path, block, report[block], keys)
    _need(path, "summary.holdout", report["summary"]["holdout"], _HOLDOUT_KEYS)
    for i, c in enumerate(report["classes"]):
        where = f"classes[{i}]"
        _need(path, where, c, _CLASS_KEYS + (("threshold",) if c.get("enabled", True) else ()))
        _need(path, f"{where}.holdout", c["holdout"], _HOLDOUT_KEYS)
    subgroups = report.get("subgroups") or []
    if not isinstance(subgroups, list):
        raise TfcalError(f"{path}: subgroups: must be a list, got {type(subgroups).__name__}")
    for i, g in enumerate(subgroups):
        _need(path, f"subgroups[{i}]", g, _SUBGROUP_KEYS)


_RELIABILITY_KEYS = ("confidence_before", "label_before", "confidence_after", "label_after")
_CLASS_CURVE_KEYS = ("category_id", "name", "nms_iou", "threshold", "precision", "recall")


def _check_curves(path: Path, curves: Any) -> None:
    """The plot data `tfcal report` draws from: present keys, equal-length number lists."""
    if not curves:
        return
    if not isinstance(curves, dict):
        raise TfcalError(f"{path}: curves: must be an object, got {type(curves).__name__}")
    rd = curves.get("reliability")
    if rd:
        _check_lists(path, "curves.reliability", rd, _RELIABILITY_KEYS[:2])
        _check_lists(path, "curves.reliability", rd, _RELIABILITY_KEYS[2:])
    classes = curves.get("classes", [])
    if not isinstance(classes, list):
        raise TfcalError(f"{path}: curves.classes: must be a list, got {type(classes).__name__}")
    for i, c in enumerate(classes):
        where = f"curves.classes[{i}]"
        if not isinstance(c, dict):
            raise TfcalError(f"{path}: {where}: must be an object, got {type(c).__name__}")
        for key in _CLASS_CURVE_KEYS[:3]:
            if key not in c:
                raise TfcalError(f"{path}: {where}.{key}: missing")
        _check_lists(path, where, c, _CLASS_CURVE_KEYS[3:])
    grid = curves.get("iou_grid")
    if grid is not None and not isinstance(grid, dict):
        raise TfcalError(f"{path}: curves.iou_grid: must be an object, got {type(grid).__name__}")


def _check_lists(path: Path, where: str, block: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(block, dict):
        raise TfcalError(f"{path}: {where}: must be an object, got {type(block).__name__}")
    lengths = set()
    for key in keys:
        value = block.get(key)
        if value is None:
            raise TfcalError(f"{path}: {where}.{key}: missing")
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise TfcalError(f"{path}: {where}.{key}: must be a list of numbers")
        lengths.add(len(value))
    if len(lengths) > 1:
        raise TfcalError(f"{path}: {where}: {', '.join(keys)} must have equal lengths, got "
                         f"{sorted(lengths)}")


def render_report(path: str | Path) -> Path:
    """`tfcal report`: re-renders report.md and plots/ from report.json; returns report.md.

    Everything is rendered into a new generation of the output folder (`tfcal.rundir`), with
    the run's postprocess.json, and published only once complete: a report.json that cannot
    be rendered changes nothing.
    """
    path = Path(path)
    report = load_report(path)
    source = (path / "report.json") if path.is_dir() else path
    output_dir = rundir.output_dir_of(source)
    records = [source.resolve().parent / name
               for name in (rundir.POSTPROCESS_FILE, rundir.DETECTOR_FILE)]
    with locks.hold(output_dir, locks.command_line(), what="output folder"):
        try:
            with rundir.new_run(output_dir) as generation:
                write_report(generation, report, plots=bool(report.get("curves")))
                for record in records:  # the handoff to serving stays with its report
                    if record.is_file():
                        shutil.copy2(record, generation / record.name)
        except TfcalError:
            raise
        except KeyError as err:
            # A hand-edited report.json that passed the checks above but not the renderer.
            raise TfcalError(f"{source}: cannot render: a field {err.args[0]!r} is "
                             "missing") from None
        except (TypeError, ValueError, AttributeError, IndexError) as err:
            raise TfcalError(f"{source}: cannot render: {type(err).__name__}: {err}") from None
    return output_dir / "report.md"


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
