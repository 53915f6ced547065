"""Writes the TF Serving package: numbered versions, models.config, batching file, warmup records.

Layout (`export_root` is mounted in the container at `container_base_path`, default `/models`):

    export_root/
      models.config                  # text proto ModelServerConfig.model_config_list
      batching_parameters.txt        # text proto BatchingParameters
      <model_name>/
        1/                           # SavedModel (serving_default, encoded_image, ...)
          saved_model.pb  variables/  assets/tfcal_postprocess.json
          assets.extra/tf_serving_warmup_requests   # TFRecord of PredictionLog
        2/ ...

A version is built in a hidden temporary directory inside `export_root/<model_name>/` and renamed
to its number only after the SavedModel, the warmup records and the verification are complete, so
a crash or Ctrl-C never leaves a half-written version (TF Serving ignores non-numeric names). The
temporaries carry the writer's host and pid (`atomic.temp_name`); the next export into the same
folder deletes those of processes that are gone (a SIGKILL, a power cut).

Concurrent exports. Choosing the number, renaming the version into place and rewriting
models.config happen under the lock `export_root/.tfcal.lock` (`tfcal.locks`, waited for up to
`PUBLISH_LOCK_WAIT_S`), and the rename
never replaces a directory (``renameat2(RENAME_NOREPLACE)``): two exports without a version number
get distinct versions, and a version another process created is never replaced or deleted unless
its number was given with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfcal import TfcalError
from tfcal import atomic, locks
from tfcal.export import saved_model
from tfcal.export import verify as verify_mod
from tfcal.handoff import DetectorDescription, check_detector
from tfcal.postprocess import PostProcessConfig

logger = logging.getLogger(__name__)

WARMUP_FILE = "tf_serving_warmup_requests"
MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Seconds an export waits for another one to finish publishing into the same model folder.
PUBLISH_LOCK_WAIT_S = 120.0


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's `--batching_parameters_file` (text proto `BatchingParameters`).

    Attributes:
      max_batch_size: largest batch the server forms, default 8. Only detectors with a dynamic
        batch dimension benefit; with a batch fixed to 1 use 1.
      batch_timeout_micros: how long a partial batch waits, default 2000.
      num_batch_threads: threads that run batches, default 2 (one per core).
      max_enqueued_batches: queue length before requests are rejected, default 100.
      pad_variable_length_inputs: pad images of different sizes into one batch, default False.
      allowed_batch_sizes: batch sizes the server pads to, () = any.
    """

    max_batch_size: int = 8
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100
    pad_variable_length_inputs: bool = False
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"BatchingParameters.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.batch_timeout_micros < 0:
            raise ValueError(
                "BatchingParameters.batch_timeout_micros must be >= 0, "
                f"got {self.batch_timeout_micros}"
            )
        if self.allowed_batch_sizes and (
            list(self.allowed_batch_sizes) != sorted(set(self.allowed_batch_sizes))
            or self.allowed_batch_sizes[-1] != self.max_batch_size
        ):
            raise ValueError(
                "BatchingParameters.allowed_batch_sizes must be increasing and end with "
                f"max_batch_size={self.max_batch_size}, got {self.allowed_batch_sizes}"
            )

    def to_text_proto(self) -> str:
        """The file content, e.g. `max_batch_size { value: 8 }` lines."""
        lines = [
            f"max_batch_size {{ value: {self.max_batch_size} }}",
            f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}",
            f"num_batch_threads {{ value: {self.num_batch_threads} }}",
            f"max_enqueued_batches {{ value: {self.max_enqueued_batches} }}",
            f"pad_variable_length_inputs: {'true' if self.pad_variable_length_inputs else 'false'}",
        ]
        lines += [f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes]
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class ServingExport:
    """A finished TF Serving export.

    Attributes:
      model_dir: `export_root/<model_name>`.
      version: the version number written.
      version_dir: `export_root/<model_name>/<version>`.
      models_config: path of `models.config`.
      batching_parameters: path of the batching parameters file.
      warmup_requests: path of `assets.extra/tf_serving_warmup_requests`.
      export: the `saved_model.ExportResult` (signatures, metadata, detector info).
      verification: the `verify.VerificationReport`, or None when verification was skipped.
    """

    model_dir: Path
    version: int
    version_dir: Path
    models_config: Path
    batching_parameters: Path
    warmup_requests: Path
    export: Any
    verification: Any

    def summary(self) -> str:
        """Where the model went and how it was checked, in two lines."""
        checked = (self.verification.summary() if self.verification is not None
                   else "verification skipped")
        return (f"{self.version_dir} (version {self.version}; {self.models_config.name} and "
                f"{self.batching_parameters.name} in {self.models_config.parent})\n"
                f"             {checked}")


