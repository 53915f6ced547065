"""COCO data for tuning: loading and validation, category mapping, box formats, matching,
COCOeval, and the detector runner (which fills the raw-output cache of `tfcal.raw`). The only
tfcal package that imports pycocotools."""

from tfcal.coco.dataset import CategoryMapping, CocoDataset, load_coco
from tfcal.coco.evaluation import (STAT_KEYS, coco_stats, evaluate_detections_file,
                                   load_detections, per_class_counts)
from tfcal.coco.matching import Detections, MatchResult, match_detections
from tfcal.coco.runner import SignatureKeys, run_detector

__all__ = [
    "STAT_KEYS", "CategoryMapping", "CocoDataset", "Detections", "MatchResult", "SignatureKeys",
    "coco_stats", "evaluate_detections_file", "load_coco", "load_detections", "match_detections",
    "per_class_counts", "run_detector",
]
