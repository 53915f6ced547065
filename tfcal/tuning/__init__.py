"""Tuning: the job split by owner (prepare, detections, objectives, calibrate, search, tune,
holdout, report; `pipeline` orders them); re-exports the split, candidate collection and the
search."""

from tfcal.tuning.candidates import Candidates, collect_candidates
from tfcal.tuning.search import (
    ClassChoice,
    Curves,
    MatchedDetections,
    Objective,
    SearchResult,
    UnreachableTargetError,
    default_iou,
    joint_search,
)
from tfcal.tuning.split import kfold, split_images

__all__ = [
    "Candidates",
    "collect_candidates",
    "ClassChoice",
    "Curves",
    "MatchedDetections",
    "Objective",
    "SearchResult",
    "UnreachableTargetError",
    "default_iou",
    "joint_search",
    "kfold",
    "split_images",
]
