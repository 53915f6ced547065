"""COCO instances loading, validation, and the mapping of category ids to score columns.

`load_coco` checks an instances JSON before any work starts and raises `tfcal.TfcalError` with a
one-line message naming the file, the field and the bad value, e.g.
``instances.json: annotations[12].bbox: width must be > 0, got -3.0``. It returns a
`CocoDataset`: the pycocotools `COCO` object built from the checked dict (its prints silenced),
plus NumPy arrays of images and annotations in file order.

`CategoryMapping` maps the model's class score columns (background column already dropped,
0-based) to COCO category ids: the TF OD API default (column ``k`` is id ``k + label_offset``), or
an explicit mapping by id or by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tfcal import TfcalError

logger = logging.getLogger(__name__)

# Magic bytes of the formats `tf.io.decode_image` reads.
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_HEADER_BYTES = 16
#: How far an annotation bbox may reach outside its image (rounding in labelling tools): the
#: larger of these pixels and this fraction of the image side. Further out, the box is wrong
#: (other units, another image's size) and the file is refused.
BBOX_SLACK_PIXELS = 2.0
BBOX_SLACK_FRACTION = 0.02


@contextlib.contextmanager
def quiet():
    """Silences pycocotools, which prints progress to stdout instead of logging it."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    text = buf.getvalue().strip()
    if text:
        logger.debug("pycocotools: %s", text.replace("\n", " | "))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def image_format(header: bytes) -> str | None:
    """Returns the image format named by `header` (first bytes of a file), or None if unknown."""
    for magic, name in _IMAGE_MAGIC:
        if header.startswith(magic):
            return name
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WebP"
    return None


class _Checker:
    """Collects the file name so every failure is one line: ``file: field: problem, got value``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str, value: Any = dataclasses.MISSING) -> None:
        got = "" if value is dataclasses.MISSING else f", got {value!r}"
        raise TfcalError(f"{self.source}: {field}: {problem}{got}")

    def entry(self, entry: Any, where: str, keys: Sequence[str]) -> None:
        if not isinstance(entry, dict):
            self.fail(where, "must be an object", type(entry).__name__)
        for key in keys:
            if key not in entry:
                self.fail(f"{where}.{key}", "missing key")

    def int_id(self, value: Any, where: str) -> int:
        if not _is_int(value):
            self.fail(where, "must be an integer", value)
        return value

    def bbox(self, bbox: Any, where: str) -> None:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            self.fail(where, "must be a list [x, y, width, height]", bbox)
        for name, v in zip(("x", "y", "width", "height"), bbox):
            if not _is_number(v):
                self.fail(where, f"{name} must be a number", v)
            if not math.isfinite(v):
                self.fail(where, f"{name} must be finite", v)
        for name, v in zip(("width", "height"), bbox[2:]):
            if v <= 0:
                self.fail(where, f"{name} must be > 0", v)


@dataclasses.dataclass(frozen=True, eq=False)
class CocoDataset:
    """A validated COCO instances file.

    Attributes:
      path: the annotations JSON.
      images_dir: the folder of the image files, or None when images were not located.
      coco: the pycocotools `COCO` object built from the checked dict. Annotations without
        ``area`` get ``width * height``, and without ``iscrowd`` get 0.
      image_ids: int64 `[I]` image ids in file order.
      file_names: the ``file_name`` of each image, `[I]`.
      image_heights: int64 `[I]`. image_widths: int64 `[I]`.
      image_paths: `[I]` paths under `images_dir`, or None.
      category_ids: int64 `[C]` category ids in file order. category_names: `[C]`.
      ann_ids, ann_image_ids, ann_category_ids: int64 `[A]` annotation fields in file order.
      ann_bboxes: float64 `[A, 4]` COCO ``[x, y, width, height]`` in pixels.
      ann_areas: float64 `[A]`. ann_iscrowd: bool `[A]`.
    """

    path: Path
    images_dir: Path | None
    coco: Any
    image_ids: np.ndarray
    file_names: tuple[str, ...]
    image_heights: np.ndarray
    image_widths: np.ndarray
    image_paths: tuple[Path, ...] | None
    category_ids: np.ndarray
    category_names: tuple[str, ...]
    ann_ids: np.ndarray
    ann_image_ids: np.ndarray
    ann_category_ids: np.ndarray
    ann_bboxes: np.ndarray
    ann_areas: np.ndarray
    ann_iscrowd: np.ndarray

    @property
    def dataset(self) -> dict:
        """The checked COCO dict (as held by `coco`)."""
        return self.coco.dataset

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    def category_name(self, category_id: int) -> str:
        """The name of `category_id`."""
        return self.coco.cats[int(category_id)]["name"]

    def image_index(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id in `image_ids` within `self.image_ids`; ValueError on an unknown id."""
        ids = np.asarray(image_ids, dtype=np.int64)
        order = np.argsort(self.image_ids, kind="stable")
        sorted_ids = self.image_ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or not np.all(sorted_ids[pos] == ids):
            bad = ids[(len(sorted_ids) == 0) | (sorted_ids[pos] != ids)]
            raise ValueError(f"image ids not in {self.path}: {bad[:5].tolist()}")
        return order[pos]


