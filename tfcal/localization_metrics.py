"""Localisation-aware calibration metrics: LaECE and LaACE, D-ECE by box size and position,
and reliability curves per COCO size bucket.

LaECE_tau and LaACE_tau (Oksuz et al., CVPR 2023; Kuzucu et al., ECCV 2024) are computed exactly
as the reference code computes them (`fiveai/detection_calibration`, ``coco_calibration.py``,
``CalibrationCOCO.compute_single_errors`` and ``accumulate_errors``), from detections matched at
IoU `tau` (`tfcal.coco.localization.match_with_iou`; the `_0` metrics use `tau = 0`):

- Only classes with at least one non-ignored ground truth on the evaluated images and at least one
  true or false positive take part.
- LaECE, per class `c`: `num_bins` (default 25) uniform bins on [0, 1]; bin 0 is `[0, 1/B]`, bin
  `i > 0` is `(i/B, (i+1)/B]`. A bin holds the class's true and false positives (ignored
  detections are left out); its "accuracy" is the sum of its true positives' IoUs over its
  detections (precision x mean IoU of its TPs), its error `|accuracy - mean score|`, its weight
  its share of the class's detections. `LaECE_c = sum of weight x error`.
- LaACE, per class: `mean |iou - score|` over *all* the class's evaluated detections (IoU 0 for
  false positives). The reference selects them with a scalar mask (``np.logical_or`` of two
  counts), which keeps every detection, so detections matched to a crowd region (ignored, IoU 0)
  count too; this module does the same.
- The overall value is the mean over classes of the per-class values, where a class value of
  exactly 0 is dropped (the reference marks it NaN and averages with ``nanmean``).

D-ECE by box features is `tfcal.metrics.detection_ece` over the score x relative log size
(`1 + log10(clip(w h, 1e-4, 1)) / 4` of the normalized box, in [0, 1]) and the score x box
centre (`cx`, `cy`).

COCO size buckets use the detection box's area in pixels: small `< 32^2`, medium
`[32^2, 96^2)`, large `>= 96^2` (half-open; COCOeval's ranges share their edges).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from tfcal.metrics import ReliabilityCurve, detection_ece, reliability_curve

__all__ = [
    "LAECE_BINS",
    "SIZE_BUCKETS",
    "DetectionMatches",
    "LocalizationErrors",
    "box_detection_ece",
    "localization_errors",
    "reliability_by_size",
    "size_bucket",
]

#: Bins of the reference LaECE.
LAECE_BINS = 25
#: COCO's size buckets by pixel area: (name, low, high), low inclusive, high exclusive.
SIZE_BUCKETS = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2),
                ("large", 96.0 ** 2, np.inf))


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionMatches:
    """Detections matched at IoU `tau`, one row each (`localization_errors` checks them).

    Attributes:
      category_id: int `[D]`. score: float `[D]` in [0, 1].
      tp, fp: bool `[D]` (true positive, false positive; a detection that is neither is ignored).
      iou: float `[D]` IoU of each true positive (other values are not read).
      ignored: optional bool `[D]`; default: neither `tp` nor `fp`. Only LaACE reads it.
    """

    category_id: Sequence[int] | np.ndarray
    score: Sequence[float] | np.ndarray
    tp: Sequence[bool] | np.ndarray
    fp: Sequence[bool] | np.ndarray
    iou: Sequence[float] | np.ndarray
    ignored: Sequence[bool] | np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class LocalizationErrors:
    """LaECE and LaACE of a set of matched detections.

    Attributes:
      la_ece: the mean per-class LaECE, or None when no class takes part.
      la_ace: the mean per-class LaACE, or None.
      per_class_la_ece, per_class_la_ace: `{category_id: value}` of the classes that take part
        (a value of 0 is kept here, though the mean drops it, as the reference does).
      tau: the matching IoU threshold. num_bins: LaECE bins.
    """

    la_ece: float | None
    la_ace: float | None
    per_class_la_ece: Mapping[int, float]
    per_class_la_ace: Mapping[int, float]
    tau: float
    num_bins: int

    def to_dict(self) -> dict:
        """JSON-able: `la_ece`, `la_ace`, `tau`, `num_bins` and `classes`
        (`[{category_id, la_ece, la_ace}]`)."""
        ids = sorted(set(self.per_class_la_ece) | set(self.per_class_la_ace))
        return {"la_ece": self.la_ece, "la_ace": self.la_ace, "tau": self.tau,
                "num_bins": self.num_bins,
                "classes": [{"category_id": int(c), "la_ece": self.per_class_la_ece.get(c),
                             "la_ace": self.per_class_la_ace.get(c)} for c in ids]}


def _laece_bin(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Reference binning: bin 0 is `[e0, e1]`, bin i > 0 is `(e_i, e_{i+1}]`."""
    idx = np.searchsorted(edges, scores, side="left") - 1
    return np.clip(idx, 0, edges.size - 2)


def _mean_nonzero(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v != 0]
    return float(np.mean(kept)) if kept else None


