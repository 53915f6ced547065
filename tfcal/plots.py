"""PNG plots: reliability diagrams, precision/recall/F1 against threshold, NMS IoU trade-off.

Needs matplotlib (the `[plots]` extra), imported on first use. Figures are drawn with the Agg
canvas directly (no pyplot, no global backend change) and written atomically. Every function
returns the data it plotted, so callers and tests can check it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tfcal import atomic, metrics

DPI = 100
FIGSIZE = (6.4, 6.4)

__all__ = ["plot_iou_tradeoff", "plot_reliability_by_size", "plot_reliability_diagram",
           "plot_threshold_curves"]


def _figure(figsize=FIGSIZE):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("tfcal.plots needs matplotlib: pip install 'tfcal[plots]'") from err
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> tuple[Path, tuple[int, int]]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    size = tuple(int(round(v * DPI)) for v in fig.get_size_inches())
    return atomic.write_bytes(path, buf.getvalue()), size


def plot_reliability_diagram(probs, labels, path, *, probs_after=None, labels_after=None,
                             num_bins: int = 10, strategy: metrics.Strategy = "uniform",
                             title: str | None = None) -> dict[str, Any]:
    """Reliability diagram before (and optionally after) calibration, with bin-count histograms.

    Top panel: accuracy against mean confidence per non-empty bin, the diagonal of perfect
    calibration, and the ECE in the legend. Bottom panel: samples per bin.

    Args:
      probs: float `[N]` uncalibrated probabilities in [0, 1].
      labels: `[N]` 0/1 labels.
      path: PNG file to write (atomically; parents are created).
      probs_after: optional float `[N]` calibrated probabilities for the same samples.
      labels_after: optional 0/1 labels of `probs_after` when it holds other samples (for
        example, each side restricted to its own scores above a floor); default `labels`.
      num_bins: default 10. strategy: {'uniform', 'quantile'}, default 'uniform'.
      title: optional figure title.

    Returns:
      dict: `path`, `size` (width, height) in pixels, `before` and `after`
      (`metrics.ReliabilityCurve` or None), `ece_before`, `ece_after` (or None).
    """
    before = metrics.reliability_curve(probs, labels, num_bins=num_bins, strategy=strategy)
    after = (metrics.reliability_curve(probs_after, labels if labels_after is None else labels_after,
                                       num_bins=num_bins, strategy=strategy)
             if probs_after is not None else None)
    fig = _figure()
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(gs[0])
    hist = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    curves = [("before", before, "tab:red")] + ([("after", after, "tab:blue")] if after else [])
    width = np.diff(before.bin_edges)
    for i, (name, rc, color) in enumerate(curves):
        nz = rc.count > 0
        ax.plot(rc.confidence[nz], rc.accuracy[nz], marker="o", color=color,
                label=f"{name} (ECE {rc.ece:.3f})")
        offset = (i - (len(curves) - 1) / 2) * width / len(curves)
        hist.bar(0.5 * (rc.bin_edges[:-1] + rc.bin_edges[1:]) + offset, rc.count,
                 width=width / len(curves), color=color, alpha=0.7, label=name)
    ax.set_ylabel("accuracy (fraction positive)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.tick_params(labelbottom=False)
    hist.set_xlabel("confidence")
    hist.set_ylabel("count")
    if title:
        ax.set_title(title)
    out, size = _save(fig, path)
    return {"path": out, "size": size, "before": before, "after": after,
            "ece_before": before.ece, "ece_after": after.ece if after else None}


def plot_reliability_by_size(before: dict, after: dict, path, *,
                             title: str | None = None) -> dict[str, Any]:
    """Reliability diagrams per COCO size bucket (small, medium, large), before and after.

    Args:
      before, after: `{bucket: curve}` as report.json's
        `summary.localization.{before,after}.reliability_by_size` holds them (`confidence`,
        `accuracy` per bin, None for empty bins, `ece`, `count`; a bucket may be None).
      path: PNG file to write (atomically).
      title: optional figure title.

    Returns:
      dict: `path`, `size` (width, height) in pixels, `buckets` drawn.
    """
    buckets = ("small", "medium", "large")
    fig = _figure((3 * FIGSIZE[0] / 1.6, FIGSIZE[1] / 1.3))
    drawn = []
    for i, bucket in enumerate(buckets):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        for name, side, color in (("before", before, "tab:red"), ("after", after, "tab:blue")):
            curve = (side or {}).get(bucket)
            if not curve:
                continue
            pts = [(c, a) for c, a in zip(curve["confidence"], curve["accuracy"])
                   if c is not None and a is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", color=color,
                        label=f"{name} (ECE {curve['ece']:.3f}, n={curve['count']})")
                drawn.append(bucket)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(bucket if bucket in drawn else f"{bucket}: no detections")
        ax.set_xlabel("confidence")
        if i == 0:
            ax.set_ylabel("accuracy (fraction positive)")
        if bucket in drawn:
            ax.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)
    out, size = _save(fig, path)
    return {"path": out, "size": size, "buckets": sorted(set(drawn), key=buckets.index)}


def _chosen_point(chosen, t: np.ndarray, p: np.ndarray, r: np.ndarray) -> dict | None:
    if chosen is None:
        return None
    if isinstance(chosen, Mapping):
        thr = chosen.get("threshold")
    else:
        thr = getattr(chosen, "threshold", chosen)
    if thr is None:
        return None
    thr = float(thr)
    j = int(np.argmin(np.abs(t - thr)))
    get = (chosen.get if isinstance(chosen, Mapping) else
           (lambda k: getattr(chosen, k, None)))
    prec = get("precision")
    rec = get("recall")
    prec = float(p[j]) if prec is None else float(prec)
    rec = float(r[j]) if rec is None else float(rec)
    f = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"threshold": thr, "precision": prec, "recall": rec, "f1": f}


def plot_threshold_curves(thresholds, precision, recall, path, *, chosen=None,
                          title: str | None = None) -> dict[str, Any]:
    """Precision, recall and F1 against the score threshold, with the chosen point marked.

    Args:
      thresholds: float `[T]` thresholds (e.g. `PrecisionRecallCurve.thresholds`).
      precision: float `[T]` precision at each threshold.
      recall: float `[T]` recall at each threshold.
      path: PNG file to write (atomically).
      chosen: optional chosen point: a threshold (float), a `ThresholdResult`, or a mapping with
        `threshold` (and optionally `precision`, `recall`). Without precision/recall the curve
        point nearest the threshold is marked.
      title: optional title.

    Returns:
      dict: `path`, `size` (width, height) in pixels, `threshold`, `precision`, `recall`, `f1`
      (float64 `[T]` arrays as plotted, sorted by threshold ascending) and `chosen` (dict with
      threshold, precision, recall, f1, or None).
    """
    t = np.asarray(thresholds, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    if t.ndim != 1 or t.size == 0 or p.shape != t.shape or r.shape != t.shape:
        raise ValueError(f"thresholds, precision, recall: need equal non-empty 1-D arrays, got "
                         f"shapes {t.shape}, {p.shape}, {r.shape}")
    order = np.argsort(t, kind="stable")
    t, p, r = t[order], p[order], r[order]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    point = _chosen_point(chosen, t, p, r)
    fig = _figure((6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, p, label="precision", color="tab:blue")
    ax.plot(t, r, label="recall", color="tab:orange")
    ax.plot(t, f1, label="F1", color="tab:green")
    if point:
        ax.axvline(point["threshold"], color="0.4", linestyle=":", linewidth=1)
        ax.plot([point["threshold"]] * 3, [point["precision"], point["recall"], point["f1"]],
                linestyle="none", marker="o", color="k",
                label=f"chosen {point['threshold']:.3f}")
    ax.set_xlabel("score threshold")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    out, size = _save(fig, path)
    return {"path": out, "size": size, "threshold": t, "precision": p, "recall": r, "f1": f1,
            "chosen": point}


def plot_iou_tradeoff(grid, path, *, title: str | None = None) -> dict[str, Any]:
    """Metrics against the NMS IoU threshold.

    Args:
      grid: either a mapping `{"nms_iou": [G], metric: [G], ...}` or a sequence of mappings each
        with `nms_iou` and numeric metrics (e.g. precision, recall, f1, AP). Non-numeric entries
        are ignored.
      path: PNG file to write (atomically).
      title: optional title.

    Returns:
      dict: `path`, `size`, `nms_iou` (float64 `[G]`, ascending) and `series`
      ({metric: float64 `[G]`}).
    """
    if isinstance(grid, Mapping):
        rows = None
        columns = dict(grid)
    else:
        rows = list(grid)
        if not rows:
            raise ValueError("grid: empty")
        columns = {k: [row.get(k) for row in rows] for k in rows[0]}
    if "nms_iou" not in columns:
        raise ValueError(f"grid: needs an 'nms_iou' entry, got keys {sorted(columns)}")
    iou = np.asarray(columns["nms_iou"], dtype=np.float64)
    order = np.argsort(iou)
    series: dict[str, np.ndarray] = {}
    for k, v in columns.items():
        if k == "nms_iou":
            continue
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.shape == iou.shape:
            series[k] = arr[order]
    fig = _figure((6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for k, v in series.items():
        ax.plot(iou[order], v, marker="o", label=k)
    ax.set_xlabel("NMS IoU threshold")
    if series:
        ax.legend(loc="best")
    if title:
        ax.set_title(title)
    out, size = _save(fig, path)
    return {"path": out, "size": size, "nms_iou": iou[order], "series": series}
