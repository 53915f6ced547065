"""Generated COCO ground truth and detections for the tfcal.coco tests (seeded, no files needed)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np

from tfcal.raw.cache import meta_checksum

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def make_gt(seed: int, *, num_images: int = 20, num_categories: int = 5,
            max_boxes: int = 8, crowd_fraction: float = 0.1) -> dict:
    """A COCO instances dict: boxes in [0, 640) x [0, 480), some crowd, some empty images.

    The last category never has ground truth; category ids are spaced (2, 4, ...) so that ids
    and columns differ.
    """
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + i, "file_name": f"img_{i:04d}.jpg", "width": 640, "height": 480}
              for i in range(num_images)]
    categories = [{"id": 2 * (k + 1), "name": f"class_{k}"} for k in range(num_categories)]
    anns = []
    for img in images:
        for _ in range(int(rng.integers(0, max_boxes + 1))):
            w, h = rng.uniform(8, 200, size=2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = categories[int(rng.integers(0, max(num_categories - 1, 1)))]["id"]
            crowd = int(rng.random() < crowd_fraction)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "bbox": [float(x), float(y), float(w), float(h)],
                         "area": float(w * h), "iscrowd": crowd})
    return {"images": images, "annotations": anns, "categories": categories}


def make_results(gt: dict, seed: int, *, per_gt: int = 3, extra: int = 10,
                 tie_decimals: int = 1, skip_images: int = 2) -> list[dict]:
    """Detections jittered around ground truth (several per box, so duplicates compete), plus
    random false positives. Scores are rounded to `tie_decimals` to force ties. The first
    `skip_images` images get no detections."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    skipped = {img["id"] for img in gt["images"][:skip_images]}
    out = []
    for ann in gt["annotations"]:
        if ann["image_id"] in skipped:
            continue
        x, y, w, h = ann["bbox"]
        for _ in range(int(rng.integers(0, per_gt + 1))):
            j = rng.normal(0, 0.15, size=4) * [w, h, w, h]
            out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [float(x + j[0]), float(y + j[1]), float(max(w + j[2], 1.0)),
                                 float(max(h + j[3], 1.0))],
                        "score": round(float(rng.random()), tie_decimals)})
    for img in gt["images"][skip_images:]:
        for _ in range(int(rng.integers(0, extra + 1))):
            w, h = rng.uniform(8, 200, size=2)
            out.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                        "bbox": [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)),
                                 float(w), float(h)],
                        "score": round(float(rng.random()), tie_decimals)})
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def coco_from_dict(data: dict):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(data)
        coco.createIndex()
    return coco


def reference_matches(gt: dict, results: list[dict], iou: float, max_dets: int,
                      image_ids=None):
    """pycocotools COCOeval.evaluateImg at one IoU, area range all: concatenated (in evalImgs
    order) det rows (0-based index into `results`), dtMatches (gt id, 0 = none), dtIgnore."""
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_from_dict(gt)
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.maxDets = [max_dets]
        ev.params.areaRng = [[0 ** 2, 1e5 ** 2]]
        ev.params.areaRngLbl = ["all"]
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
    rows, matches, ignore = [], [], []
    for e in ev.evalImgs:
        if e is None:
            continue
        rows.extend(i - 1 for i in e["dtIds"])
        matches.extend(e["dtMatches"][0].tolist())
        ignore.extend(e["dtIgnore"][0].tolist())
    return (np.array(rows, dtype=np.int64), np.array(matches, dtype=np.int64),
            np.array(ignore, dtype=bool))


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_images(folder: Path, gt: dict, seed: int = 0, *, fmt_cycle=("PNG", "JPEG")) -> Path:
    """Writes a small RGB image for every entry of `gt["images"]` (format by position)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(gt["images"]):
        pixels = rng.integers(0, 256, size=(img["height"], img["width"], 3), dtype=np.uint8)
        fmt = fmt_cycle[i % len(fmt_cycle)]
        Image.fromarray(pixels).save(folder / img["file_name"], format=fmt)
    return folder


def edit_cache_meta(path: Path, **fields) -> None:
    """Rewrites a cache's meta.json with `fields` and a matching checksum (a consistent file
    with wrong or stale content)."""
    meta = json.loads((path / "meta.json").read_text())
    meta.update(fields)
    del meta["meta_sha256"]
    meta["meta_sha256"] = meta_checksum(meta)
    (path / "meta.json").write_text(json.dumps(meta))
