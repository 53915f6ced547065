"""`tfcal demo`: the whole job on the embedded synthetic dataset and the bundled detector.

The demo settings are `demo_settings()`; `configs/demo.yaml` is the same config written out
for `runs/demo` (a test keeps the two equal), so `tfcal tune configs/demo.yaml` repeats the
demo's tuning once `tfcal demo` has generated the data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import yaml

from tfcal import TfcalError, atomic
from tfcal.config import load_config
from tfcal.demo.data import generate_dataset
from tfcal.tuning.pipeline import run_tune

log = logging.getLogger(__name__)

DETECTOR_DIR = Path(__file__).resolve().parent / "assets" / "detector"
DEFAULT_NUM_IMAGES = 400
DATA_SEED = 2026  # the detector was trained on other seeds (see train_detector.py)


def demo_settings(out: Path, detector: Path = DETECTOR_DIR) -> dict:
    """The demo config as a YAML-ready dict, with paths relative to `out`."""
    return {
        "model": {
            "saved_model": str(detector),
            "score_converter": "sigmoid",
            "background_column": True,
            "label_offset": 1,
            "batch_size": 16,
        },
        "data": {
            "annotations": "data/instances.json",
            "images": "data/images",
            "holdout_fraction": 0.4,
            "seed": 0,
            "subgroups": ["lighting", "camera"],
        },
        "calibration": {"method": "temperature", "per_class": True, "min_samples": 30},
        "tuning": {
            "objective": "precision_target",
            "target_precision": 0.9,
            "match_iou": 0.5,
            "nms_iou_grid": [0.3, 0.4, 0.5, 0.6, 0.7],
            "max_detections_per_class": 50,
            "max_total_detections": 100,
            "on_unreachable": "pool",
        },
        "output": {"dir": "run"},
        "export": {"enabled": True, "dir": "export", "model_name": "demo_detector"},
    }


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What `tfcal demo` made, and the tuning result it printed."""

    out: Path
    config_path: Path
    tune: object

    def summary(self) -> str:
        return (f"demo data and config: {self.out} (config {self.config_path})\n"
                + self.tune.summary())


def write_demo_config(out: Path, detector: Path = DETECTOR_DIR) -> Path:
    """Writes `<out>/demo.yaml` (paths relative to it, the detector absolute)."""
    out = Path(out)
    header = ("# Written by `tfcal demo`: the demo job's config (see configs/example.yaml for "
              "every key).\n")
    text = header + yaml.safe_dump(demo_settings(out, detector), sort_keys=False)
    return atomic.write_text(out / "demo.yaml", text)


def run_demo(out: str | Path = "runs/demo", *, num_images: int | None = None):
    """Generates the synthetic dataset (once), writes demo.yaml and runs `tune` on it.

    Args:
      out: working directory; data/, run/ (report) and export/ go inside it.
      num_images: images to generate (default 400). Existing data with the same count and seed
        is reused.

    Returns:
      A `DemoResult` whose `summary()` says where everything went.
    """
    out = Path(out).resolve()
    num_images = DEFAULT_NUM_IMAGES if num_images is None else num_images
    if num_images < 20:
        raise TfcalError(f"--num-images: must be >= 20 for a meaningful split, got {num_images}")
    data_dir = out / "data"
    stamp = data_dir / "generated.json"
    want = {"num_images": num_images, "seed": DATA_SEED}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        log.info("generating %d synthetic images in %s", num_images, data_dir)
        with atomic.directory(data_dir, overwrite=True) as tmp:
            generate_dataset(tmp, num_images=num_images, seed=DATA_SEED)
            atomic.write_json(tmp / "generated.json", want)
    config_path = write_demo_config(out)
    cfg = load_config(config_path)
    return DemoResult(out=out, config_path=config_path, tune=run_tune(cfg, export=True))