def read_json(path: Path) -> Any:
    """The parsed JSON file, or a one-line `TfcalError` naming it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TfcalError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TfcalError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise TfcalError(f"{path}: cannot read: {e}") from None


def load_coco(
    annotations_path: str | Path,
    images_dir: str | Path | None = None,
    *,
    check_images: bool = True,
) -> CocoDataset:
    """Loads and validates a COCO instances JSON.

    Args:
      annotations_path: the instances JSON (``images``, ``annotations``, ``categories``).
      images_dir: the folder holding each image's ``file_name``. None: images are not located
        (evaluation only).
      check_images: with `images_dir`, check that every image file exists and starts with a
        JPEG/PNG/GIF/BMP/WebP header (reads 16 bytes per file).

    Returns:
      The `CocoDataset`.

    Raises:
      TfcalError: one line naming the file, the field and the bad value, for invalid JSON, a
        missing key, a non-finite or non-positive bbox, a bbox outside its image (beyond
        `BBOX_SLACK_PIXELS` / `BBOX_SLACK_FRACTION`), duplicate ids, an annotation on an
        unknown image or category, annotations that are all crowd regions, or a missing or
        unreadable image file.
    """
    path = Path(annotations_path)
    check = _Checker(str(path))
    raw = read_json(path)
    if not isinstance(raw, dict):
        check.fail("(top level)", "must be an object", type(raw).__name__)
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            check.fail(key, "missing key")
        if not isinstance(raw[key], list):
            check.fail(key, "must be a list", type(raw[key]).__name__)

    image_rows: dict[int, int] = {}
    for i, img in enumerate(raw["images"]):
        where = f"images[{i}]"
        check.entry(img, where, ("id", "file_name", "width", "height"))
        img_id = check.int_id(img["id"], f"{where}.id")
        if img_id in image_rows:
            check.fail(f"{where}.id", f"duplicate image id (also images[{image_rows[img_id]}])",
                       img_id)
        image_rows[img_id] = i
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            check.fail(f"{where}.file_name", "must be a non-empty string", img["file_name"])
        for key in ("width", "height"):
            if not _is_int(img[key]) or img[key] <= 0:
                check.fail(f"{where}.{key}", "must be an integer > 0", img[key])

    cat_rows: dict[int, int] = {}
    for i, cat in enumerate(raw["categories"]):
        where = f"categories[{i}]"
        check.entry(cat, where, ("id", "name"))
        cat_id = check.int_id(cat["id"], f"{where}.id")
        if cat_id in cat_rows:
            check.fail(f"{where}.id",
                       f"duplicate category id (also categories[{cat_rows[cat_id]}])", cat_id)
        cat_rows[cat_id] = i
        if not isinstance(cat["name"], str):
            check.fail(f"{where}.name", "must be a string", cat["name"])

    ann_rows: dict[int, int] = {}
    anns = []
    for i, ann in enumerate(raw["annotations"]):
        where = f"annotations[{i}]"
        check.entry(ann, where, ("id", "image_id", "category_id", "bbox"))
        ann_id = check.int_id(ann["id"], f"{where}.id")
        if ann_id in ann_rows:
            check.fail(f"{where}.id",
                       f"duplicate annotation id (also annotations[{ann_rows[ann_id]}])", ann_id)
        ann_rows[ann_id] = i
        if check.int_id(ann["image_id"], f"{where}.image_id") not in image_rows:
            check.fail(f"{where}.image_id", "unknown image id", ann["image_id"])
        if check.int_id(ann["category_id"], f"{where}.category_id") not in cat_rows:
            check.fail(f"{where}.category_id", "unknown category id", ann["category_id"])
        check.bbox(ann["bbox"], f"{where}.bbox")
        img = raw["images"][image_rows[int(ann["image_id"])]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        slack_x = max(BBOX_SLACK_PIXELS, BBOX_SLACK_FRACTION * img["width"])
        slack_y = max(BBOX_SLACK_PIXELS, BBOX_SLACK_FRACTION * img["height"])
        if x < -slack_x or y < -slack_y or x + w > img["width"] + slack_x or \
                y + h > img["height"] + slack_y:
            check.fail(f"{where}.bbox", f"lies outside its image (id {ann['image_id']}, "
                       f"{img['width']} x {img['height']} pixels; [x, y, width, height] in "
                       "pixels?)", ann["bbox"])
        ann = dict(ann)
        if "area" in ann:
            if not _is_number(ann["area"]) or not math.isfinite(ann["area"]) or ann["area"] < 0:
                check.fail(f"{where}.area", "must be a finite number >= 0", ann["area"])
        else:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
        if ann["iscrowd"] not in (0, 1, True, False):
            check.fail(f"{where}.iscrowd", "must be 0 or 1", ann["iscrowd"])
        anns.append(ann)

    if anns and all(bool(a["iscrowd"]) for a in anns):
        check.fail("annotations[].iscrowd", f"all {len(anns)} annotations are crowd regions "
                   "(iscrowd: 1), which COCO matching ignores: nothing to count TP or FN "
                   "against")

    images_root = None if images_dir is None else Path(images_dir)
    image_paths = None
    if images_root is not None:
        if not images_root.is_dir():
            raise TfcalError(f"{images_root}: images folder not found (for {path})")
        image_paths = tuple(images_root / img["file_name"] for img in raw["images"])
        if check_images:
            for i, p in enumerate(image_paths):
                _check_image_file(check, f"images[{i}].file_name", p)

    data = dict(raw)
    data["annotations"] = anns
    data.setdefault("info", {})
    from pycocotools.coco import COCO  # the one package that imports pycocotools

    with quiet():
        coco = COCO()
        coco.dataset = data
        coco.createIndex()

    images = raw["images"]
    num_anns = len(anns)
    ds = CocoDataset(
        path=path,
        images_dir=images_root,
        coco=coco,
        image_ids=np.array([img["id"] for img in images], dtype=np.int64),
        file_names=tuple(img["file_name"] for img in images),
        image_heights=np.array([img["height"] for img in images], dtype=np.int64),
        image_widths=np.array([img["width"] for img in images], dtype=np.int64),
        image_paths=image_paths,
        category_ids=np.array([c["id"] for c in raw["categories"]], dtype=np.int64),
        category_names=tuple(c["name"] for c in raw["categories"]),
        ann_ids=np.array([a["id"] for a in anns], dtype=np.int64),
        ann_image_ids=np.array([a["image_id"] for a in anns], dtype=np.int64),
        ann_category_ids=np.array([a["category_id"] for a in anns], dtype=np.int64),
        ann_bboxes=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(num_anns, 4),
        ann_areas=np.array([a["area"] for a in anns], dtype=np.float64),
        ann_iscrowd=np.array([bool(a["iscrowd"]) for a in anns], dtype=bool),
    )
    logger.info("loaded %s: %d images, %d annotations, %d categories", path, ds.num_images,
                num_anns, len(ds.category_ids))
    return ds


def _check_image_file(check: _Checker, field: str, p: Path) -> None:
    try:
        with open(p, "rb") as f:
            header = f.read(_HEADER_BYTES)
    except FileNotFoundError:
        check.fail(field, "image file not found", str(p))
    except OSError as e:
        check.fail(field, f"image file unreadable ({e.strerror})", str(p))
    if image_format(header) is None:
        check.fail(field, "not a JPEG/PNG/GIF/BMP/WebP image", str(p))


@dataclasses.dataclass(frozen=True)
class CategoryMapping:
    """Class score columns (background dropped, 0-based) <-> COCO category ids.

    Attributes:
      num_classes: K, the number of class score columns.
      column_category_ids: int64 `[K]`: the category id of each column, -1 for an unused column.
      unmapped_category_ids: ids of dataset categories that no column predicts.
    """

    num_classes: int
    column_category_ids: np.ndarray
    unmapped_category_ids: tuple[int, ...] = ()

    @property
    def used_columns(self) -> np.ndarray:
        """int64 `[U]` columns that map to a category, ascending."""
        return np.flatnonzero(self.column_category_ids >= 0)

    @property
    def category_ids(self) -> np.ndarray:
        """int64 `[U]` the category id of each used column."""
        return self.column_category_ids[self.used_columns]

    def column_of(self, category_id: int) -> int:
        """The column that predicts `category_id`; ValueError if none does."""
        hits = np.flatnonzero(self.column_category_ids == int(category_id))
        if hits.size == 0:
            raise ValueError(f"no score column predicts category id {category_id}")
        return int(hits[0])

    def columns_to_category_ids(self, columns: np.ndarray) -> np.ndarray:
        """int64 category id of each column index in `columns` (-1 for unused columns)."""
        columns = np.asarray(columns, dtype=np.int64)
        if columns.size and (columns.min() < 0 or columns.max() >= self.num_classes):
            raise ValueError(f"column index out of [0, {self.num_classes}): "
                             f"{columns[(columns < 0) | (columns >= self.num_classes)][:5]}")
        return self.column_category_ids[columns]

    @classmethod
    def build(cls, dataset: CocoDataset, num_classes: int, *, label_offset: int = 1,
              category_columns: Mapping[Any, int] | None = None,
              allow_unmapped: bool = False) -> "CategoryMapping":
        """`odapi` when `category_columns` is None, else `from_category_columns` (the config's
        ``model.label_offset`` / ``model.category_columns``)."""
        if category_columns is None:
            return cls.odapi(dataset, num_classes, label_offset=label_offset,
                             allow_unmapped=allow_unmapped)
        return cls.from_category_columns(dataset, category_columns, num_classes,
                                         allow_unmapped=allow_unmapped)

    @classmethod
    def odapi(cls, dataset: CocoDataset, num_classes: int, *, label_offset: int = 1,
              allow_unmapped: bool = False) -> "CategoryMapping":
        """TF OD API label ids: column ``k`` predicts category id ``k + label_offset``.

        Columns whose id is not a dataset category are unused.

        Raises:
          TfcalError: a dataset category has no column (unless `allow_unmapped`).
        """
        if num_classes <= 0 or label_offset < 0:
            raise ValueError(f"need num_classes > 0 and label_offset >= 0, got {num_classes}, "
                             f"{label_offset}")
        ids = np.arange(num_classes, dtype=np.int64) + label_offset
        col_ids = np.where(np.isin(ids, dataset.category_ids), ids, -1)
        return cls._finish(dataset, num_classes, col_ids, allow_unmapped,
                           f"num_classes={num_classes}, label_offset={label_offset}")

    @classmethod
    def explicit(cls, dataset: CocoDataset, mapping: Mapping[int, int | str] | Sequence[Any],
                 num_classes: int, *, allow_unmapped: bool = False) -> "CategoryMapping":
        """An explicit ``{column: category id or name}`` mapping, or a list indexed by column.

        List entries that are None are unused columns.

        Raises:
          TfcalError: a column out of range, an unknown or ambiguous category, a category on two
            columns, or a dataset category with no column (unless `allow_unmapped`).
        """
        if isinstance(mapping, Mapping):
            items = list(mapping.items())
        else:
            items = [(c, v) for c, v in enumerate(mapping) if v is not None]
        col_ids = np.full(num_classes, -1, dtype=np.int64)
        for col, ref in items:
            if not _is_int(col) or not 0 <= col < num_classes:
                raise TfcalError(f"category mapping: column must be an integer in [0, "
                                 f"{num_classes}), got {col!r}")
            cat_id = _resolve_category(dataset, ref)
            if cat_id in col_ids:
                raise TfcalError(f"category mapping: category {ref!r} is mapped to two columns "
                                 f"({int(np.flatnonzero(col_ids == cat_id)[0])} and {col})")
            col_ids[col] = cat_id
        return cls._finish(dataset, num_classes, col_ids, allow_unmapped, "explicit mapping")

    @classmethod
    def from_category_columns(cls, dataset: CocoDataset, category_columns: Mapping[Any, int],
                              num_classes: int, *, allow_unmapped: bool = False
                              ) -> "CategoryMapping":
        """The config form ``{category id or name: column}`` (ids may be digit strings)."""
        inverted: dict[int, Any] = {}
        for ref, col in category_columns.items():
            if not _is_int(col):
                raise TfcalError(f"category mapping: {ref!r}: column must be an integer, "
                                 f"got {col!r}")
            if col in inverted:
                raise TfcalError(f"category mapping: column {col} is given for both "
                                 f"{inverted[col]!r} and {ref!r}")
            inverted[col] = ref
        return cls.explicit(dataset, inverted, num_classes, allow_unmapped=allow_unmapped)

    @classmethod
    def _finish(cls, dataset, num_classes, col_ids, allow_unmapped, how) -> "CategoryMapping":
        unmapped = tuple(int(c) for c in dataset.category_ids if c not in col_ids)
        if unmapped and not allow_unmapped:
            names = [dataset.category_name(c) for c in unmapped[:5]]
            raise TfcalError(f"{dataset.path}: categories: {len(unmapped)} categories have no "
                             f"score column ({how}), got ids {list(unmapped[:5])} {names}")
        return cls(num_classes=int(num_classes), column_category_ids=col_ids,
                   unmapped_category_ids=unmapped)


def _resolve_category(dataset: CocoDataset, ref: Any) -> int:
    """A category id from an int id, a digit-string id, or a unique name."""
    if _is_int(ref):
        if ref not in dataset.coco.cats:
            raise TfcalError(f"category mapping: unknown category id in {dataset.path}, got {ref}")
        return int(ref)
    if isinstance(ref, str):
        hits = [int(c) for c, n in zip(dataset.category_ids, dataset.category_names) if n == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise TfcalError(f"category mapping: name {ref!r} is ambiguous in {dataset.path} "
                             f"(ids {hits})")
        if ref.strip().lstrip("-").isdigit() and int(ref) in dataset.coco.cats:
            return int(ref)
        raise TfcalError(f"category mapping: unknown category name or id in {dataset.path}, "
                         f"got {ref!r}")
    raise TfcalError(f"category mapping: category must be an id or a name, got {ref!r}")
