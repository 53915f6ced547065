"""Tests for tfcal.coco.boxes: box formats and the box sanity check before tuning.

The demo detector's real outputs on 40 synthetic images are stored deliberately transposed
(xyxy), as centre-size boxes (cxcywh) and in pixels: each is refused with one line naming
`model.box_format` (exit 2 through the CLI), the right layout passes, and declaring the layout
converts it back to the original boxes. The check's AP equals pycocotools' AP50.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from tfcal import TfcalError
from tfcal.coco import boxes as box_lib
from tfcal.coco.boxes import normalized_to_coco_xywh
from tfcal.coco.dataset import CategoryMapping, load_coco
from tfcal.raw import RawOutputs

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
NANODET = SHARED / "models" / "nanodet_odapi"
TINY = SHARED / "data" / "coco_val2017_tiny"


def _xyxy(b):
    return b[..., [1, 0, 3, 2]]


def _cxcywh(b):
    y0, x0, y1, x1 = np.moveaxis(b, -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo detector's raw outputs on 40 generated images, as an npz, and its dataset."""
    from tfcal.coco.runner import run_detector
    from tfcal.demo.data import generate_dataset
    from tfcal.demo.run import DETECTOR_DIR

    root = tmp_path_factory.mktemp("demo_boxes")
    ann = generate_dataset(root / "data", num_images=40, seed=7)
    ds = load_coco(ann, root / "data" / "images")
    raw = run_detector(DETECTOR_DIR, ds, batch_size=8, progress=False)
    arrays = {"image_ids": raw.image_ids, "boxes": np.asarray(raw.boxes),
              "scores": np.asarray(raw.scores)}
    return root, ann, ds, arrays


def _raw_outputs_config(root: Path, ann: Path, arrays: dict, name: str, save=np.savez,
                        **model) -> Path:
    save(root / f"{name}.npz", **arrays)
    cfg = {"model": {"raw_outputs": f"{name}.npz", "score_converter": "sigmoid", **model},
           "data": {"annotations": str(ann)}, "calibration": {"method": "none"},
           "output": {"dir": f"out_{name}"}, "export": {"enabled": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _prepare(path):
    from tfcal.config import load_config
    from tfcal.tuning.prepare import prepare

    return prepare(load_config(path))


def test_to_yxyx_hand_values():
    b = np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)  # as each format reads it
    np.testing.assert_allclose(box_lib.to_yxyx(b, "yxyx"), b)
    np.testing.assert_allclose(box_lib.to_yxyx(b, "xyxy"), [[0.2, 0.1, 0.6, 0.5]])
    # centre (0.1, 0.2), size 0.5 x 0.6: y in [0.2 - 0.3, 0.2 + 0.3], x in [0.1 - 0.25, ...],
    # clipped to [0, 1].
    np.testing.assert_allclose(box_lib.to_yxyx(b, "cxcywh"), [[0.0, 0.0, 0.5, 0.35]],
                               atol=1e-7)
    with pytest.raises(ValueError, match="box_format must be one of"):
        box_lib.to_yxyx(b, "xywh")


def test_inverted_share():
    b = np.array([[0, 0, 1, 1], [0.5, 0, 0.4, 1], [0, 0.5, 1, 0.4], [0, 0, 0, 0]], np.float32)
    assert box_lib.inverted_share(b) == 0.5  # equal corners are not inverted
    assert box_lib.inverted_share(np.zeros((0, 4))) == 0.0


def test_sample_ap_equals_pycocotools_ap50(demo):
    from tfcal.coco.evaluation import coco_stats
    from tfcal.coco.matching import Detections

    _, _, ds, a = demo
    raw = RawOutputs(a["image_ids"], a["boxes"], a["scores"], ds.image_heights,
                     ds.image_widths)
    mapping = CategoryMapping.odapi(ds, a["scores"].shape[-1] - 1)
    sample = box_lib.sample_candidates(raw, background_column=True, num_images=25)
    ap, num_gt = box_lib.sample_ap(sample, sample.boxes, ds, mapping, match_iou=0.5)
    idx = sample.image_index
    xywh = normalized_to_coco_xywh(sample.boxes[:, None], ds.image_heights[idx],
                                   ds.image_widths[idx])[:, 0]
    dets = Detections.from_arrays(ds.image_ids[idx], mapping.columns_to_category_ids(
        sample.column), xywh, sample.score)
    ref = coco_stats(ds, dets, image_ids=ds.image_ids[sample.rows])["AP50"]
    assert num_gt >= box_lib.MIN_GT
    assert ap == pytest.approx(ref, abs=1e-12)
    assert ap > 0.3  # the demo detector finds its shapes


def test_correct_layout_passes(demo, caplog):
    root, ann, _, a = demo
    prep = _prepare(_raw_outputs_config(root, ann, a, "yxyx"))
    np.testing.assert_array_equal(prep.raw.boxes, a["boxes"])


@pytest.mark.parametrize("fmt,convert", [("xyxy", _xyxy), ("cxcywh", _cxcywh)])
def test_declared_layout_is_converted_at_load(demo, fmt, convert):
    root, ann, _, a = demo
    stored = dict(a, boxes=convert(a["boxes"]).astype(np.float32))
    prep = _prepare(_raw_outputs_config(root, ann, stored, f"declared_{fmt}", box_format=fmt))
    np.testing.assert_allclose(prep.raw.boxes, np.clip(a["boxes"], 0, 1), atol=2e-6)


def test_xyxy_boxes_read_as_yxyx_are_refused_with_the_fix(demo):
    root, ann, _, a = demo
    path = _raw_outputs_config(root, ann, dict(a, boxes=_xyxy(a["boxes"])), "xyxy")
    with pytest.raises(TfcalError) as err:
        _prepare(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path.with_suffix(".npz")))
    assert "model.box_format: yxyx" in msg and "xyxy gives" in msg
    assert "model.label_offset" in msg


