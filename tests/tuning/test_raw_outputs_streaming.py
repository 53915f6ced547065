"""The tuning job gives the same answer from the known-answer raw outputs however they are
stored: an uncompressed npz (memory-mapped as it is), a compressed npz with its rows shuffled
(converted once into a raw-output folder under output.dir/cache), and that folder itself."""

from __future__ import annotations

import json

import numpy as np

import known_answer as ka
from tfcal.config import load_config
from tfcal.tuning.pipeline import run_tune


def _run(root, raw, *, save=np.savez, raw_outputs="raw.npz"):
    path = ka.write_job(root, config=ka.default_config(model={"raw_outputs": raw_outputs}))
    if raw is not None:
        save(root / "raw.npz", **raw)
    result = run_tune(load_config(path), export=False)
    ppc = json.loads(result.postprocess_path.read_text())
    counts = {c["name"]: (c["holdout"]["tp"], c["holdout"]["fp"], c["holdout"]["fn"])
              for c in result.report["classes"]}
    return ppc, counts, result


def test_same_tuning_result_from_mapped_converted_and_folder_outputs(tmp_path):
    _, raw = ka.build(list(range(1, 61)))
    plain, plain_counts, plain_run = _run(tmp_path / "plain", raw)
    order = np.random.default_rng(3).permutation(60)
    shuffled = {k: v[order] for k, v in raw.items()}
    packed, packed_counts, _ = _run(tmp_path / "packed", shuffled, save=np.savez_compressed)
    folders = list((tmp_path / "packed" / "run" / "cache").glob("raw_outputs-*"))
    assert len(folders) == 1
    assert not list((tmp_path / "plain" / "run" / "cache").glob("raw_outputs-*"))
    from_folder, folder_counts, _ = _run(tmp_path / "folder", None,
                                         raw_outputs=str(folders[0]))
    for ppc in (packed, from_folder):
        for key in ("min_score_thresh", "nms_iou", "class_enabled"):
            assert ppc[key] == plain[key], key
    assert packed_counts == plain_counts == folder_counts
    assert plain_counts["car"] == (2 * 18, 0, 0)  # the known answer (18 holdout images)