def localization_errors(matches: DetectionMatches, num_gt: Mapping[int, int], *,
                        num_bins: int = LAECE_BINS, tau: float = 0.0) -> LocalizationErrors:
    """LaECE and LaACE of detections matched at `tau` (see the module docstring).

    Args:
      matches: the detections, matched at `tau`.
      num_gt: `{category_id: non-ignored ground truths}` on the evaluated images; classes with 0
        (or missing) take no part.
      num_bins: LaECE bins, default 25 (the reference's).
      tau: recorded in the result.

    Returns:
      A `LocalizationErrors`.
    """
    cat = np.asarray(matches.category_id, dtype=np.int64).reshape(-1)
    s = np.asarray(matches.score, dtype=np.float64).reshape(-1)
    tp = np.asarray(matches.tp, dtype=bool).reshape(-1)
    fp = np.asarray(matches.fp, dtype=bool).reshape(-1)
    iou = np.asarray(matches.iou, dtype=np.float64).reshape(-1)
    ignored = matches.ignored
    n = cat.size
    for name, a in (("score", s), ("tp", tp), ("fp", fp), ("iou", iou)):
        if a.size != n:
            raise ValueError(f"{name}: expected {n} values to match category_id, got {a.size}")
    if np.any(tp & fp):
        raise ValueError("tp, fp: a detection cannot be both")
    if n and (not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1):
        raise ValueError(f"score: must be finite and in [0, 1], got range [{s.min()}, {s.max()}]")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins: must be an int >= 1, got {num_bins!r}")
    ign = ~(tp | fp) if ignored is None else np.asarray(ignored, dtype=bool).reshape(-1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    tp_iou = np.where(tp, iou, 0.0)
    per_ece: dict[int, float] = {}
    per_ace: dict[int, float] = {}
    for c in sorted(int(k) for k, v in num_gt.items() if v > 0):
        in_c = cat == c
        det = in_c & (tp | fp)
        total = int(det.sum())
        if total == 0:
            continue
        b = _laece_bin(s[det], edges)
        count = np.bincount(b, minlength=num_bins)
        acc = np.bincount(b, weights=tp_iou[det], minlength=num_bins)
        conf = np.bincount(b, weights=s[det], minlength=num_bins)
        nz = count > 0
        per_ece[c] = float(np.sum(count[nz] / total
                                  * np.abs(acc[nz] / count[nz] - conf[nz] / count[nz])))
        every = in_c & (tp | fp | ign)
        per_ace[c] = float(np.mean(np.abs(tp_iou[every] - s[every])))
    return LocalizationErrors(_mean_nonzero(list(per_ece.values())),
                              _mean_nonzero(list(per_ace.values())), per_ece, per_ace,
                              float(tau), int(num_bins))


def box_detection_ece(scores, tp, boxes, *, num_bins: int = 10, box_bins: int = 5) -> dict:
    """D-ECE over the score alone, the score x relative size, and the score x centre position.

    Args:
      scores: float `[N]` in [0, 1]. tp: `[N]` 0/1 (matched at the job's `match_iou`).
      boxes: float `[N, 4]` normalized `[ymin, xmin, ymax, xmax]`.
      num_bins: score bins, default 10. box_bins: bins per box feature, default 5.

    Returns:
      `{"score": D-ECE, "score_x_size": ..., "score_x_position": ...}` (None when N = 0).
    """
    if np.asarray(scores).size == 0:
        return {"score": None, "score_x_size": None, "score_x_position": None}
    common = {"num_bins": num_bins, "box_bins": box_bins}
    return {
        "score": detection_ece(scores, tp, num_bins=num_bins),
        "score_x_size": detection_ece(scores, tp, boxes=boxes, box_features=("size",), **common),
        "score_x_position": detection_ece(scores, tp, boxes=boxes, box_features=("cx", "cy"),
                                          **common),
    }


def size_bucket(pixel_area) -> np.ndarray:
    """COCO size bucket name of each float `[N]` pixel area (`SIZE_BUCKETS`)."""
    a = np.asarray(pixel_area, dtype=np.float64).reshape(-1)
    out = np.empty(a.size, dtype=object)
    for name, lo, hi in SIZE_BUCKETS:
        out[(a >= lo) & (a < hi)] = name
    return out


def reliability_by_size(scores, labels, pixel_area, *, num_bins: int = 10
                        ) -> dict[str, ReliabilityCurve | None]:
    """A reliability curve per COCO size bucket (`None` for an empty bucket).

    Args:
      scores: float `[N]` in [0, 1]. labels: `[N]` 0/1.
      pixel_area: float `[N]` each detection box's area in pixels.
      num_bins: uniform bins, default 10.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    bucket = size_bucket(pixel_area)
    if bucket.size != s.size or y.size != s.size:
        raise ValueError(f"scores, labels, pixel_area: need equal lengths, got {s.size}, "
                         f"{y.size}, {bucket.size}")
    out: dict[str, ReliabilityCurve | None] = {}
    for name, _, _ in SIZE_BUCKETS:
        m = bucket == name
        out[name] = reliability_curve(s[m], y[m], num_bins=num_bins) if m.any() else None
    return out


def curve_dict(curve: ReliabilityCurve | None) -> dict | None:
    """JSON-able reliability curve: `ece`, `count`, and per-bin `confidence` / `accuracy`
    (None for empty bins)."""
    if curve is None:
        return None

    def values(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    return {"ece": curve.ece, "count": int(curve.count.sum()),
            "bin_edges": curve.bin_edges.tolist(), "bin_count": curve.count.tolist(),
            "confidence": values(curve.confidence), "accuracy": values(curve.accuracy)}