def test_centre_size_boxes_are_refused_as_inverted(demo):
    root, ann, _, a = demo
    path = _raw_outputs_config(root, ann, dict(a, boxes=_cxcywh(a["boxes"]).astype(np.float32)),
                               "cxcywh")
    with pytest.raises(TfcalError, match=r"ymin > ymax or xmin > xmax as model.box_format: "
                                         r"yxyx reads them; set model.box_format .*cxcywh"):
        _prepare(path)


def test_class_columns_that_do_not_line_up_are_refused(demo):
    root, ann, ds, a = demo
    names = [ds.category_name(int(c)) for c in ds.category_ids]
    rotated = {name: (i + 1) % len(names) for i, name in enumerate(names)}  # every column wrong
    path = _raw_outputs_config(root, ann, a, "rotated", category_columns=rotated)
    with pytest.raises(TfcalError, match=r"AP 0\.0\d\d at tuning.match_iou 0.5 .* check "
                                         r"model.box_format and model.label_offset / "
                                         r"model.category_columns$"):
        _prepare(path)


def test_bad_layouts_exit_2_with_one_line_through_the_cli(demo, capsys):
    from tfcal.cli import main

    root, ann, ds, a = demo
    scale = np.array([ds.image_heights[0], ds.image_widths[0]] * 2, np.float32)
    for name, boxes, save in (("cli_xyxy", _xyxy(a["boxes"]), np.savez),
                              ("cli_cxcywh", _cxcywh(a["boxes"]).astype(np.float32), np.savez),
                              ("cli_pixels", a["boxes"] * scale, np.savez),
                              # converted batch by batch first: refused before it is kept
                              ("cli_pixels_packed", a["boxes"] * scale, np.savez_compressed)):
        path = _raw_outputs_config(root, ann, dict(a, boxes=boxes), name, save=save)
        assert main(["tune", str(path), "--no-export"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "model.box_format" in err or "pixel coordinates" in err, err
        assert not (root / f"out_{name}").exists()


def test_box_format_needs_raw_outputs(tmp_path):
    from tfcal.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"saved_model": "m", "box_format": "xyxy"},
                                    "data": {"annotations": "a.json"}}))
    with pytest.raises(TfcalError, match=r"c.yaml: model.box_format: must be yxyx with a "
                                         r"detector model"):
        load_config(path)
    path.write_text(yaml.safe_dump({"model": {"raw_outputs": "r.npz", "box_format": "xywh"},
                                    "data": {"annotations": "a.json"}}))
    with pytest.raises(TfcalError, match=r"model.box_format: must be one of yxyx \| xyxy"):
        load_config(path)


