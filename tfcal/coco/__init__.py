"""COCO data for tuning: loading and validation, category mapping, matching, COCOeval, the
detector runner and its raw-output cache. The only tfcal package that imports pycocotools."""

from tfcal.coco.dataset import CategoryMapping, CocoDataset, load_coco
from tfcal.coco.evaluation import (STAT_KEYS, coco_stats, evaluate_detections_file,
                                   load_detections, per_class_counts)
from tfcal.coco.cache import RawOutputs, RawOutputsWriter, convert_raw_outputs, load_raw_outputs
from tfcal.coco.matching import Detections, MatchResult, match_detections
from tfcal.coco.runner import SignatureKeys, run_detector

__all__ = [
    "STAT_KEYS", "CategoryMapping", "CocoDataset", "Detections", "MatchResult", "RawOutputs",
    "RawOutputsWriter", "SignatureKeys", "coco_stats", "convert_raw_outputs", "evaluate_detections_file", "load_coco", "load_detections",
    "load_raw_outputs", "match_detections", "per_class_counts", "run_detector",
]
