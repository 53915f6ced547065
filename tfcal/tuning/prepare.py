"""The validated inputs of a tuning job: the COCO set, the category mapping and the raw outputs.

`prepare(cfg)` loads and checks the data before any work, maps score columns to category ids,
and gets the detector's raw (pre-NMS) outputs from the cache (running the detector once) or
from precomputed outputs; their boxes pass the sanity check of `tfcal.coco.boxes` and are
converted from `model.box_format` to ``[ymin, xmin, ymax, xmax]``. `check_model_fingerprint` refuses a detector other than the one a
`PostProcessConfig` was tuned for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from tfcal import TfcalError, beam
from tfcal.coco import boxes, runner
from tfcal.coco.dataset import CategoryMapping, load_coco
from tfcal.config import Config
from tfcal.detectors import describe, open_detector
from tfcal.detectors.yolo import label_columns, read_labels
from tfcal.handoff import check_fingerprint
from tfcal.raw import check_value_ranges, load_raw_outputs, model_fingerprint


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Validated inputs of a job.

    Attributes:
      dataset: the `CocoDataset`.
      mapping: the `CategoryMapping` of score columns to category ids.
      raw: the `RawOutputs` (image_ids, boxes, scores, ...), in `dataset.image_ids` order.
      num_classes: K, class score columns after dropping background.
      model_fingerprint: sha256 of the SavedModel and its keys, or ``raw_outputs:<sha256>`` of
        the precomputed outputs' file (or cache meta).
      data_fingerprint: sha256 of the image list (the cache key's data half).
    """

    dataset: Any
    mapping: Any
    raw: Any
    num_classes: int
    model_fingerprint: str
    data_fingerprint: str

    def column_label(self, column: int, detail: str = "") -> str:
        """``name (id N<detail>)`` of the category a class column predicts (or ``column k``)."""
        i = int(self.mapping.column_category_ids[column])
        if i < 0:
            return f"column {column}"
        return f"{self.dataset.category_name(i)} (id {i}{detail})"

    def class_presence(self) -> np.ndarray:
        """bool `[I, K]`: image i has a (non-crowd) box of class column k."""
        ds = self.dataset
        presence = np.zeros((ds.num_images, self.num_classes), dtype=bool)
        ok = ~ds.ann_iscrowd
        rows = ds.image_index(ds.ann_image_ids[ok]) if ok.any() else np.zeros(0, np.int64)
        cats = ds.ann_category_ids[ok]
        col_of = {int(c): self.mapping.column_of(int(c)) for c in np.unique(cats)}
        cols = np.array([col_of[int(c)] for c in cats], dtype=np.int64)
        presence[rows, cols] = True
        return presence


def load_dataset(cfg: Config, annotations: Path | None = None, images: Path | None = None):
    """Loads and validates the COCO set (and, with a model, its images) before any work."""
    annotations = annotations or cfg.data.annotations
    images = images if images is not None else cfg.data.images
    need_images = cfg.model.detector_path is not None
    if need_images and images is None:
        key = "saved_model" if cfg.model.format == "odapi" else "path"
        raise TfcalError(f"{cfg.source}: data.images: is required to run model.{key}")
    dataset = load_coco(annotations, images if need_images else None, check_images=need_images)
    for field in cfg.data.subgroups:
        missing = [img.get("id") for img in dataset.dataset["images"] if field not in img]
        if missing:
            raise TfcalError(f"{annotations}: images[id={missing[0]}].{field}: missing "
                             f"(data.subgroups lists it; {len(missing)} images lack it)")
    return dataset


