"""Tests of the synthetic COCO dataset generator `tfcal.demo.data`."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from tfcal.demo import data as shapes


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return shapes.generate_dataset(out, num_images=30, image_size=(96, 128), seed=3)


def test_same_seed_gives_identical_json_and_image_bytes(shapes_set, tmp_path):
    again = shapes.generate_dataset(tmp_path, num_images=30, image_size=(96, 128), seed=3)
    assert again.read_bytes() == shapes_set.read_bytes()
    doc = json.loads(shapes_set.read_text())
    for info in doc["images"]:
        first = (shapes_set.parent / "images" / info["file_name"]).read_bytes()
        assert (tmp_path / "images" / info["file_name"]).read_bytes() == first


def test_other_seed_gives_other_data(shapes_set, tmp_path):
    other = shapes.generate_dataset(tmp_path, num_images=30, image_size=(96, 128), seed=4)
    assert other.read_bytes() != shapes_set.read_bytes()


def test_render_scenes_match_written_images(shapes_set):
    doc = json.loads(shapes_set.read_text())
    scenes = shapes.render_scenes(3, image_size=(96, 128), seed=3)
    for scene, info in zip(scenes, doc["images"]):
        image = np.asarray(Image.open(shapes_set.parent / "images" / info["file_name"]))
        np.testing.assert_array_equal(image, scene.image)
        anns = [a for a in doc["annotations"] if a["image_id"] == info["id"]]
        np.testing.assert_allclose([a["bbox"] for a in anns], scene.boxes, atol=0.01)
        assert info["lighting"] == scene.lighting and info["camera"] == scene.camera


def test_coco_fields_and_boxes_inside_images(shapes_set):
    doc = json.loads(shapes_set.read_text())
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3, 4, 5]
    assert all({"id", "name", "supercategory"} <= set(c) for c in doc["categories"])
    images = {im["id"]: im for im in doc["images"]}
    assert len(images) == 30
    for im in doc["images"]:
        assert (im["width"], im["height"]) == (128, 96)
        assert im["lighting"] in ("day", "night") and im["camera"] in ("cam_a", "cam_b")
        with Image.open(shapes_set.parent / "images" / im["file_name"]) as png:
            assert png.size == (128, 96) and png.mode == "RGB"
    ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ids)) == len(ids)
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert w >= shapes.MIN_SIZE - 0.01 and h >= shapes.MIN_SIZE - 0.01
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < a["area"] <= w * h + 0.01
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3, 4, 5)


def test_pycocotools_loads_it(shapes_set):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(shapes_set))
    assert len(coco.getImgIds()) == 30
    assert coco.getCatIds() == [1, 2, 3, 4, 5]
    assert len(coco.getAnnIds()) >= 60


def test_scene_statistics_over_many_images():
    scenes = shapes.render_scenes(80, seed=11)
    cats = np.concatenate([s.category_ids for s in scenes])
    counts = np.bincount(cats, minlength=6)[1:]
    # Ring (5) is the rare class (about 1 object in 20); each other class is far more frequent.
    assert counts[4] > 0 and counts[4] * 2 < counts[:4].min()
    assert {s.lighting for s in scenes} == {"day", "night"}
    assert {s.camera for s in scenes} == {"cam_a", "cam_b"}
    # Crowded scenes and heavily overlapping same-class pairs (IoU in [0.3, 0.6]) both occur.
    assert max(len(s.boxes) for s in scenes) >= 8
    pairs = 0
    for s in scenes:
        for i in range(len(s.boxes)):
            ious = shapes._iou_xywh(s.boxes[i].astype(np.float64), s.boxes.astype(np.float64))
            same = (s.category_ids == s.category_ids[i]) & (np.arange(len(s.boxes)) > i)
            pairs += int(np.sum(same & (ious >= 0.3)))
    assert pairs >= 10
    night = np.mean([s.image.mean() for s in scenes if s.lighting == "night"])
    day = np.mean([s.image.mean() for s in scenes if s.lighting == "day"])
    assert night < 0.7 * day


@pytest.mark.parametrize("kwargs", [{"num_images": 0}, {"image_size": (32, 128)}])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError, match="must be >="):
        shapes.generate_dataset(tmp_path, **kwargs)


def test_project_validator_accepts_it(shapes_set):
    from tfcal.coco.dataset import load_coco

    ds = load_coco(shapes_set, shapes_set.parent / "images")
    assert ds.num_images == 30
