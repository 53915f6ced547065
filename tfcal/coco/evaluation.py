"""COCO bbox evaluation: the 12 COCOeval stats and per-class TP/FP/FN at one match IoU, and the
`tfcal evaluate` command on a COCO results file.

`coco_stats` wraps pycocotools' ``COCOeval`` (prints silenced) and returns its 12
``summarize()`` numbers keyed by `STAT_KEYS`. `evaluate_detections_file` checks a COCO results
JSON against an instances JSON and adds per-class counts from `tfcal.coco.matching` (the same
greedy matching as COCOeval, at `match_iou`); it backs ``tfcal evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfcal import TfcalError, atomic
from tfcal.coco.dataset import CocoDataset, load_coco, quiet, read_json
from tfcal.coco.localization import summary as localization_summary
from tfcal.coco.matching import Detections, as_detections, match_detections

STAT_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")


def _coco(gt: Any):
    return gt.coco if isinstance(gt, CocoDataset) else gt


def coco_stats(gt: Any, detections: Any, *,
               image_ids: Sequence[int] | np.ndarray | None = None) -> dict[str, float]:
    """The 12 COCO bbox stats of `detections` (pycocotools ``COCOeval.summarize``).

    Args:
      gt: a `CocoDataset` or a pycocotools `COCO`.
      detections: a COCO results list, `Detections`, a mapping of arrays, or a float `[D, 7]`
        array ``[image_id, x, y, width, height, score, category_id]`` (pycocotools' layout).
        May be empty (stats are then 0, or -1 where pycocotools has nothing to average).
      image_ids: evaluate only these images (``params.imgIds``); default all.

    Returns:
      ``{key: float}`` for every key in `STAT_KEYS` (``AP`` is AP@[.5:.95], ``AR_100`` is AR at
      100 detections, ...), exactly as pycocotools computes them.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt)
    dets = as_detections(detections)
    with quiet():
        if len(dets):
            # loadRes mutates its input (adds area, id, segmentation): give it a copy.
            results = (copy.deepcopy(list(detections))
                       if isinstance(detections, list) else dets.to_coco_results())
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": copy.deepcopy(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_KEYS, ev.stats)}


def per_class_counts(dataset: CocoDataset, detections: Any, *, match_iou: float = 0.5,
                     max_dets: int = 100,
                     image_ids: Sequence[int] | np.ndarray | None = None) -> list[dict]:
    """Per category TP/FP/FN at `match_iou` (COCO greedy matching, crowd matches ignored).

    Returns:
      One dict per dataset category, in file order: ``category_id``, ``name``, ``tp``, ``fp``,
      ``fn`` (ints), ``precision`` = tp / (tp + fp) and ``recall`` = tp / (tp + fn) (floats, or
      None when the denominator is 0).
    """
    result = match_detections(dataset, detections, iou_threshold=match_iou, max_dets=max_dets,
                              image_ids=image_ids)
    counts = result.per_category()
    row = {int(c): i for i, c in enumerate(counts["category_id"])}
    out = []
    for cat_id, name in zip(dataset.category_ids, dataset.category_names):
        i = row[int(cat_id)]
        tp, fp, fn = (int(counts[k][i]) for k in ("tp", "fp", "fn"))
        out.append({"category_id": int(cat_id), "name": name, "tp": tp, "fp": fp, "fn": fn,
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "recall": tp / (tp + fn) if tp + fn else None})
    return out


