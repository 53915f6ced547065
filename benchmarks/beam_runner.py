"""The Beam runner's detector pass against the local runner's, on one data set, in one run.

Runs `tfcal tune` twice on the same config and images, each with an empty cache folder: with
`runner.kind: local`, then with `runner.kind: beam` on the DirectRunner with `--workers`
processes (`--direct_running_mode=multi_processing`). Times the detector pass (`prepare`:
detector, checks and cache) and the whole job of each, then checks that the two raw-output
caches hold the same bytes and the two `postprocess.json` the same choices (every field but
the config's path and hash). Prints the wall times, their ratio (beam / local) and the load
average (the cores may be shared).

Run (minutes on 2 cores for 800 images):
`python benchmarks/beam_runner.py --model ../shared/models/nanodet_odapi
 --data ../shared/data/coco_val2017_800 [--workers 2] [--out /tmp/tfcal-beam-bench]`
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from tfcal.config import load_config
from tfcal.tuning.pipeline import run_tune
from tfcal.tuning.prepare import prepare


def _config(out: Path, name: str, model: Path, data: Path, runner: dict) -> Path:
    settings = {
        "model": {"saved_model": str(model), "cache_dir": str(out / f"cache-{name}")},
        "data": {"annotations": str(data / "instances_val2017.json"),
                 "images": str(data / "images"), "holdout_fraction": 0.3, "seed": 0},
        "tuning": {"target_precision": 0.9},
        "output": {"dir": str(out / f"run-{name}"), "plots": False},
        "export": {"enabled": False},
        "runner": runner,
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _choices(run_dir: Path) -> dict:
    ppc = json.loads((run_dir / "postprocess.json").read_text())
    for key in ("config_path", "config_sha256"):
        ppc.get("metadata", {}).pop(key, None)
    return ppc


def _measure(path: Path) -> dict:
    cfg = load_config(path)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    prep = prepare(cfg)
    detector = time.perf_counter() - start
    del prep
    result = run_tune(cfg, export=False)
    total = time.perf_counter() - start
    meta = next(Path(cfg.model.cache_dir).glob("raw_outputs-*/meta.json"))
    return {"detector_s": detector, "total_s": total, "load_before": load,
            "cache": {k: v["sha256"] for k, v in json.loads(meta.read_text())["arrays"].items()},
            "choices": _choices(result.run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True,
                    help="a folder with instances_val2017.json and images/")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="tfcal-beam-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cache-*"):
        shutil.rmtree(old)
    local = _measure(_config(out, "local", args.model.resolve(), args.data.resolve(),
                             {"kind": "local"}))
    beam = _measure(_config(out, "beam", args.model.resolve(), args.data.resolve(), {
        "kind": "beam", "shard_images": args.shard_images,
        "beam_options": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                         f"--direct_num_workers={args.workers}"]}))
    print(f"images: {args.data}, model: {args.model}, cores: {os.cpu_count()}")
    for name, r in (("local", local), (f"beam DirectRunner x{args.workers}", beam)):
        print(f"{name:24s} detector pass {r['detector_s']:7.1f} s   whole job {r['total_s']:7.1f} s"
              f"   (1-min load average before: {r['load_before']:.2f})")
    print(f"ratio beam / local: detector pass {beam['detector_s'] / local['detector_s']:.2f}, "
          f"whole job {beam['total_s'] / local['total_s']:.2f}")
    print(f"same raw-output cache bytes: {beam['cache'] == local['cache']}")
    print(f"same postprocess.json choices: {beam['choices'] == local['choices']}")


if __name__ == "__main__":
    main()