def _check_model_name(model_name: str) -> None:
    if not _MODEL_NAME.match(model_name):
        raise TfcalError(
            "model_name: must be letters, digits, '_', '-', '.' (no path separators), "
            f"got {model_name!r}"
        )


def existing_versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted numeric version directories under `model_dir` (others, e.g. temporaries, ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: str | os.PathLike) -> int:
    """The next free version number: one more than the largest existing, 1 for a new model."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def models_config_text(models: Sequence[tuple[str, str]]) -> str:
    """Text proto `ModelServerConfig` with one `config` per `(name, base_path)`."""
    parts = ["model_config_list {"]
    for name, base_path in models:
        parts += [
            "  config {",
            f'    name: "{name}"',
            f'    base_path: "{base_path}"',
            '    model_platform: "tensorflow"',
            "  }",
        ]
    parts.append("}")
    return "\n".join(parts) + "\n"


def write_models_config(
    export_root: str | os.PathLike, container_base_path: str = "/models"
) -> Path:
    """Writes `export_root/models.config` listing every model directory with a numeric version.

    Args:
      export_root: the directory mounted into the server.
      container_base_path: where `export_root` is mounted in the container (absolute); each
        model's `base_path` is `<container_base_path>/<model_name>`.

    Returns:
      The path written (atomically).
    """
    if not container_base_path.startswith("/"):
        raise TfcalError(
            f"container_base_path: must be an absolute path, got {container_base_path!r}"
        )
    export_root = Path(export_root)
    names = sorted(
        p.name
        for p in export_root.iterdir()
        if p.is_dir() and _MODEL_NAME.match(p.name) and existing_versions(p)
    )
    base = container_base_path.rstrip("/")
    return atomic.write_text(
        export_root / MODELS_CONFIG, models_config_text([(n, f"{base}/{n}") for n in names])
    )


def _read_image(image) -> tuple[np.ndarray, bytes]:
    """Returns (uint8 `[H, W, 3]`, JPEG/PNG bytes) for a path, bytes or array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = np.asarray(image, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return array, buf.getvalue()
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    import tensorflow as tf

    array = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    return array, data


def default_warmup_image(height: int = 96, width: int = 128) -> np.ndarray:
    """A small deterministic RGB image (uint8 `[height, width, 3]`): gradients and two boxes."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1
    )
    image[height // 4 : height // 2, width // 4 : width // 2] = (220, 40, 40)
    image[height // 2 : 3 * height // 4, width // 2 : 7 * width // 8] = (30, 30, 200)
    return image.astype(np.uint8)


def serving_input(info: saved_model.DetectorInfo, image) -> dict[str, np.ndarray]:
    """One `serving_default` input (a batch of one) for an image, in the detector's input type.

    Args:
      info: the detector (`postprocess_only` models use `postprocess_input`).
      image: a path, encoded bytes or uint8 `[H, W, 3]` array.

    Returns:
      Dict input name -> numpy array (uint8/float32 `[1, H, W, 3]`, or object bytes `[1]`).
    """
    array, encoded = _read_image(image)
    if info.input_type == "image_tensor":
        value = array[np.newaxis]
    elif info.input_type == "float_image_tensor":
        value = array[np.newaxis].astype(np.float32)
    elif info.input_type == "encoded_image_string_tensor":
        value = np.array([encoded], dtype=object)
    else:
        import tensorflow as tf

        example = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[encoded])
                    ),
                    "image/format": tf.train.Feature(
                        bytes_list=tf.train.BytesList(
                            value=[b"png" if encoded[:4] == b"\x89PNG" else b"jpeg"]
                        )
                    ),
                }
            )
        )
        value = np.array([example.SerializeToString()], dtype=object)
    return {info.input_name: value}


def postprocess_input(config, *, num_boxes: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded raw boxes float32 `[1, num_boxes, 4]` and scores float32 `[1, num_boxes, C]`."""
    rng = np.random.default_rng(seed)
    columns = config.num_classes + (1 if config.background_column else 0)
    yx = rng.uniform(0.0, 0.7, size=(1, num_boxes, 2))
    hw = rng.uniform(0.05, 0.3, size=(1, num_boxes, 2))
    boxes = np.concatenate([yx, yx + hw], axis=-1).astype(np.float32)
    scores = rng.uniform(0.0, 1.0, size=(1, num_boxes, columns)).astype(np.float32)
    if config.background_column:
        scores[..., 0] = 0.0
    return {"raw_detection_boxes": boxes, "raw_detection_scores": scores}


def write_warmup_requests(
    path: str | os.PathLike,
    inputs: Sequence[dict[str, np.ndarray]],
    *,
    model_name: str,
    signature_name: str = "serving_default",
) -> Path:
    """Writes a TFRecord of `PredictionLog`s (one `PredictRequest` per input dict).

    TF Serving replays these when it loads the version (file name
    `assets.extra/tf_serving_warmup_requests`), so the first real request is not slow.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for feed in inputs:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature_name
            for key, value in feed.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path: str | os.PathLike) -> list[Any]:
    """Parses a warmup file back into `PredictionLog` protos."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record)
        logs.append(log)
    return logs


def _original_raw_outputs(
    detector: saved_model.ServingGraph, feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """The unmodified detector's raw outputs on `feed` (None when not at hand)."""
    if detector.reference is None:
        return None
    return detector.reference(feed)


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """How a TF Serving version is written (validated here, once).

    Attributes:
      version: the version number (>= 1); default the next free one.
      overwrite: allow replacing an existing `version`; otherwise an existing one raises.
      container_base_path: absolute path where `export_root` is mounted in the container,
        default "/models".
      batching: the batching parameters file content; default `BatchingParameters()` (with
        `max_batch_size=1` when the detector's batch is fixed to 1).
      verify: run `verify.verify_export` on the new version before it is published, default
        True.
      model: what the SavedModel holds (input type, raw outputs, extra outputs, `encoded_image`
        signature, pruning), the `saved_model.ModelOptions`; default `ModelOptions()`.
    """

    version: int | None = None
    overwrite: bool = False
    container_base_path: str = "/models"
    batching: BatchingParameters | None = None
    verify: bool = True
    model: saved_model.ModelOptions = saved_model.ModelOptions()

    def __post_init__(self):
        if not isinstance(self.model, saved_model.ModelOptions):
            raise TypeError(f"model: expected a saved_model.ModelOptions, got {self.model!r}")
        if not isinstance(self.container_base_path, str) or \
                not self.container_base_path.startswith("/"):
            raise TfcalError(
                f"container_base_path: must be an absolute path, got {self.container_base_path!r}"
            )
        v = self.version
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise TfcalError(f"version: must be an integer >= 1, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions(ServingOptions):
    """Where a TF Serving version goes, and how it is written (the `ServingOptions` fields).

    Attributes:
      export_root: the directory TF Serving mounts (holds `models.config`).
      model_name: the served model name, also the directory `export_root/<model_name>`.
    """

    export_root: Path
    model_name: str

    def __post_init__(self):
        _check_model_name(self.model_name)
        object.__setattr__(self, "export_root", Path(self.export_root))
        super().__post_init__()

    @classmethod
    def at(cls, export_root: str | os.PathLike, model_name: str,
           serving: ServingOptions | None = None) -> "ExportOptions":
        """`serving`'s options for the model `model_name` under `export_root`."""
        serving = ServingOptions() if serving is None else serving
        if not isinstance(serving, ServingOptions):
            raise TypeError(f"options: expected a ServingOptions, got {serving!r}")
        fields = {f.name: getattr(serving, f.name) for f in dataclasses.fields(ServingOptions)}
        return cls(export_root=Path(export_root), model_name=model_name, **fields)


def export_for_serving(
    detector: str | os.PathLike | DetectorDescription | None,
    postprocess_config,
    export_root: str | os.PathLike,
    model_name: str,
    *,
    options: ServingOptions | None = None,
    warmup_images: Sequence[Any] = (),
) -> ServingExport:
    """Exports a detector (plus tuned post-processing) as a new TF Serving model version.

    The form of `export_handoff` for callers without the two handoff records of a tuning run.

    Args:
      detector: the OD API detector SavedModel folder, or a `DetectorDescription` (its
        SavedModel, signature and raw output keys, for a detector whose keys are not the OD
        API's); None exports a `postprocess_only` model.
      postprocess_config: a `PostProcessConfig`, a `postprocess.json` path (named in errors) or
        its dict.
      export_root: the directory TF Serving mounts (holds `models.config`).
      model_name: the served model name, also the directory `export_root/<model_name>`.
      options: the `ServingOptions` (version, overwrite, container path, batching, verification,
        and the `ModelOptions` of what the SavedModel holds); default `ServingOptions()`.
      warmup_images: paths, encoded bytes or uint8 `[H, W, 3]` arrays for the warmup requests and
        the verification; default one small generated image. Use real images from your data.

    Returns:
      A `ServingExport`.

    Raises:
      TfcalError: bad model name, version or container path; FileExistsError: the version
        exists and `overwrite` is False; verify.ExportVerificationError: verification failed
        (nothing is published).

    Example:
      >>> export_for_serving("detector/saved_model", "runs/x/postprocess.json", "export",
      ...                    "detector", options=ServingOptions(version=3, overwrite=True))
    """
    export = ExportOptions.at(export_root, model_name, options)
    if detector is not None and not isinstance(detector, DetectorDescription):
        detector = DetectorDescription(saved_model=str(detector))
    source = postprocess_config if isinstance(postprocess_config, (str, os.PathLike)) else \
        "postprocess config"
    config = saved_model.load_postprocess_config(postprocess_config)
    return _export(config, detector, export, warmup_images=warmup_images, config_source=source)


def export_handoff(
    postprocess_config: PostProcessConfig,
    detector: DetectorDescription | None,
    options: ExportOptions,
    *,
    config_source: str | os.PathLike = "postprocess config",
    category_ids: Sequence[int] | None = None,
) -> ServingExport:
    """Exports the two handoff records of a tuning run as a new TF Serving model version.

    Args:
      postprocess_config: the tuned `PostProcessConfig`.
      detector: the `DetectorDescription` it was tuned for (its SavedModel, signature, raw
        output keys and warmup image); None exports a `postprocess_only` model.
      options: the `ExportOptions`.
      config_source: the file `postprocess_config` came from, named in errors.
      category_ids: the category id of each class column as tuned (-1: none), which the
        verification holds the served classes to; default the description's `category_ids`
        (needed for a `postprocess_only` export to be checked against the tuning side).

    Returns, Raises: as `export_for_serving`; also TfcalError, before anything is written,
      when the SavedModel is not the one tuned (`handoff.check_detector`) or the description's
      category ids are not the post-processing's class ids.
    """
    if detector is not None:
        check_detector(postprocess_config, detector, config_source)
    if category_ids is None and detector is not None and detector.category_ids:
        category_ids = detector.category_ids
    if category_ids is not None and postprocess_config.class_ids and \
            tuple(category_ids) != tuple(postprocess_config.class_ids):
        raise TfcalError(f"{config_source}: class_ids: {list(postprocess_config.class_ids)} are "
                         f"not the detector description's category_ids "
                         f"{list(category_ids)}")
    warmup = () if detector is None or detector.warmup_image is None else (detector.warmup_image,)
    return _export(postprocess_config, detector, options, warmup_images=warmup,
                   config_source=config_source, category_ids=category_ids)


def _export(config: PostProcessConfig, description: DetectorDescription | None,
            options: ExportOptions, *, warmup_images: Sequence[Any], config_source,
            category_ids: Sequence[int] | None = None) -> ServingExport:
    """Builds, verifies and publishes one version (see the module docstring)."""
    export_root = options.export_root
    model_name = options.model_name
    container_base_path = options.container_base_path
    batching = options.batching
    overwrite = options.overwrite
    model_dir = export_root / model_name
    requested = version = options.version
    if version is None:
        version = next_version(model_dir)  # tentative: fixed when published
    elif (model_dir / str(version)).exists() and not overwrite:
        raise _version_exists(model_dir, version)

    detector = None
    if description is not None:
        detector = saved_model.load_described(description, options.model)
        _check_columns(config, detector.info, config_source)
    if detector is not None:
        images = list(warmup_images) or [default_warmup_image()]
        feeds = [serving_input(detector.info, image) for image in images]
        encoded = [_read_image(image)[1] for image in images]
    else:
        feeds = [postprocess_input(config)]
        encoded = []
    if batching is None:
        fixed_one = detector is not None and detector.info.batch_size == 1
        batching = BatchingParameters(max_batch_size=1) if fixed_one else BatchingParameters()

    model_dir.mkdir(parents=True, exist_ok=True)
    for folder in (model_dir, export_root):
        atomic.remove_stale(folder, what="an interrupted export")
    tmp = atomic.mkdtemp(model_dir, "version")
    try:
        result = saved_model.save_export(tmp, config, detector, options.model)
        write_warmup_requests(tmp / "assets.extra" / WARMUP_FILE, feeds, model_name=model_name)
        report = None
        if options.verify:
            reference_raw = _original_raw_outputs(detector, feeds[0]) if detector else None
            sample = verify_mod.VerificationSample(
                inputs=feeds[0],
                encoded_images=encoded[:1] if "encoded_image" in result.signatures else (),
                reference_raw=reference_raw,
            )
            # The served class ids are checked against the tuning side's category mapping.
            report = verify_mod.verify_export(tmp, config, sample,
                                              detector.info if detector else None,
                                              category_ids=category_ids)
            logger.info("verification passed: %s", report.summary())
        os.chmod(tmp, 0o777 & ~atomic.umask())  # private while written, then as mkdir makes
        # One lock for the export root: the version rename and models.config (which lists
        # every model) are updated together, one export at a time.
        with locks.hold(export_root, locks.command_line(), wait=PUBLISH_LOCK_WAIT_S,
                        what="export folder"):
            version = _publish(tmp, model_dir, requested, overwrite)
            models_config = write_models_config(export_root, container_base_path)
            batching_path = atomic.write_text(export_root / BATCHING_FILE,
                                              batching.to_text_proto())
    except BaseException as e:
        atomic.remove(tmp)
        reason = atomic.disk_error(e)
        if reason:
            raise TfcalError(f"{model_dir}: cannot write the export: {reason}") from None
        raise
    version_dir = model_dir / str(version)
    result = dataclasses.replace(result, path=version_dir)
    logger.info("exported %s version %d to %s", model_name, version, version_dir)
    return ServingExport(
        model_dir=model_dir,
        version=version,
        version_dir=version_dir,
        models_config=models_config,
        batching_parameters=batching_path,
        warmup_requests=version_dir / "assets.extra" / WARMUP_FILE,
        export=result,
        verification=report,
    )


def _version_exists(model_dir: Path, version: int) -> FileExistsError:
    return FileExistsError(
        f"{model_dir / str(version)} already exists; pass overwrite=True to replace version "
        f"{version}, or omit version to write {next_version(model_dir)}"
    )


def _publish(tmp: Path, model_dir: Path, version: int | None, overwrite: bool) -> int:
    """Renames the finished `tmp` to its version folder (under the model folder's lock) and
    returns the number. `version` None: the next free number at this moment, moving on past
    any that appears meanwhile. Never replaces a version, except `version` with `overwrite`."""
    if version is not None:
        if overwrite:
            atomic.replace_directory(tmp, model_dir / str(version))
        else:
            try:
                atomic.rename_noreplace(tmp, model_dir / str(version))
            except FileExistsError:
                raise _version_exists(model_dir, version) from None
        return version
    version = next_version(model_dir)
    while True:
        try:
            atomic.rename_noreplace(tmp, model_dir / str(version))
            return version
        except FileExistsError:  # made by something that does not take our lock
            version += 1


def _check_columns(config, info: saved_model.DetectorInfo, source) -> None:
    """The post-processing must read exactly the detector's raw score columns."""
    columns = info.raw_scores_shape[-1] if info.raw_scores_shape else None
    expected = config.num_classes + (1 if config.background_column else 0)
    if columns is not None and columns != expected:
        raise TfcalError(
            f"{source}: num_classes: {config.num_classes} (background_column "
            f"{str(config.background_column).lower()}, so {expected} score columns) does not "
            f"fit the detector {info.path}, whose {info.raw_scores_key!r} has {columns} columns"
        )
