"""The Beam runner end to end on the DirectRunner (in this process and with 2 worker
processes), on a small generated data set and the bundled demo detector: the same
raw-output cache bytes and the same `postprocess.json` as the local runner; new images merged
into the statistics without running the detector on the old ones; a broken image reported by
id, with nothing half-written. (slow: about 50 s in all, most of it Beam's start-up.)"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("apache_beam", reason="the Beam runner needs the tfcal[beam] extra")

from tfcal import TfcalError  # noqa: E402
from tfcal.beam import statistics  # noqa: E402
from tfcal.cli import main  # noqa: E402
from tfcal.config import load_config  # noqa: E402
from tfcal.demo.data import generate_dataset  # noqa: E402
from tfcal.demo.run import demo_settings  # noqa: E402
from tfcal.tuning.pipeline import run_tune  # noqa: E402
from tfcal.tuning.prepare import prepare  # noqa: E402

pytestmark = pytest.mark.slow
NUM_IMAGES = 24
MULTI_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                 "--direct_num_workers=2"]


def _runner_config(root: Path, name: str, runner: dict, *, annotations: str = "data/instances.json"
            ) -> Path:
    s = demo_settings(root)
    s["data"]["annotations"] = annotations
    s["model"]["cache_dir"] = f"cache-{name}"
    s["output"] = {"dir": f"run-{name}", "plots": False}
    s["export"]["enabled"] = False
    s["runner"] = runner
    s["calibration"]["per_class"] = False  # too few boxes per class here for their own fits
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(s))
    return path


def _choices(run_dir: Path) -> dict:
    ppc = json.loads((run_dir / "postprocess.json").read_text())
    for key in ("config_path", "config_sha256"):
        del ppc["metadata"][key]
    return ppc


def _cache_hashes(cache_dir: Path) -> dict:
    (meta,) = cache_dir.glob("raw_outputs-*/meta.json")
    return {k: v["sha256"] for k, v in json.loads(meta.read_text())["arrays"].items()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam")
    generate_dataset(root / "data", num_images=NUM_IMAGES, seed=2026)
    local = run_tune(load_config(_runner_config(root, "local", {"kind": "local"})), export=False)
    return root, _choices(local.run_dir), _cache_hashes(root / "cache-local")


def test_beam_in_process_gives_the_local_postprocess_json(local_run, capsys):
    root, choices, hashes = local_run
    cfg = _runner_config(root, "inproc", {"kind": "local", "shard_images": 5})
    # --runner beam and Beam's own flags after --, as a user types them
    assert main(["tune", str(cfg), "--runner", "beam", "--", "--runner=DirectRunner"]) == 0
    assert "postprocess:" in capsys.readouterr().out
    assert _cache_hashes(root / "cache-inproc") == hashes
    assert _choices(root / "run-inproc") == choices
    (store,) = (root / "cache-inproc").glob("beam-*")
    shards = json.loads((store / "index.json").read_text())["shards"]
    assert sorted(len(s["image_keys"]) for s in shards)[-1] <= 5
    assert sum(len(s["image_keys"]) for s in shards) == NUM_IMAGES


def test_beam_with_two_worker_processes_gives_the_local_postprocess_json(local_run):
    root, choices, hashes = local_run
    cfg = load_config(_runner_config(root, "multi", {"kind": "beam", "shard_images": 8,
                                              "beam_options": MULTI_PROCESS}))
    result = run_tune(cfg, export=False)
    assert _cache_hashes(root / "cache-multi") == hashes
    assert _choices(result.run_dir) == choices


def _subset(root: Path, num: int) -> str:
    coco = json.loads((root / "data" / "instances.json").read_text())
    keep = {img["id"] for img in coco["images"][:num]}
    coco["images"] = [i for i in coco["images"] if i["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (root / "data" / f"first{num}.json").write_text(json.dumps(coco))
    return f"data/first{num}.json"


def test_new_images_merge_into_the_statistics_without_rerunning_old_ones(local_run, caplog):
    root, _, hashes = local_run
    runner = {"kind": "beam", "shard_images": 16}
    with caplog.at_level(logging.INFO, logger="tfcal.beam"):
        prepare(load_config(_runner_config(root, "incr", runner, annotations=_subset(root, 16))))
        raw = prepare(load_config(_runner_config(root, "incr", runner))).raw
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("beam 1/3")]
    assert stages[0].startswith("beam 1/3: 16 of 16 images need the detector (0 held")
    assert stages[1].startswith(f"beam 1/3: 8 of {NUM_IMAGES} images need the detector (16 held")
    new = [c for c in (root / "cache-incr").glob("raw_outputs-*") if
           json.loads((c / "meta.json").read_text())["num_images"] == NUM_IMAGES]
    assert {k: v["sha256"] for k, v in json.loads((new[0] / "meta.json").read_text())
            ["arrays"].items()} == hashes
    assert raw.num_images == NUM_IMAGES and np.isfinite(np.asarray(raw.scores)).all()


def test_a_broken_image_is_reported_by_id_and_only_it_is_retried(local_run, caplog):
    root, _, hashes = local_run
    data = root / "data-broken"
    shutil.copytree(root / "data", data)
    coco = json.loads((data / "instances.json").read_text())
    victim = coco["images"][3]
    image = data / "images" / victim["file_name"]
    good = image.read_bytes()
    image.write_bytes(good[:40])  # a truncated PNG: the header passes, decoding fails
    s = yaml.safe_load(_runner_config(root, "broken", {"kind": "beam"}).read_text())
    s["data"]["annotations"] = str(data / "instances.json")
    s["data"]["images"] = str(data / "images")
    (root / "broken.yaml").write_text(yaml.safe_dump(s))
    cfg = load_config(root / "broken.yaml")
    expected = (rf"1 images failed in the Beam detector pass: {victim['id']} "
                rf"\(cannot decode .*{victim['file_name']}")
    with pytest.raises(TfcalError, match=expected):
        prepare(cfg)
    assert not list((root / "cache-broken").glob("raw_outputs-*"))  # nothing half-written
    (store,) = (root / "cache-broken").glob("beam-*")
    model_fp = json.loads((store / "index.json").read_text())["model_fingerprint"]
    kept = statistics.load_index(store, model_fp).entries  # the 23 good images are committed
    assert sum(len(e.image_keys) for e in kept) == NUM_IMAGES - 1
    image.write_bytes(good)
    with caplog.at_level(logging.INFO, logger="tfcal.beam"):
        prepare(cfg)
    assert any(r.getMessage().startswith(f"beam 1/3: 1 of {NUM_IMAGES} images need")
               for r in caplog.records)
    assert _cache_hashes(root / "cache-broken") == hashes


class _FlakyDetector:
    """Normalized boxes for dark images, pixel boxes for grey ones, an error for bright ones."""

    batchable = False

    def __call__(self, images):
        level = int(images[0].mean())
        if level > 200:
            raise RuntimeError("boom")
        scale = 1.0 if level < 50 else 32.0
        return (np.full((1, 3, 4), 0.5 * scale, np.float32), np.full((1, 3, 2), 0.1, np.float32))


def test_failed_inferences_and_bad_outputs_reach_the_dead_letter_list(tmp_path, monkeypatch):
    from PIL import Image

    from tfcal.beam import pipeline
    from tfcal.config import ModelConfig

    monkeypatch.setattr(pipeline, "open_detector", lambda model: _FlakyDetector())
    todo = []
    for image_id, level in ((1, 10), (2, 128), (3, 250)):
        path = tmp_path / f"{image_id}.png"
        Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(path)
        todo.append((f"k{image_id}", image_id, str(path), 16, 16))
    todo.append(("k4", 4, str(tmp_path / "1.png"), 8, 16))  # the JSON's size is wrong
    entries, failed = pipeline.run(todo, ModelConfig(saved_model=tmp_path), tmp_path / "store",
                                   shard_images=2, beam_options=[])
    assert [e.image_keys for e in entries] == [("k1",)]
    assert [i for i, _ in failed] == [2, 3, 4]
    assert "boxes: must be normalized" in failed[0][1]
    assert failed[1][1] == "detector failed: RuntimeError('boom')"
    assert "decoded size 16x16 differs from the JSON height x width 8x16" in failed[2][1]


def test_a_second_run_on_one_store_stops_at_once_naming_the_holder(local_run):
    from tfcal import locks
    from tfcal.detectors import open_detector

    root, _, _ = local_run
    cfg = load_config(_runner_config(root, "locked", {"kind": "beam"}))
    store = statistics.store_path(root / "cache-locked", open_detector(cfg.model).fingerprint())
    with locks.hold(store, "tfcal tune other.yaml", what="the Beam statistics store"):
        with pytest.raises(TfcalError, match="the Beam statistics store.*tfcal tune other.yaml"):
            prepare(cfg)
    assert not list((root / "cache-locked").glob("raw_outputs-*"))
