"""The tuner with `tuning.soft_nms_sigma` and `tuning.clip_window`: what the served graph emits.

The search cuts the candidates of `matched_candidates` at each threshold; for that to be the
served post-processing, `collect_candidates` at a low threshold, cut at `t`, must equal the
exported `PostProcessor` at `t` with the same soft-NMS (an exactness argument in `tfcal.ops`).
"""

from __future__ import annotations

import json

import numpy as np

import known_answer as ka
from tfcal.config import load_config
from tfcal.layers import PostProcessor
from tfcal.ops import NmsOptions
from tfcal.postprocess import PostProcessConfig
from tfcal.tuning.candidates import collect_candidates
from tfcal.tuning.pipeline import run_tune


def _calibrate(raw_scores):
    return raw_scores[..., 1:]  # sigmoid scores, no calibration: drop the background column


def test_candidates_cut_at_a_threshold_equal_the_served_soft_nms():
    coco, raw = ka.build(list(range(1, 5)))
    batches = [(raw["image_ids"], raw["boxes"], raw["scores"])]
    sigma = 0.5
    cands = collect_candidates(batches, _calibrate, (0.5,), 0.01,
                               NmsOptions(soft_nms_sigma=sigma))[0.5]
    hard = collect_candidates(batches, _calibrate, (0.5,), 0.01)[0.5]
    assert not np.array_equal(np.sort(cands.score), np.sort(hard.score)), "soft-NMS decays"
    for t in (0.3, 0.6, 0.8):
        cfg = PostProcessConfig(num_classes=3, min_score_thresh=(t,), nms_iou=(0.5,),
                                soft_nms_sigma=(sigma,), max_total_detections=100)
        out = PostProcessor.from_postprocess_config(cfg)(raw["boxes"], raw["scores"])
        for i, image_id in enumerate(raw["image_ids"]):
            n = int(out["num_detections"][i])
            served = sorted(zip(np.round(out["detection_scores"][i, :n].numpy(), 6),
                                out["detection_classes"][i, :n].numpy().astype(int) - 1))
            mine = (cands.image_id == image_id) & (cands.score >= t)
            tuned = sorted(zip(np.round(cands.score[mine], 6), cands.column[mine].astype(int)))
            assert served == tuned, (t, image_id)


def test_tune_with_soft_nms_writes_sigma_and_reports_held_out_soft_nms(tmp_path):
    path = ka.write_job(tmp_path, num_images=20,
                        config=ka.default_config(tuning={"soft_nms_sigma": 0.5}))
    result = run_tune(load_config(path), export=False)
    ppc = json.loads(result.postprocess_path.read_text())
    assert ppc["soft_nms_sigma"] == [0.5]
    # The IoU has no effect under soft-NMS: every IoU ties and the default (0.5) is recorded.
    assert set(ppc["nms_iou"]) == {0.5}
    assert result.report["classes"][0]["holdout"]["tp"] > 0


def test_tune_matches_boxes_in_image_frame_when_served_in_the_window_frame(tmp_path):
    # The window keeps the top two thirds of every image (rows 0-3 of the 6 x 6 grid and a
    # sliver of row 4, cut at y = 0.7 of 240 px = 168 px, inside row 4's 20 px boxes at 165-185):
    # the same detections are kept with and without change_coordinate_frame, so the held-out
    # counts agree only if the tuner maps window-frame boxes back before matching.
    reports = []
    for frame in (False, True):
        path = ka.write_job(tmp_path / str(frame), num_images=20, config=ka.default_config(
            tuning={"clip_window": [0.0, 0.0, 0.7, 1.0], "change_coordinate_frame": frame}))
        result = run_tune(load_config(path), export=False)
        ppc = json.loads(result.postprocess_path.read_text())
        assert ppc["clip_window"] == [0.0, 0.0, 0.7, 1.0]
        assert ppc["change_coordinate_frame"] is frame
        reports.append({c["name"]: c["holdout"] for c in result.report["classes"]})
    assert reports[0] == reports[1]
    assert any(h["tp"] > 0 for h in reports[0].values())
