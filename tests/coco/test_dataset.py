"""Tests for tfcal.coco.dataset: validation errors, image checks, category mapping."""

import copy
import json

import numpy as np
import pytest

from tfcal import TfcalError
from tfcal.coco.dataset import CategoryMapping, load_coco

from .cocogen import make_gt, write_images, write_json


def _small_gt():
    gt = make_gt(0, num_images=3, num_categories=3, max_boxes=3, crowd_fraction=0.0)
    gt["annotations"] = gt["annotations"][:4]
    gt["annotations"][0]["iscrowd"] = 1
    return gt


def test_load_valid(tmp_path):
    gt = _small_gt()
    ds = load_coco(write_json(tmp_path / "instances.json", gt))
    assert ds.image_ids.tolist() == [100, 101, 102]
    assert ds.category_ids.tolist() == [2, 4, 6]
    assert ds.category_names == ("class_0", "class_1", "class_2")
    assert ds.ann_bboxes.shape == (4, 4) and ds.ann_bboxes.dtype == np.float64
    assert ds.ann_iscrowd.tolist() == [True, False, False, False]
    assert ds.image_paths is None
    assert len(ds.coco.getAnnIds()) == 4
    assert ds.image_index([102, 100]).tolist() == [2, 0]


def test_load_is_silent(tmp_path, capsys):
    load_coco(write_json(tmp_path / "instances.json", _small_gt()))
    assert capsys.readouterr().out == ""


def test_missing_area_and_iscrowd_get_defaults(tmp_path):
    gt = _small_gt()
    ann = gt["annotations"][1]
    del ann["area"], ann["iscrowd"]
    ds = load_coco(write_json(tmp_path / "instances.json", gt))
    assert ds.ann_areas[1] == ann["bbox"][2] * ann["bbox"][3]
    assert ds.coco.anns[ann["id"]]["iscrowd"] == 0


def _set(path, value):
    def edit(gt):
        obj = gt
        for key in path[:-1]:
            obj = obj[key]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return edit


BAD = [
    ("missing images", _set(["images"], KeyError), "images: missing key"),
    ("images not list", _set(["images"], {}), "images: must be a list"),
    ("missing image id", _set(["images", 1, "id"], KeyError), "images[1].id: missing key"),
    ("missing file_name", _set(["images", 0, "file_name"], KeyError),
     "images[0].file_name: missing key"),
    ("missing width", _set(["images", 0, "width"], KeyError), "images[0].width: missing key"),
    ("zero height", _set(["images", 2, "height"], 0), "images[2].height: must be an integer > 0"),
    ("missing ann bbox", _set(["annotations", 2, "bbox"], KeyError),
     "annotations[2].bbox: missing key"),
    ("missing ann image_id", _set(["annotations", 0, "image_id"], KeyError),
     "annotations[0].image_id: missing key"),
    ("missing category_id", _set(["annotations", 0, "category_id"], KeyError),
     "annotations[0].category_id: missing key"),
    ("negative width", _set(["annotations", 3, "bbox", 2], -3.0),
     "annotations[3].bbox: width must be > 0, got -3.0"),
    ("zero height", _set(["annotations", 1, "bbox", 3], 0),
     "annotations[1].bbox: height must be > 0, got 0"),
    ("nan x", _set(["annotations", 1, "bbox", 0], float("nan")),
     "annotations[1].bbox: x must be finite, got nan"),
    ("inf width", _set(["annotations", 1, "bbox", 2], float("inf")),
     "annotations[1].bbox: width must be finite, got inf"),
    ("short bbox", _set(["annotations", 1, "bbox"], [1, 2, 3]),
     "annotations[1].bbox: must be a list [x, y, width, height], got [1, 2, 3]"),
    ("string coord", _set(["annotations", 1, "bbox", 1], "7"),
     "annotations[1].bbox: y must be a number, got '7'"),
    ("duplicate image id", _set(["images", 2, "id"], 100),
     "images[2].id: duplicate image id (also images[0]), got 100"),
    ("duplicate ann id", _set(["annotations", 3, "id"], 1),
     "annotations[3].id: duplicate annotation id (also annotations[0]), got 1"),
    ("duplicate category id", _set(["categories", 1, "id"], 2),
     "categories[1].id: duplicate category id (also categories[0]), got 2"),
    ("unknown image", _set(["annotations", 2, "image_id"], 999),
     "annotations[2].image_id: unknown image id, got 999"),
    ("unknown category", _set(["annotations", 2, "category_id"], 7),
     "annotations[2].category_id: unknown category id, got 7"),
    ("bool id", _set(["annotations", 2, "id"], True), "annotations[2].id: must be an integer"),
    ("negative area", _set(["annotations", 2, "area"], -1.0),
     "annotations[2].area: must be a finite number >= 0, got -1.0"),
]


