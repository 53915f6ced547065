"""Fixtures for the docs examples: a stand-in for TF Serving that serves a real tfcal export."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

import tfcal.demo

DEMO_DETECTOR = Path(tfcal.demo.__file__).parent / "assets" / "detector"


@pytest.fixture(scope="module")
def tf_serving(tmp_path_factory):
    """A gRPC `PredictionService` on a free local port serving model `detector`: the demo
    detector exported by tfcal with its post-processing, loaded with `tf.saved_model.load` and
    called by signature name, as TF Serving calls it. Yields the port and a seeded JPEG to send
    (a bright square on a dark textured background)."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tfcal.demo.data import NUM_CLASSES
    from tfcal.export import ServingOptions, export_for_serving
    from tfcal.postprocess import PostProcessConfig

    config = PostProcessConfig(num_classes=NUM_CLASSES, min_score_thresh=[0.3], nms_iou=[0.5],
                               max_detections_per_class=50, max_total_detections=100)
    root = tmp_path_factory.mktemp("serving") / "export"
    served = export_for_serving(DEMO_DETECTOR, config, root, "detector",
                                options=ServingOptions(verify=False))
    models = {"detector": tf.saved_model.load(str(served.version_dir))}

    class Predictor(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (the gRPC method name)
            model = models.get(request.model_spec.name)
            if model is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_spec.name}")
            fn = model.signatures[request.model_spec.signature_name or "serving_default"]
            outputs = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(request.model_spec)
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Predictor(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, size=(96, 128, 3), dtype=np.uint8)
    image[30:70, 40:90] = (230, 40, 40)
    try:
        yield port, tf.io.encode_jpeg(image).numpy()
    finally:
        server.stop(grace=None)



@pytest.fixture(scope="module")
def tflite_postprocess():
    """The on-device post-processing of a small tuned config, converted with builtin ops, and
    one seeded input for it: `(model bytes, (boxes [1, N, 4], scores [1, N, C]))`."""
    from tfcal.export import tflite
    from tfcal.postprocess import PostProcessConfig

    config = PostProcessConfig(num_classes=3, min_score_thresh=[0.3, 0.4, 0.35],
                               nms_iou=[0.5, 0.6, 0.45], max_total_detections=100,
                               calibration="temperature",
                               calibration_params={"temperature": (1.2,)})
    model = tflite.convert(tflite.build_postprocess_fn(config, 64))
    return model, tflite.seeded_inputs(config, 64, count=1, seed=0)[0]