def prepare(cfg: Config, *, annotations: Path | None = None, images: Path | None = None,
            cache_dir: Path | None = None) -> Prepared:
    """Validates the data, maps categories to columns and gets the raw outputs (cached)."""
    dataset = load_dataset(cfg, annotations, images)
    m = cfg.model
    if m.detector_path is not None:
        cache_dir = cache_dir or m.cache_dir or (cfg.output.dir / "cache")
        if cfg.runner.kind == "beam":
            raw = beam.run_detector(m, cfg.runner, dataset, cache_dir=cache_dir,
                                    source=str(cfg.source))
        else:
            raw = runner.run_detector(open_detector(m), dataset, batch_size=m.batch_size,
                                      cache_dir=cache_dir)
    else:
        raw = load_raw_outputs(m.raw_outputs, dataset,
                               cache_dir=cache_dir or m.cache_dir or (cfg.output.dir / "cache"))
    model_run = m.detector_path is not None
    check_value_ranges(raw, score_converter=m.score_converter,
                       source=str(m.detector_path or m.raw_outputs),
                       boxes_key=m.raw_boxes if model_run else "boxes",
                       scores_key=m.raw_scores if model_run else "scores")
    num_columns = raw.scores.shape[-1]
    num_classes = num_columns - 1 if m.background_column else num_columns
    if num_classes < 1:
        raise TfcalError(f"{m.detector_path or m.raw_outputs}: {m.raw_scores}: needs at least one "
                         f"class column, got {num_columns} columns")
    if raw.boxes.ndim == 4 and raw.boxes.shape[2] not in (1, num_classes):
        raise TfcalError(
            f"{m.detector_path or m.raw_outputs}: {m.raw_boxes if model_run else 'boxes'}: per-class "
            f"boxes {list(raw.boxes.shape)} need one box per class column ({num_classes} with "
            f"model.background_column: {str(m.background_column).lower()}), got "
            f"{raw.boxes.shape[2]}")
    if m.format == "yolo" and m.yolo.labels is not None:
        mapping = _label_mapping(m, dataset, num_classes)
    elif m.category_columns is not None:
        mapping = CategoryMapping.from_category_columns(dataset, m.category_columns, num_classes)
    else:
        mapping = CategoryMapping.odapi(dataset, num_classes, label_offset=m.label_offset)
    boxes.check_boxes(raw, dataset, mapping, box_format=m.box_format,
                      background_column=m.background_column, match_iou=cfg.tuning.match_iou,
                      source=str(m.detector_path or m.raw_outputs),
                      boxes_key=m.raw_boxes if model_run else "boxes")
    raw = boxes.converted(raw, m.box_format)
    # Precomputed outputs have no model to hash: their own file identifies what was measured.
    model_fp = raw.model_fingerprint or f"raw_outputs:{raw.fingerprint}"
    return Prepared(dataset=dataset, mapping=mapping, raw=raw, num_classes=num_classes,
                    model_fingerprint=model_fp, data_fingerprint=raw.data_fingerprint)


def _label_mapping(m, dataset, num_classes: int) -> CategoryMapping:
    """Columns to category ids by the names of `model.yolo.labels` (see `label_columns`)."""
    names = read_labels(m.yolo.labels)
    if len(names) != num_classes:
        raise TfcalError(f"{m.yolo.labels}: labels: {len(names)} names, but "
                         f"{m.detector_path or m.raw_outputs} has {num_classes} class columns")
    columns = label_columns(names, list(dataset.category_names),
                            on_unknown=m.yolo.on_unknown_label, source=str(m.yolo.labels))
    return CategoryMapping.explicit(dataset, columns, num_classes)


def config_model_fingerprint(cfg: Config) -> str | None:
    """The fingerprint of the config's model and keys (None: no model)."""
    if cfg.model.detector_path is None:
        return None
    return describe(cfg.model).fingerprint()


def check_model_fingerprint(cfg: Config, ppc, ppc_path: Path, *, model_fp: str | None = None,
                            what: str = "model.saved_model") -> None:
    """Refuses a detector other than the one `ppc` was tuned for (TfcalError naming both).

    Compares `model_fp` (default: the fingerprint of the config's `model.saved_model` and keys)
    with ``metadata.model_fingerprint`` of `ppc_path`. Nothing is compared when either side has
    no model to fingerprint (tuned from, or given, precomputed raw outputs without one).
    """
    if model_fp is None:
        model_fp = config_model_fingerprint(cfg)
        if model_fp is None:
            return
        what = f"model {cfg.model.detector_path}"
    check_fingerprint(ppc, ppc_path, model_fp, what)