@pytest.mark.parametrize("name,edit,message", BAD, ids=[b[0] for b in BAD])
def test_bad_annotations(tmp_path, name, edit, message):
    gt = copy.deepcopy(_small_gt())
    edit(gt)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))  # NaN/Infinity are written as JSON extensions
    with pytest.raises(TfcalError) as err:
        load_coco(path)
    text = str(err.value)
    assert text == f"{path}: {message}" or text.startswith(f"{path}: {message}"), text
    assert "\n" not in text


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(TfcalError, match=r"instances\.json: invalid JSON"):
        load_coco(path)
    with pytest.raises(TfcalError, match="file not found"):
        load_coco(tmp_path / "nope.json")
    path.write_text("[1, 2]")
    with pytest.raises(TfcalError, match=r"\(top level\): must be an object"):
        load_coco(path)


def test_images_checked(tmp_path):
    gt = _small_gt()
    images = write_images(tmp_path / "images", gt)
    path = write_json(tmp_path / "instances.json", gt)
    ds = load_coco(path, images)
    assert [p.name for p in ds.image_paths] == [i["file_name"] for i in gt["images"]]

    (images / gt["images"][1]["file_name"]).unlink()
    with pytest.raises(TfcalError, match=r"images\[1\]\.file_name: image file not found"):
        load_coco(path, images)
    load_coco(path, images, check_images=False)  # no check requested

    (images / gt["images"][1]["file_name"]).write_bytes(b"<html>not an image</html>")
    with pytest.raises(TfcalError, match=r"images\[1\]\.file_name: not a JPEG/PNG"):
        load_coco(path, images)
    (images / gt["images"][1]["file_name"]).write_bytes(b"")
    with pytest.raises(TfcalError, match=r"images\[1\]\.file_name: not a JPEG/PNG"):
        load_coco(path, images)
    with pytest.raises(TfcalError, match="images folder not found"):
        load_coco(path, tmp_path / "missing")


def test_unreadable_image(tmp_path):
    gt = _small_gt()
    images = write_images(tmp_path / "images", gt)
    path = write_json(tmp_path / "instances.json", gt)
    (images / gt["images"][0]["file_name"]).unlink()
    (images / gt["images"][0]["file_name"]).mkdir()  # a folder cannot be read as a file
    with pytest.raises(TfcalError, match=r"images\[0\]\.file_name: image file unreadable"):
        load_coco(path, images)


def test_mapping_odapi_default(dataset):
    m = CategoryMapping.odapi(dataset, num_classes=6)  # column k -> id k + 1
    assert m.column_category_ids.tolist() == [-1, 2, -1, 4, -1, 6]
    assert m.used_columns.tolist() == [1, 3, 5]
    assert m.category_ids.tolist() == [2, 4, 6]
    assert m.column_of(4) == 3
    assert m.columns_to_category_ids(np.array([5, 1, 0])).tolist() == [6, 2, -1]
    m0 = CategoryMapping.odapi(dataset, num_classes=7, label_offset=0)
    assert m0.column_category_ids.tolist() == [-1, -1, 2, -1, 4, -1, 6]


def test_mapping_odapi_too_few_columns(dataset):
    with pytest.raises(TfcalError, match=r"1 categories have no score column .*\[6\]"):
        CategoryMapping.odapi(dataset, num_classes=4)
    m = CategoryMapping.odapi(dataset, num_classes=4, allow_unmapped=True)
    assert m.unmapped_category_ids == (6,)


def test_mapping_explicit(dataset):
    by_name = CategoryMapping.explicit(dataset, {0: "class_2", 1: "class_0", 2: 4}, 3)
    assert by_name.column_category_ids.tolist() == [6, 2, 4]
    as_list = CategoryMapping.explicit(dataset, ["class_2", None, "class_0", 4], 4)
    assert as_list.column_category_ids.tolist() == [6, -1, 2, 4]
    config_form = CategoryMapping.from_category_columns(
        dataset, {"class_2": 0, "2": 1, "4": 2}, 3)
    assert config_form.column_category_ids.tolist() == [6, 2, 4]
    built = CategoryMapping.build(dataset, 3, category_columns={"class_2": 0, "2": 1, "4": 2})
    assert built.column_category_ids.tolist() == [6, 2, 4]
    assert CategoryMapping.build(dataset, 6).column_category_ids.tolist() == [-1, 2, -1, 4, -1, 6]


@pytest.mark.parametrize("mapping,num_classes,message", [
    ({0: "nope", 1: 2, 2: 4}, 3, "unknown category name or id"),
    ({0: 99, 1: 2, 2: 4}, 3, "unknown category id"),
    ({0: 2, 3: 4, 1: 6}, 3, r"column must be an integer in \[0, 3\), got 3"),
    ({0: 2, 1: "class_0", 2: 6}, 3, "mapped to two columns"),
    ({0: 2, 1: 4}, 3, "no score column"),
])
def test_mapping_explicit_errors(dataset, mapping, num_classes, message):
    with pytest.raises(TfcalError, match=message):
        CategoryMapping.explicit(dataset, mapping, num_classes)


def test_mapping_ambiguous_name(tmp_path):
    gt = make_gt(1, num_images=2, num_categories=3)
    gt["categories"][1]["name"] = "class_0"
    ds = load_coco(write_json(tmp_path / "instances.json", gt))
    with pytest.raises(TfcalError, match="ambiguous"):
        CategoryMapping.explicit(ds, {0: "class_0"}, 3, allow_unmapped=True)