def load_detections(detections_path: str | Path, dataset: CocoDataset) -> Detections:
    """Loads and checks a COCO results JSON against `dataset`.

    Raises:
      TfcalError: one line naming the file and field, for invalid JSON, a non-list or empty
        list, a missing key, a NaN/inf score, a non-finite or non-positive bbox, or an unknown
        image or category id.
    """
    path = Path(detections_path)
    raw = read_json(path)
    if not isinstance(raw, list):
        raise TfcalError(f"{path}: (top level): must be a list of detections, got "
                         f"{type(raw).__name__}")
    if not raw:
        raise TfcalError(f"{path}: (top level): no detections (empty list)")
    images = set(dataset.image_ids.tolist())
    cats = set(dataset.category_ids.tolist())
    for i, det in enumerate(raw):
        where = f"{path}: [{i}]"
        if not isinstance(det, dict):
            raise TfcalError(f"{where}: must be an object, got {type(det).__name__}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise TfcalError(f"{where}.{key}: missing key")
        if det["image_id"] not in images or isinstance(det["image_id"], bool):
            raise TfcalError(f"{where}.image_id: unknown image id (not in {dataset.path}), "
                             f"got {det['image_id']!r}")
        if det["category_id"] not in cats or isinstance(det["category_id"], bool):
            raise TfcalError(f"{where}.category_id: unknown category id (not in "
                             f"{dataset.path}), got {det['category_id']!r}")
        s = det["score"]
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise TfcalError(f"{where}.score: must be a finite number, got {s!r}")
        b = det["bbox"]
        if not isinstance(b, list) or len(b) != 4:
            raise TfcalError(f"{where}.bbox: must be a list [x, y, width, height], got {b!r}")
        for name, v in zip(("x", "y", "width", "height"), b):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TfcalError(f"{where}.bbox: {name} must be a finite number, got {v!r}")
        for name, v in zip(("width", "height"), b[2:]):
            if v <= 0:
                raise TfcalError(f"{where}.bbox: {name} must be > 0, got {v!r}")
    return Detections.from_coco_results(raw)


def evaluate_detections_file(annotations_path: str | Path, detections_path: str | Path,
                             match_iou: float = 0.5) -> dict:
    """COCO stats and per-class counts of a COCO results JSON (``tfcal evaluate``).

    Args:
      annotations_path: the instances JSON (images are not needed).
      detections_path: a COCO results JSON list of ``{image_id, category_id, bbox, score}``.
      match_iou: IoU for the per-class TP/FP/FN, in [0, 1].

    Returns:
      ``{"coco_stats": {STAT_KEYS...: float}, "per_class": [{category_id, name, tp, fp, fn,
      precision, recall}, ...], "match_iou": float, "localization": {...}}`` (JSON-able;
      undefined ratios are None; `localization`: see `tfcal.coco.localization.summary`).

    Raises:
      TfcalError: a bad annotations or detections file (see `load_coco`, `load_detections`).
    """
    if not 0.0 <= match_iou <= 1.0:
        raise TfcalError(f"match_iou: must be in [0, 1], got {match_iou!r}")
    dataset = load_coco(annotations_path, check_images=False)
    dets = load_detections(detections_path, dataset)
    return {"coco_stats": coco_stats(dataset, dets),
            "per_class": per_class_counts(dataset, dets, match_iou=match_iou),
            "match_iou": float(match_iou),
            "localization": localization_summary(dataset, dets, match_iou=match_iou)}


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """What `tfcal evaluate` measured."""

    report: dict
    out: Path | None

    def summary(self) -> str:
        s = self.report["coco_stats"]
        head = "  ".join(f"{k} {s[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR_100"))
        loc = self.report.get("localization")
        if loc:
            head += "  " + "  ".join(
                f"{name} {'n/a' if loc[key] is None else format(loc[key], '.3f')}"
                for name, key in (("LaECE_0", "la_ece_0"), ("LaACE_0", "la_ace_0"),
                                  ("D-ECE(score x size)", "d_ece_score_x_size")))
        where = f"\nreport: {self.out}" if self.out else ""
        return f"{head}{where}"


def run_evaluate(annotations: Path, detections: Path, *, match_iou: float = 0.5,
                 out: Path | None = None) -> EvaluateResult:
    """`tfcal evaluate`: COCO stats and per-class TP/FP/FN of a COCO results file."""
    if not 0.0 < match_iou < 1.0:
        raise TfcalError(f"--match-iou: must be in (0, 1), got {match_iou}")
    report = evaluate_detections_file(annotations, detections, match_iou=match_iou)
    if out is not None:
        atomic.write_json(out, report)
    return EvaluateResult(report=report, out=out)
