"""report.md's line on `summary.localization` (no TensorFlow: `tfcal report` renders it)."""

from __future__ import annotations

__all__ = ["markdown_lines"]


def markdown_lines(summary: dict) -> list[str]:
    """report.md's bullet on the localisation-aware calibration (none for older reports)."""
    block = summary.get("localization")
    if not block:
        return []

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    b, a = block["before"], block["after"]
    sizes = []
    for name in ("small", "medium", "large"):
        cb, ca = b["reliability_by_size"].get(name), a["reliability_by_size"].get(name)
        if cb or ca:
            sizes.append(f"{name} {f(cb and cb['ece'])} -> {f(ca and ca['ece'])}")
    return [f"- Localisation-aware calibration (holdout detections scoring >= "
            f"{block['min_score']}, before -> after): LaECE_0 {f(b['la_ece_0'])} -> "
            f"{f(a['la_ece_0'])}, LaACE_0 {f(b['la_ace_0'])} -> {f(a['la_ace_0'])}; D-ECE "
            f"score x size {f(b['d_ece']['score_x_size'])} -> {f(a['d_ece']['score_x_size'])}, "
            f"score x position {f(b['d_ece']['score_x_position'])} -> "
            f"{f(a['d_ece']['score_x_position'])}; ECE by COCO size: "
            + (", ".join(sizes) or "n/a") + "."]
