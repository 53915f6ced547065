"""Shared fixtures for the export tests: test detectors and one verified TF Serving export."""

from __future__ import annotations

from pathlib import Path

import pytest

from .odapi_test_model import build_odapi_test_model
from .odapi_test_model import sample_image
from tfcal.postprocess import PostProcessConfig


@pytest.fixture(scope="session")
def postprocess_config() -> PostProcessConfig:
    """Per-class numbers, so that grouped NMS and per-class thresholds are exported."""
    return PostProcessConfig(
        num_classes=3,
        calibration="temperature",
        calibration_params={"temperature": (1.5,)},
        min_score_thresh=(0.3, 0.4, 0.2),
        nms_iou=(0.5, 0.6, 0.5),
        max_detections_per_class=5,
        max_total_detections=10,
        metadata={
            "config_hash": "c0ffee",
            "data_fingerprint": "d00d",
            "target": "precision >= 0.9",
            "report_summary": {"AP": 0.5},
        },
    )


@pytest.fixture(scope="session")
def image_detector(tmp_path_factory) -> Path:
    """OD API `image_tensor` test detector, dynamic batch."""
    return build_odapi_test_model(tmp_path_factory.mktemp("det") / "image_tensor", "image_tensor")


@pytest.fixture(scope="session")
def served(tmp_path_factory, image_detector, postprocess_config):
    """A verified TF Serving export of the image detector: version 1 of model `det`."""
    from tfcal.export import export_for_serving

    root = tmp_path_factory.mktemp("serving") / "export"
    return export_for_serving(
        image_detector, postprocess_config, root, "det", warmup_images=[sample_image(seed=1)]
    )