@pytest.mark.slow
@pytest.mark.skipif(not (NANODET / "saved_model.pb").exists()
                    or not (TINY / "instances_val2017.json").exists(),
                    reason=f"real model and data not found under {SHARED} "
                           "(models/nanodet_odapi, data/coco_val2017_tiny)")
def test_no_false_alarm_on_nanodet_outputs(tmp_path):
    """NanoDet-g's real outputs on the 50 shared val2017 images pass; transposed, they do not."""
    from tfcal.coco.runner import run_detector

    ds = load_coco(TINY / "instances_val2017.json", TINY / "images")
    raw = run_detector(NANODET, ds, cache_dir=tmp_path / "cache", progress=False)
    mapping = CategoryMapping.odapi(ds, raw.num_score_columns - 1)
    found = box_lib.check_boxes(raw, ds, mapping, box_format="yxyx", background_column=True,
                                match_iou=0.5, source=str(NANODET))
    assert found["inverted_share"] < 0.01
    assert found["ap"] > 0.1 and found["num_gt"] > 100  # 0.196 on the 800 images (no NMS)
    transposed = dataclasses.replace(raw, boxes=_xyxy(np.asarray(raw.boxes)))
    with pytest.raises(TfcalError, match=r"model.box_format \(xyxy gives 0\.[1-9]"):
        box_lib.check_boxes(transposed, ds, mapping, box_format="yxyx", background_column=True,
                            match_iou=0.5, source=str(NANODET))


def test_per_class_boxes_are_sampled_with_their_class(demo):

    _, _, ds, a = demo
    k = a["scores"].shape[-1] - 1
    decoy = np.array([0.0, 0.0, 0.01, 0.01], np.float32)  # never the right box
    per_class = np.broadcast_to(decoy, a["boxes"].shape[:2] + (k, 4)).copy()
    owner = a["scores"][..., 1:].argmax(-1)
    ii, nn = np.indices(owner.shape)
    per_class[ii, nn, owner] = a["boxes"]
    raw = RawOutputs(a["image_ids"], per_class, a["scores"], ds.image_heights, ds.image_widths)
    mapping = CategoryMapping.odapi(ds, k)
    sample = box_lib.sample_candidates(raw, background_column=True, num_images=10)
    top = sample.score >= np.quantile(sample.score, 0.9)  # the owners' own columns
    assert not (sample.boxes[top] == decoy).all(axis=1).any()
    found = box_lib.check_boxes(raw, ds, mapping, box_format="yxyx", background_column=True,
                                match_iou=0.5, source="raw")
    assert found["ap"] > 0.3


@pytest.mark.parametrize("n,k,top_k", [(50, 7, 20), (3, 4, 10), (30, 1, 30)])
def test_sample_candidates_are_the_top_entries_over_boxes_and_classes(n, k, top_k):

    rng = np.random.default_rng(n + k)
    scores = rng.random((11, n, 1 + k), dtype=np.float32)  # continuous: no ties
    boxes = rng.random((11, n, k, 4), dtype=np.float32)  # per class: each entry's box unique
    raw = RawOutputs(np.arange(11), boxes, scores, np.ones(11), np.ones(11))
    s = box_lib.sample_candidates(raw, background_column=True, num_images=5, top_k=top_k)
    np.testing.assert_array_equal(s.rows, [0, 2, 5, 8, 10])
    for row in s.rows:  # brute force: sort every (box, class) entry of the image
        flat = scores[row, :, 1:].ravel()
        want = np.sort(np.argsort(-flat)[:min(top_k, n * k)])
        m = s.image_index == row
        box_of = [np.flatnonzero((boxes[row, :, c] == b).all(axis=1))[0]
                  for c, b in zip(s.column[m], s.boxes[m])]
        got = np.sort(np.array(box_of) * k + s.column[m])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(np.sort(s.score[m]), np.sort(flat[want]))


def test_normalized_to_coco_xywh():
    # ymin, xmin, ymax, xmax = 0.1, 0.2, 0.5, 0.6 on a 200 (h) x 100 (w) image:
    # x = 20, y = 20, width = 40, height = 80.
    out = normalized_to_coco_xywh(np.array([[[0.1, 0.2, 0.5, 0.6]]]), np.array([200]),
                                  np.array([100]))
    np.testing.assert_allclose(out, [[[20.0, 20.0, 40.0, 80.0]]])
