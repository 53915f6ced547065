"""Verifies an exported SavedModel: specs, fresh-process reload, saved_model_cli run, parity.

`verify_export` checks, on one sample input:

1. signature specs read from `saved_model.pb`: `serving_default` keeps the detector's input
   (name, dtype, shape) and returns `detection_boxes` float32 `[B, M, 4]`, `detection_scores`
   float32 `[B, M]`, `detection_classes` float32 `[B, M]`, `num_detections` float32 `[B]` with the
   input's batch dimension first; the `metadata` signature and assets file hold the config hash;
2. a fresh Python process reloads the model with `tf.saved_model.load` and runs
   `serving_default` (and `encoded_image`, and the detector's raw outputs), writing an npz;
3. `saved_model_cli run` runs `serving_default` through the TF1 loader
   (`tf.compat.v1.saved_model.loader`), the path TF Serving uses;
4. parity: each run equals the in-process `PostProcessor` applied to the exported model's own
   raw outputs: the same `num_detections`, and max |difference| <= `atol` (default 1e-5). The
   reference emits class columns, which are turned into ids with the tuning side's category ids
   (`category_ids`, from the `CategoryMapping` the thresholds were tuned with, not the config's
   `class_ids`), so a wrong id lookup in the served graph fails `<run> detection_classes`;
5. graph: no NMS op of the detector is reachable from `serving_default` (only the PostProcessor's).

The two subprocesses run concurrently (each costs a TensorFlow import).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tfcal import validation
from tfcal.export import saved_model
from tfcal.layers import PostProcessor

logger = logging.getLogger(__name__)

_RELOAD_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
model_dir, in_path, out_path = sys.argv[1:4]
data = np.load(in_path, allow_pickle=True)
model = tf.saved_model.load(model_dir)
feeds = {
    k.split("/", 1)[1]: tf.constant(data[k]) for k in data.files if k.startswith("serving_default/")
}
res = {}
for key, value in model.signatures["serving_default"](**feeds).items():
    res["serving_default/" + key] = value.numpy()
if hasattr(model, "detector_raw_outputs"):
    (x,) = feeds.values()
    for key, value in model.detector_raw_outputs(x).items():
        res["raw/" + key] = value.numpy()
if "encoded_image" in data.files:
    out = model.signatures["encoded_image"](encoded_image=tf.constant(data["encoded_image"]))
    for key, value in out.items():
        res["encoded_image/" + key] = value.numpy()
meta = model.signatures["metadata"](request=tf.constant([""]))["postprocess_config"][0].numpy()
meta = meta.decode("utf-8")
res["metadata"] = np.array(meta)
res["signatures"] = np.array(sorted(model.signatures))
np.savez(out_path, **res)
"""


class ExportVerificationError(ValueError):
    """An exported SavedModel failed verification; the message lists the failed checks."""


