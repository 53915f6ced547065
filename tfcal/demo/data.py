"""Synthetic COCO-format shape dataset for the demo: scene rendering and `generate_dataset`.

Each image is a textured background (noise, gradient, stripes or checkerboard) with 2 to 10
filled, outlined shapes of five classes. Some scenes hold a same-class pair whose boxes overlap
heavily (IoU 0.3 to 0.6), so the NMS IoU threshold matters. Every COCO `images` entry carries two
image-level fields for subgroup reports:

- `lighting`: `"day"` or `"night"` (night: darker, lower contrast and noisier);
- `camera`: `"cam_a"` (sharp, slightly cool) or `"cam_b"` (blurred, warm colour cast).

Categories (id: name), with class 5 deliberately rare (about 1 object in 20):

| id | name | shape |
| --- | --- | --- |
| 1 | circle | filled ellipse, aspect 0.8 to 1.25 |
| 2 | square | filled rectangle, aspect 0.8 to 1.25 |
| 3 | triangle | filled isosceles triangle, pointing up or down |
| 4 | cross | plus sign |
| 5 | ring | ellipse with a hole |

Boxes are the shapes' full extents (`[x, y, width, height]` in pixels, inside the image) even
where a later shape covers part of an earlier one (a ring's hole shows the background, also
over an earlier shape). `area` is the shape's analytic area (at most the box area).
Everything is deterministic in `seed` (`np.random.default_rng`).

Example:
    >>> from tfcal.demo.data import generate_dataset
    >>> ann_path = generate_dataset("runs/shapes", num_images=400, seed=0)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
    {"id": 5, "name": "ring", "supercategory": "shape"},
)
NUM_CLASSES = len(CATEGORIES)
# Probability of each category id 1..5 for a new object; ring (5) is the rare class.
CLASS_PROBS = np.array([0.26, 0.26, 0.22, 0.21, 0.05])
LIGHTINGS = ("day", "night")
CAMERAS = ("cam_a", "cam_b")
DEFAULT_IMAGE_SIZE = (128, 128)
MIN_SIZE = 12   # pixels, shorter box side
MAX_SIZE = 44   # pixels, longer box side


@dataclasses.dataclass(frozen=True)
class Scene:
    """One rendered image and its objects.

    Attributes:
      image: uint8 `[height, width, 3]` RGB.
      boxes: float32 `[num_objects, 4]` COCO `[x, y, width, height]` in pixels.
      category_ids: int64 `[num_objects]`, in 1..5.
      areas: float32 `[num_objects]`, shape areas in square pixels.
      lighting: `"day"` or `"night"`.
      camera: `"cam_a"` or `"cam_b"`.
    """

    image: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    areas: np.ndarray
    lighting: str
    camera: str


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 `[height, width, 3]` texture in [0, 255]."""
    base = rng.uniform(40, 215, size=3)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # smooth noise: coarse random grid, upsampled
        coarse = rng.normal(0, 30, size=(height // 16 + 1, width // 16 + 1, 3))
        img = np.kron(coarse, np.ones((16, 16, 1)))[:height, :width] + base
    elif kind == 1:  # linear gradient between two colours
        other = rng.uniform(40, 215, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + t[..., None] * (other - base)
    elif kind == 2:  # stripes
        period = rng.uniform(6, 20)
        angle = rng.uniform(0, math.pi)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        amp = rng.uniform(15, 45)
        img = base + amp * np.sign(np.sin(2 * math.pi * phase))[..., None]
    else:  # checkerboard
        cell = int(rng.integers(6, 17))
        amp = rng.uniform(15, 40)
        check = ((yy // cell + xx // cell) % 2) * 2 - 1
        img = base + amp * check[..., None]
    img = img + rng.normal(0, 6, size=(height, width, 3))
    return img.astype(np.float32)


def _shape_size(rng: np.random.Generator) -> tuple[float, float]:
    side = rng.uniform(MIN_SIZE, MAX_SIZE)
    aspect = rng.uniform(0.8, 1.25)
    w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
    return (float(np.clip(w, MIN_SIZE, MAX_SIZE)), float(np.clip(h, MIN_SIZE, MAX_SIZE)))


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box `a` [4] with boxes `b` [n, 4], both COCO xywh."""
    x1 = np.maximum(a[0], b[:, 0])
    y1 = np.maximum(a[1], b[:, 1])
    x2 = np.minimum(a[0] + a[2], b[:, 0] + b[:, 2])
    y2 = np.minimum(a[1] + a[3], b[:, 1] + b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (a[2] * a[3] + b[:, 2] * b[:, 3] - inter)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cat: int,
                box: np.ndarray, fill: tuple, outline: tuple) -> float:
    """Draws category `cat` filling COCO box `box`; returns the shape's area."""
    x, y, w, h = (float(v) for v in box)
    x2, y2 = x + w, y + h
    if cat == 1:
        draw.ellipse([x, y, x2, y2], fill=fill, outline=outline, width=1)
        return math.pi * w * h / 4
    if cat == 2:
        draw.rectangle([x, y, x2, y2], fill=fill, outline=outline, width=1)
        return w * h
    if cat == 3:
        if rng.random() < 0.5:
            pts = [(x + w / 2, y), (x2, y2), (x, y2)]
        else:
            pts = [(x, y), (x2, y), (x + w / 2, y2)]
        draw.polygon(pts, fill=fill, outline=outline)
        return w * h / 2
    if cat == 4:
        tw, th = w * rng.uniform(0.28, 0.4), h * rng.uniform(0.28, 0.4)
        cx, cy = x + w / 2, y + h / 2
        pts = [(cx - tw / 2, y), (cx + tw / 2, y), (cx + tw / 2, cy - th / 2),
               (x2, cy - th / 2), (x2, cy + th / 2), (cx + tw / 2, cy + th / 2),
               (cx + tw / 2, y2), (cx - tw / 2, y2), (cx - tw / 2, cy + th / 2),
               (x, cy + th / 2), (x, cy - th / 2), (cx - tw / 2, cy - th / 2)]
        draw.polygon(pts, fill=fill, outline=outline)
        return w * th + h * tw - tw * th
    # ring: the caller punches the hole (the background shows through it)
    draw.ellipse([x, y, x2, y2], fill=fill, outline=outline, width=1)
    return math.pi * w * h / 4


def render_scene(rng: np.random.Generator,
                 image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Scene:
    """Renders one random scene.

    Args:
      rng: the random generator; the scene is a pure function of its state.
      image_size: `(height, width)` in pixels, each >= 64.

    Returns:
      A `Scene`.
    """
    height, width = image_size
    lighting = LIGHTINGS[int(rng.random() < 0.3)]
    camera = CAMERAS[int(rng.random() < 0.4)]
    bg = _background(rng, height, width)
    background = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    canvas = background.copy()
    draw = ImageDraw.Draw(canvas)
    boxes: list[np.ndarray] = []
    cats: list[int] = []
    areas: list[float] = []
    n_target = int(rng.integers(2, 11))
    want_pair = rng.random() < 0.35
    attempts = 0
    while len(boxes) < n_target and attempts < 60:
        attempts += 1
        pair = want_pair and len(boxes) > 0 and attempts % 3 == 0
        if pair:
            # A same-class neighbour shifted so that the two boxes overlap heavily.
            ref = int(rng.integers(len(boxes)))
            cat = cats[ref]
            rx, ry, rw, rh = boxes[ref]
            w = float(np.clip(rw * rng.uniform(0.85, 1.15), MIN_SIZE, MAX_SIZE))
            h = float(np.clip(rh * rng.uniform(0.85, 1.15), MIN_SIZE, MAX_SIZE))
            if rng.random() < 0.5:  # mostly side by side
                dx, dy = rng.uniform(0.2, 0.45), rng.uniform(0.0, 0.3)
            else:  # mostly one above the other
                dx, dy = rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.45)
            x = rx + rng.choice([-1, 1]) * rw * dx
            y = ry + rng.choice([-1, 1]) * rh * dy
        else:
            cat = int(rng.choice(NUM_CLASSES, p=CLASS_PROBS)) + 1
            w, h = _shape_size(rng)
            x = rng.uniform(0, width - w - 1)
            y = rng.uniform(0, height - h - 1)
        box = np.array([x, y, w, h], dtype=np.float64)
        if box[0] < 0 or box[1] < 0 or box[0] + w > width - 1 or box[1] + h > height - 1:
            continue
        if boxes:
            ious = _iou_xywh(box, np.stack(boxes))
            if pair:
                others = np.delete(ious, ref)
                if not 0.3 <= ious[ref] <= 0.6 or (others.size and others.max() > 0.2):
                    continue
                want_pair = False
            elif ious.max() > 0.2:
                continue
        colour = rng.uniform(0, 255, size=3)
        # Keep the shape distinguishable from the local background.
        patch = bg[int(y):int(y + h) + 1, int(x):int(x + w) + 1].reshape(-1, 3).mean(0)
        if np.abs(colour - patch).sum() < 150:
            colour = np.where(patch > 127, patch - 130, patch + 130)
        fill = tuple(int(c) for c in np.clip(colour, 0, 255))
        outline = tuple(int(c) for c in np.clip(colour * 0.5, 0, 255))
        area = _draw_shape(draw, rng, cat, box, fill, outline)
        if cat == 5:
            ring_w = max(2.0, rng.uniform(0.2, 0.3) * min(w, h))
            hole = [x + ring_w, y + ring_w, x + w - ring_w, y + h - ring_w]
            mask = Image.new("L", (width, height), 0)
            ImageDraw.Draw(mask).ellipse(hole, fill=255)
            canvas.paste(background, (0, 0), mask)
            draw.ellipse(hole, outline=outline, width=1)
            area -= math.pi * (w - 2 * ring_w) * (h - 2 * ring_w) / 4
        boxes.append(box)
        cats.append(cat)
        areas.append(float(area))

    if camera == "cam_b":
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 1.4))))
    img = np.asarray(canvas, dtype=np.float32)
    if camera == "cam_b":
        img = img * np.array([1.08, 1.0, 0.85], dtype=np.float32) + np.array([10, 4, 0])
    else:
        img = img * np.array([0.95, 1.0, 1.05], dtype=np.float32)
    if lighting == "night":
        img = img * rng.uniform(0.3, 0.5) + rng.normal(0, 12, size=img.shape)
    else:
        img = img + rng.normal(0, 3, size=img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Scene(
        image=image,
        boxes=(np.round(np.stack(boxes), 2).astype(np.float32) if boxes
               else np.zeros((0, 4), np.float32)),
        category_ids=np.asarray(cats, dtype=np.int64),
        areas=np.round(np.asarray(areas, dtype=np.float32), 2),
        lighting=lighting,
        camera=camera,
    )


def render_scenes(num_images: int, *, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                  seed: int = 0) -> list[Scene]:
    """Renders `num_images` scenes in memory, identical to what `generate_dataset` writes."""
    rng = np.random.default_rng(seed)
    return [render_scene(rng, image_size) for _ in range(num_images)]


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate_dataset(out_dir: str | Path, *, num_images: int = 400,
                     image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, seed: int = 0) -> Path:
    """Writes a synthetic COCO-format dataset: `out_dir/images/*.png` and `out_dir/instances.json`.

    Args:
      out_dir: directory to write into (created if needed). Existing files of the same names
        are overwritten.
      num_images: number of images, >= 1.
      image_size: `(height, width)` in pixels, each >= 64.
      seed: seed of `np.random.default_rng`; the same seed gives identical JSON and PNG bytes.

    Returns:
      The path of `instances.json`. Its `images` entries hold `id`, `file_name` (relative to
      `out_dir/images`), `width`, `height`, `lighting` and `camera`; `annotations` hold `id`,
      `image_id`, `category_id`, `bbox` `[x, y, width, height]`, `area` and `iscrowd` (0);
      `categories` are `CATEGORIES`.

    Raises:
      ValueError: `num_images` < 1 or an image side < 64.
    """
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    height, width = (int(v) for v in image_size)
    if height < 64 or width < 64:
        raise ValueError(f"image_size sides must be >= 64, got {tuple(image_size)}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, int(num_images) + 1):
        scene = render_scene(rng, (height, width))
        file_name = f"{image_id:06d}.png"
        (images_dir / file_name).write_bytes(_png_bytes(scene.image))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "lighting": scene.lighting, "camera": scene.camera})
        for box, cat, area in zip(scene.boxes, scene.category_ids, scene.areas):
            bbox = [round(float(v), 2) for v in box]
            area = min(round(float(area), 2), round(bbox[2] * bbox[3], 2))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cat),
                "bbox": bbox, "area": area, "iscrowd": 0})
    doc = {
        "info": {"description": "tfcal synthetic shapes", "version": "1.0",
                 "seed": int(seed), "num_images": int(num_images)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    ann_path = out_dir / "instances.json"
    tmp = ann_path.with_name(f".{ann_path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(ann_path)
    return ann_path
