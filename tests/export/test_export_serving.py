"""Tests for tfcal.export.serving: versions, models.config, batching file, warmup, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tfcal import TfcalError
from tfcal.export import serving
from tfcal.export import verify


def _batching_parameters_class():
    """`tensorflow.serving.BatchingParameters`, declared here: its proto ships with the server only.

    Field names and numbers copied from tensorflow_serving/servables/tensorflow/
    session_bundle_config.proto (Int64Value wrappers 1-4, thread_pool_name 5, repeated
    allowed_batch_sizes 6, pad_variable_length_inputs 7).
    """
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    f = descriptor_pb2.FileDescriptorProto(
        name="batching.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = f.message_type.add(name="BatchingParameters")
    fd = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(
        ["max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"],
        start=1,
    ):
        msg.field.add(
            name=name,
            number=number,
            type=fd.TYPE_MESSAGE,
            label=fd.LABEL_OPTIONAL,
            type_name=".google.protobuf.Int64Value",
        )
    msg.field.add(
        name="thread_pool_name",
        number=5,
        type=fd.TYPE_MESSAGE,
        label=fd.LABEL_OPTIONAL,
        type_name=".google.protobuf.StringValue",
    )
    msg.field.add(name="allowed_batch_sizes", number=6, type=fd.TYPE_INT64, label=fd.LABEL_REPEATED)
    msg.field.add(
        name="pad_variable_length_inputs", number=7, type=fd.TYPE_BOOL, label=fd.LABEL_OPTIONAL
    )
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


@pytest.mark.slow
def test_served_layout_and_verification(served):
    assert served.version == 1
    assert served.version_dir == served.model_dir / "1"
    assert (served.version_dir / "saved_model.pb").is_file()
    assert (served.version_dir / "assets" / "tfcal_postprocess.json").is_file()
    # Only the version directory is left: no temporaries.
    assert sorted(p.name for p in served.model_dir.iterdir()) == ["1"]
    report = served.verification
    assert report.passed, report.failures()
    assert {"fresh_process", "saved_model_cli", "encoded_image"} <= set(report.max_abs_diff)
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert report.num_detections and report.num_detections[0] > 0
    assert report.nms_ops["serving_default"] == report.nms_ops["postprocess_only"]
    assert (
        report.raw_vs_detector_max_abs_diff is not None
        and report.raw_vs_detector_max_abs_diff < 1e-5
    )


@pytest.mark.slow
def test_models_config_parses(served, tmp_path):
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(served.models_config.read_text(), config)
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == (
        "det",
        "/models/det",
        "tensorflow",
    )
    # Configurable container path; several models are listed.
    (tmp_path / "a" / "3").mkdir(parents=True)
    (tmp_path / "b" / "1").mkdir(parents=True)
    (tmp_path / "not_a_model").mkdir()
    path = serving.write_models_config(tmp_path, "/srv/models/")
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [
        ("a", "/srv/models/a"),
        ("b", "/srv/models/b"),
    ]
    with pytest.raises(TfcalError, match="container_base_path.*'models'"):
        serving.write_models_config(tmp_path, "models")


@pytest.mark.slow
def test_batching_parameters_file_parses(served):
    cls = _batching_parameters_class()
    params = text_format.Parse(served.batching_parameters.read_text(), cls())
    assert params.max_batch_size.value == 8 and params.num_batch_threads.value == 2
    custom = serving.BatchingParameters(max_batch_size=4, allowed_batch_sizes=(1, 2, 4))
    params = text_format.Parse(custom.to_text_proto(), cls())
    assert (
        list(params.allowed_batch_sizes) == [1, 2, 4] and params.batch_timeout_micros.value == 2000
    )


def test_batching_parameters_validation():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        serving.BatchingParameters(max_batch_size=0)
    with pytest.raises(ValueError, match="allowed_batch_sizes"):
        serving.BatchingParameters(max_batch_size=8, allowed_batch_sizes=(1, 4))


@pytest.mark.slow
def test_warmup_records_parse(served):
    (log,) = serving.read_warmup_requests(served.warmup_requests)
    request = log.predict_log.request
    assert (request.model_spec.name, request.model_spec.signature_name) == (
        "det",
        "serving_default",
    )
    image = tf.make_ndarray(request.inputs["input_tensor"])
    assert image.dtype == np.uint8 and image.shape == (1, 48, 64, 3)


def test_versions(tmp_path):
    assert serving.next_version(tmp_path / "missing") == 1
    for name in ["1", "3", ".4.abc.tmp", "notes"]:
        (tmp_path / name).mkdir()
    assert serving.existing_versions(tmp_path) == [1, 3]
    assert serving.next_version(tmp_path) == 4


@pytest.mark.slow
def test_next_version_and_no_overwrite(served, image_detector, postprocess_config):
    root = served.model_dir.parent
    with pytest.raises(FileExistsError, match="1 already exists; pass overwrite=True"):
        serving.export_for_serving(
            image_detector, postprocess_config, root, "det",
            options=serving.ServingOptions(version=1, verify=False)
        )
    second = serving.export_for_serving(
        image_detector, postprocess_config, root, "det",
        options=serving.ServingOptions(verify=False)
    )
    assert second.version == 2 and (second.version_dir / "saved_model.pb").is_file()
    before = (served.model_dir / "2" / "saved_model.pb").stat().st_mtime_ns
    again = serving.export_for_serving(
        image_detector, postprocess_config, root, "det",
        options=serving.ServingOptions(version=2, overwrite=True, verify=False)
    )
    assert (
        again.version == 2 and (again.version_dir / "saved_model.pb").stat().st_mtime_ns != before
    )
    assert sorted(p.name for p in served.model_dir.iterdir()) == ["1", "2"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_name": "a/b"}, "model_name"),
        ({"model_name": "m", "version": 0}, "version: must be an integer >= 1, got 0"),
        ({"model_name": "m", "container_base_path": "rel"}, "container_base_path"),
    ],
)
def test_bad_arguments(tmp_path, postprocess_config, kwargs, match):
    with pytest.raises(TfcalError, match=match):
        serving.export_for_serving(None, postprocess_config, tmp_path, kwargs.pop("model_name"),
                                   options=serving.ServingOptions(**kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_version(
    tmp_path, monkeypatch, image_detector, postprocess_config, error
):
    written = []

    def failing_warmup(path, *args, **kwargs):
        # The SavedModel is already in the temporary directory: fail half-way through the version.
        written.append(sorted(p.name for p in path.parents[1].iterdir()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise error

    monkeypatch.setattr(serving, "write_warmup_requests", failing_warmup)
    with pytest.raises(type(error)):
        serving.export_for_serving(
            image_detector, postprocess_config, tmp_path, "det",
            options=serving.ServingOptions(verify=False)
        )
    assert "saved_model.pb" in written[0]
    assert list((tmp_path / "det").iterdir()) == []  # no version, no temporary directory
    assert not (tmp_path / "models.config").exists()


@pytest.mark.slow
def test_failed_verification_publishes_nothing(
    tmp_path, monkeypatch, image_detector, postprocess_config
):
    def failing_verify(*args, **kwargs):
        raise verify.ExportVerificationError("parity: max abs diff 1.0")

    monkeypatch.setattr(verify, "verify_export", failing_verify)
    with pytest.raises(verify.ExportVerificationError):
        serving.export_for_serving(image_detector, postprocess_config, tmp_path, "det")
    assert list((tmp_path / "det").iterdir()) == []