@dataclasses.dataclass
class VerificationReport:
    """What `verify_export` checked and measured.

    Attributes:
      saved_model_dir: the SavedModel checked.
      signatures: signature keys found by the fresh process.
      checks: `(name, passed, detail)` for every check, in order.
      num_detections: `num_detections` of the sample, int `[B]` (in-process reference).
      max_abs_diff: run name (`fresh_process`, `saved_model_cli`, `encoded_image`) -> max
        |difference| to the in-process PostProcessor over boxes, scores and classes.
      raw_vs_detector_max_abs_diff: max |difference| of the exported raw outputs to the original
        detector's (None when not given): folding weights into constants may change the last bits.
      nms_ops: reachable NMS op counts per signature (`serving_default`, `postprocess_only`).
      seconds: wall time of the verification.
    """

    saved_model_dir: str
    signatures: tuple[str, ...] = ()
    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    num_detections: list[int] = dataclasses.field(default_factory=list)
    max_abs_diff: dict[str, float] = dataclasses.field(default_factory=dict)
    raw_vs_detector_max_abs_diff: float | None = None
    nms_ops: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(ok for _, ok, _ in self.checks)

    def failures(self) -> list[str]:
        """`name: detail` of each failed check."""
        return [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]

    def summary(self) -> str:
        """One line: checks passed, diffs, detections."""
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        ok = sum(1 for _, passed, _ in self.checks if passed)
        return (
            f"{ok}/{len(self.checks)} checks passed; max abs diff: {diffs}; "
            f"num_detections {self.num_detections}; NMS ops per signature "
            f"{ {k: sum(v.values()) for k, v in self.nms_ops.items()} } (the post-processing's "
            f"own, one per IoU group); {self.seconds:.1f} s"
        )

    def add(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append((name, bool(passed), detail))


def saved_model_cli_command() -> list[str]:
    """`saved_model_cli` of the running interpreter's environment (module form as fallback)."""
    exe = Path(sys.executable).parent / "saved_model_cli"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def read_signature_specs(saved_model_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Reads signature specs from `saved_model.pb` without loading the model.

    Returns:
      signature key -> {"inputs": {name: (dtype name, shape)}, "outputs": {...}}, shapes as
      tuples with None for unknown dimensions.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    specs = {}
    for key, sig in sm.meta_graphs[0].signature_def.items():
        if key.startswith("__"):  # __saved_model_init_op
            continue
        entry = {}
        for side in ("inputs", "outputs"):
            entry[side] = {
                name: (
                    tf.as_dtype(info.dtype).name,
                    (
                        None
                        if info.tensor_shape.unknown_rank
                        else tuple(None if d.size < 0 else d.size for d in info.tensor_shape.dim)
                    ),
                )
                for name, info in getattr(sig, side).items()
            }
        specs[key] = entry
    return specs


def _check_specs(report: VerificationReport, specs, config, detector) -> None:
    sig = specs.get("serving_default")
    report.add("serving_default present", sig is not None, f"signatures {sorted(specs)}")
    if sig is None:
        return
    if detector is not None:
        expected_in = {detector.input_name: (detector.input_dtype, tuple(detector.input_shape))}
    else:
        expected_in = {
            "raw_detection_boxes": ("float32", None),
            "raw_detection_scores": ("float32", None),
        }
    got_in = sig["inputs"]
    same_names = set(got_in) == set(expected_in)
    same_types = same_names and all(
        got_in[k][0] == v[0] and (v[1] is None or got_in[k][1] == v[1])
        for k, v in expected_in.items()
    )
    report.add("serving_default inputs", same_types, f"expected {expected_in}, got {got_in}")
    batch = (
        next(iter(got_in.values()))[1][0] if same_names and next(iter(got_in.values()))[1] else None
    )
    outs = sig["outputs"]
    m = config.max_total_detections
    ranks = {
        "detection_boxes": 3,
        "detection_scores": 2,
        "detection_classes": 2,
        "num_detections": 1,
    }
    for key, rank in ranks.items():
        if key not in outs:
            report.add(f"output {key}", False, f"missing, outputs {sorted(outs)}")
            continue
        dtype, shape = outs[key]
        ok = dtype == "float32" and shape is not None and len(shape) == rank and shape[0] == batch
        if ok and rank > 1:
            ok = shape[1] in (None, m) and (rank == 2 or shape[2] == 4)
        report.add(
            f"output {key}",
            ok,
            f"float32 rank {rank}, batch-first {batch}, detections {m}; got {dtype} {shape}",
        )
    for key, (dtype, shape) in outs.items():
        if key not in ranks:
            ok = shape is not None and len(shape) >= 1 and shape[0] == batch
            report.add(f"output {key} batch-first", ok, f"batch {batch}, got {dtype} {shape}")
    meta = specs.get("metadata")
    ok = meta == {
        "inputs": {"request": ("string", (None,))},
        "outputs": {"postprocess_config": ("string", (None,))},
    }
    report.add(
        "metadata signature", ok, f"expected request/postprocess_config string [None], got {meta}"
    )
    if "encoded_image" in specs:
        enc = specs["encoded_image"]["inputs"]
        report.add(
            "encoded_image input",
            enc == {"encoded_image": ("string", (None,))},
            f"expected string [None], got {enc}",
        )


def _compare(
    report: VerificationReport, name: str, got: Mapping[str, np.ndarray], expected, atol: float
):
    _compare_classes(report, name, got, expected)
    missing = [k for k in saved_model.DETECTION_KEYS if k not in got]
    if missing:
        report.add(f"{name} parity", False, f"missing outputs {missing}")
        return
    counts_ok = np.array_equal(got["num_detections"], expected["num_detections"])
    report.add(
        f"{name} num_detections",
        counts_ok,
        f"expected {expected['num_detections'].tolist()}, got {got['num_detections'].tolist()}",
    )
    diff = 0.0
    for key in ("detection_boxes", "detection_scores", "detection_classes"):
        if got[key].shape != expected[key].shape:
            report.add(
                f"{name} {key} shape",
                False,
                f"expected {expected[key].shape}, got {got[key].shape}",
            )
            return
        if got[key].size:
            diff = max(diff, float(np.max(np.abs(got[key].astype(np.float64) - expected[key]))))
    report.max_abs_diff[name] = diff
    report.add(f"{name} parity", diff <= atol, f"max abs diff {diff:.3e} (atol {atol:.0e})")


def _compare_classes(report: VerificationReport, name: str, got: Mapping[str, np.ndarray],
                     expected) -> None:
    """The served class ids of the valid rows are exactly the expected category ids."""
    if "detection_classes" not in got or "num_detections" not in got or \
            got["detection_classes"].shape != expected["detection_classes"].shape:
        return  # reported by the parity checks
    n = np.minimum(got["num_detections"], expected["num_detections"]).astype(np.int64)
    valid = np.arange(expected["detection_classes"].shape[1])[None, :] < n[:, None]
    served = got["detection_classes"][valid]
    want = expected["detection_classes"][valid]
    wrong = served != want
    report.add(
        f"{name} detection_classes",
        not wrong.any(),
        f"served class ids {np.unique(served).astype(np.int64).tolist()}; "
        + (f"{int(wrong.sum())} rows differ from the category ids tuned "
           f"(e.g. {int(served[wrong][0])} for {int(want[wrong][0])})" if wrong.any()
           else "all equal the category ids tuned"),
    )


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """How `verify_export` checks (validated here, once).

    Attributes:
      atol: largest allowed absolute difference to the in-process PostProcessor (>= 0),
        default 1e-5.
      run_saved_model_cli: also run `saved_model_cli run` (the TF1 loader), default True.
      timeout: seconds allowed for each subprocess (> 0), default 600.
      raise_on_failure: raise `ExportVerificationError` when a check fails, default True.
    """

    atol: float = 1e-5
    run_saved_model_cli: bool = True
    timeout: float = 600.0
    raise_on_failure: bool = True

    def __post_init__(self):
        for name, positive in (("atol", False), ("timeout", True)):
            value = getattr(self, name)
            if not validation.is_number(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} "
                                 f"0, got {value!r}")
            object.__setattr__(self, name, float(value))
        validation.boolean("run_saved_model_cli", self.run_saved_model_cli)
        validation.boolean("raise_on_failure", self.raise_on_failure)


@dataclasses.dataclass(frozen=True, eq=False)
class VerificationSample:
    """The one sample `verify_export` runs the exported model on.

    Attributes:
      inputs: one `serving_default` feed, input name -> array with a batch dimension (uint8 or
        float32 `[B, H, W, 3]`, bytes object `[B]`; for `postprocess_only` models the raw boxes
        float32 `[B, N, 4]` and scores float32 `[B, N, C]`).
      encoded_images: JPEG/PNG bytes of the same images as `inputs` (same order) to check the
        `encoded_image` signature against `serving_default`'s reference; () skips it.
      reference_raw: the original detector's raw outputs on `inputs` (keys as the detector's
        raw keys), reported as `raw_vs_detector_max_abs_diff` (informational); None: not at hand.
    """

    inputs: Mapping[str, np.ndarray]
    encoded_images: tuple[bytes, ...] = ()
    reference_raw: Mapping[str, np.ndarray] | None = None

    def __post_init__(self):
        if not isinstance(self.inputs, Mapping) or not self.inputs:
            raise ValueError(f"inputs: expected a non-empty mapping of input name -> array, "
                             f"got {self.inputs!r}")
        object.__setattr__(self, "encoded_images", tuple(self.encoded_images))
        for image in self.encoded_images:
            if not isinstance(image, bytes):
                raise TypeError(f"encoded_images: expected bytes, got {type(image).__name__}")


def verify_export(
    saved_model_dir: str | os.PathLike,
    postprocess_config,
    sample: VerificationSample,
    detector: saved_model.DetectorInfo | None = None,
    options: VerifyOptions = VerifyOptions(),
    category_ids=None,
) -> VerificationReport:
    """Verifies an exported SavedModel (see the module docstring for the checks).

    Args:
      saved_model_dir: the SavedModel (a version directory).
      postprocess_config: the `PostProcessConfig` (or path/dict) it was exported with.
      sample: the `VerificationSample` to run the model on.
      detector: the wrapped detector's info, None for `postprocess_only` models.
      options: the `VerifyOptions`; default `VerifyOptions()`.
      category_ids: int `[K]`, the category id of each class column as the tuning side mapped
        it (`DetectorDescription.category_ids`; -1: no category); the served classes must be
        these. None: the config's own `emitted_class_ids()` (then a wrong `class_ids` in the
        config is not caught).

    Returns:
      A `VerificationReport`.

    Raises:
      ExportVerificationError: a check failed (and `options.raise_on_failure`).
    """
    start = time.perf_counter()
    config = saved_model.load_postprocess_config(postprocess_config)
    if category_ids is None:
        category_ids = config.emitted_class_ids()
    category_ids = np.asarray(category_ids, np.int64).reshape(-1)
    if category_ids.size != config.num_classes:
        raise ValueError(f"category_ids: expected {config.num_classes} ids (one per class "
                         f"column), got {category_ids.tolist()}")
    saved_model_dir = Path(saved_model_dir)
    sha = saved_model.config_sha256(config)
    report = VerificationReport(saved_model_dir=str(saved_model_dir))
    specs = read_signature_specs(saved_model_dir)
    _check_specs(report, specs, config, detector)
    _check_metadata_asset(report, saved_model_dir, sha)
    _check_detector_nms(report, saved_model_dir, specs, detector)
    fresh, cli = _run_fresh_processes(report, saved_model_dir, sample, options)
    if fresh is not None:
        _check_fresh_results(report, config, sha, sample, detector, fresh, cli, options.atol,
                             category_ids)
    report.seconds = time.perf_counter() - start
    if options.raise_on_failure and not report.passed:
        raise ExportVerificationError(
            f"{saved_model_dir}: verification failed: " + "; ".join(report.failures())
        )
    return report


def _check_metadata_asset(report: VerificationReport, saved_model_dir: Path, sha: str) -> None:
    """The assets file holds the config's hash."""
    asset = saved_model_dir / "assets" / saved_model.METADATA_ASSET
    try:
        asset_meta = json.loads(asset.read_text(encoding="utf-8"))
        report.add("metadata asset", asset_meta.get("config_sha256") == sha, f"config_sha256 {sha}")
    except (OSError, ValueError) as err:
        report.add("metadata asset", False, f"{asset}: {err}")


def _check_detector_nms(report: VerificationReport, saved_model_dir: Path, specs,
                        detector: saved_model.DetectorInfo | None) -> None:
    """Counts the NMS ops per signature; a pruned detector adds none to `serving_default`."""
    report.nms_ops = {
        key: saved_model.count_nms_ops(saved_model_dir, key) for key in specs if key != "metadata"
    }
    if detector is not None and "postprocess_only" in report.nms_ops:
        own = report.nms_ops["postprocess_only"]
        served = report.nms_ops["serving_default"]
        report.add(
            "no detector NMS in serving_default",
            served == own or not detector.pruned,
            f"serving_default {served}, PostProcessor alone {own}",
        )


def _run_fresh_processes(
    report: VerificationReport, saved_model_dir: Path, sample: VerificationSample,
    options: VerifyOptions,
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """Runs the model in a fresh Python process and (optionally) in `saved_model_cli run`,
    concurrently; returns their outputs (None for a run that failed)."""
    with tempfile.TemporaryDirectory(prefix="tfcal_verify_") as work:
        work = Path(work)
        feed = {f"serving_default/{k}": np.asarray(v) for k, v in sample.inputs.items()}
        if sample.encoded_images:
            feed["encoded_image"] = np.array(list(sample.encoded_images), dtype=object)
        np.savez(work / "in.npz", **feed)
        procs = {
            "fresh_process": subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _RELOAD_SCRIPT,
                    str(saved_model_dir),
                    str(work / "in.npz"),
                    str(work / "out.npz"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_subprocess_env(),
            )
        }
        if options.run_saved_model_cli:
            cli_inputs = []
            for k, v in sample.inputs.items():
                v = np.asarray(v)
                if v.dtype == object:
                    v = v.astype(bytes)  # fixed-width bytes: saved_model_cli loads without pickle
                np.save(work / f"in_{k}.npy", v)
                cli_inputs.append(f"{k}={work / f'in_{k}.npy'}")
            procs["saved_model_cli"] = subprocess.Popen(
                saved_model_cli_command()
                + [
                    "run",
                    "--dir",
                    str(saved_model_dir),
                    "--tag_set",
                    "serve",
                    "--signature_def",
                    "serving_default",
                    "--inputs",
                    ";".join(cli_inputs),
                    "--outdir",
                    str(work / "cli"),
                    "--overwrite",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_subprocess_env(),
            )
        results = {}
        timeout = options.timeout
        for name, proc in procs.items():
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                report.add(f"{name} run", False, f"timed out after {timeout:.0f} s")
                continue
            report.add(f"{name} run", proc.returncode == 0, f"exit {proc.returncode}: {_tail(err)}")
            results[name] = proc.returncode
        fresh = (
            dict(np.load(work / "out.npz", allow_pickle=False))
            if results.get("fresh_process") == 0
            else None
        )
        cli = None
        if results.get("saved_model_cli") == 0:
            cli = {p.stem: np.load(p) for p in (work / "cli").glob("*.npy")}
    return fresh, cli


def _check_fresh_results(
    report: VerificationReport, config, sha: str, sample: VerificationSample,
    detector: saved_model.DetectorInfo | None, fresh: Mapping[str, np.ndarray],
    cli: Mapping[str, np.ndarray] | None, atol: float, category_ids: np.ndarray,
) -> None:
    """The fresh process's metadata, and each run's parity with the in-process PostProcessor
    applied to the exported model's own raw outputs, its columns named by `category_ids`."""
    import tensorflow as tf

    report.signatures = tuple(str(s) for s in fresh["signatures"])
    meta = json.loads(str(fresh["metadata"]))
    report.add(
        "metadata signature value", meta.get("config_sha256") == sha, f"config_sha256 {sha}"
    )
    if detector is not None:
        boxes = fresh.get(f"raw/{detector.raw_boxes_key}")
        scores = fresh.get(f"raw/{detector.raw_scores_key}")
    else:
        boxes = sample.inputs["raw_detection_boxes"]
        scores = sample.inputs["raw_detection_scores"]
    if boxes is None or scores is None:
        report.add(
            "raw outputs", False, "the exported model has no detector_raw_outputs function"
        )
        return
    # The reference emits columns (the same columns as the config can emit); the tuning
    # side's category ids name them.
    by_column = config.replace(class_ids=(), label_offset=0, class_enabled=config.enabled())
    layer = PostProcessor.from_postprocess_config(by_column)
    expected = {
        k: np.asarray(v, dtype=np.float32)
        for k, v in layer(
            tf.constant(boxes, tf.float32), tf.constant(scores, tf.float32)
        ).items()
        if k in saved_model.DETECTION_KEYS
    }
    n = expected["num_detections"].astype(np.int64)
    valid = np.arange(expected["detection_classes"].shape[1])[None, :] < n[:, None]
    columns = expected["detection_classes"].astype(np.int64)
    expected["detection_classes"] = np.where(valid, category_ids[columns], 0).astype(np.float32)
    report.num_detections = [int(n) for n in expected["num_detections"]]
    _compare(report, "fresh_process", _strip(fresh, "serving_default/"), expected, atol)
    if cli is not None:
        _compare(report, "saved_model_cli", cli, expected, atol)
    if sample.encoded_images:
        _compare(report, "encoded_image", _strip(fresh, "encoded_image/"), expected, atol)
    if sample.reference_raw is not None and detector is not None:
        report.raw_vs_detector_max_abs_diff = max(
            float(
                np.max(np.abs(np.asarray(sample.reference_raw[k], np.float64) - fresh[f"raw/{k}"]))
            )
            for k in (detector.raw_boxes_key, detector.raw_scores_key)
        )


def _strip(results: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
