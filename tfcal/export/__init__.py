"""Exports tuned post-processing: detector wrapping (through its adapter), TF Serving package,
verification, and the on-device (TFLite) post-processing."""

from tfcal.export.saved_model import DETECTION_KEYS
from tfcal.export.saved_model import INPUT_TYPES
from tfcal.export.saved_model import DetectorInfo
from tfcal.export.saved_model import ExportResult
from tfcal.export.saved_model import ModelOptions
from tfcal.export.saved_model import ServingGraph
from tfcal.export.saved_model import count_nms_ops
from tfcal.export.saved_model import detect_input_type
from tfcal.export.saved_model import export_detector
from tfcal.export.saved_model import load_detector
from tfcal.export.serving import BatchingParameters
from tfcal.export.serving import ExportOptions
from tfcal.export.serving import ServingExport
from tfcal.export.serving import ServingOptions
from tfcal.export.serving import export_for_serving
from tfcal.export.serving import export_handoff
from tfcal.export.serving import next_version
from tfcal.export.serving import read_warmup_requests
from tfcal.export.serving import write_models_config
from tfcal.export.tflite import TFLiteVerificationError
from tfcal.export.tflite import TFLiteVerifyInputs
from tfcal.export.tflite import export_tflite_handoff
from tfcal.export.verify import ExportVerificationError
from tfcal.export.verify import VerificationReport
from tfcal.export.verify import VerificationSample
from tfcal.export.verify import VerifyOptions
from tfcal.export.verify import verify_export

__all__ = [
    "DETECTION_KEYS",
    "INPUT_TYPES",
    "BatchingParameters",
    "DetectorInfo",
    "ExportOptions",
    "ExportResult",
    "ExportVerificationError",
    "ModelOptions",
    "ServingGraph",
    "TFLiteVerificationError",
    "TFLiteVerifyInputs",
    "ServingExport",
    "ServingOptions",
    "VerificationReport",
    "VerificationSample",
    "VerifyOptions",
    "count_nms_ops",
    "detect_input_type",
    "export_detector",
    "export_for_serving",
    "export_handoff",
    "export_tflite_handoff",
    "load_detector",
    "next_version",
    "read_warmup_requests",
    "verify_export",
    "write_models_config",
]
