"""A thin `Detector` over the OD API SavedModel loader, until `tfcal.detectors` has the seam.

It follows the agreed interface (`description`-less): `num_score_columns`, `batchable`,
`fingerprint()` and `__call__(images) -> (boxes [B, N, 4], scores [B, N, C])`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfcal import TfcalError
from tfcal.coco import cache as cache_lib
from tfcal.coco.runner import SignatureKeys, check_signature
from tfcal.config import ModelConfig
from tfcal.detectors.odapi import load_saved_model


class OdapiDetector:
    """An OD API export: uint8 images in, raw boxes and scores out (see `tfcal.coco.runner`)."""

    def __init__(self, model: ModelConfig):
        path = Path(model.saved_model)
        if not (path / "saved_model.pb").is_file():
            raise TfcalError(f"{path}: not a SavedModel folder (no saved_model.pb)")
        self.path = path
        self.keys = SignatureKeys(signature=model.signature, input=model.input,
                                  raw_boxes=model.raw_boxes, raw_scores=model.raw_scores)
        self._model = load_saved_model(path)
        self._fn, self.batchable = check_signature(self._model, path, self.keys)
        shape = self._fn.structured_outputs[self.keys.raw_scores].shape
        self.num_score_columns = shape[-1]

    def fingerprint(self) -> str:
        return cache_lib.model_fingerprint(self.path, keys=self.keys.as_tuple())

    def __call__(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        out = self._fn(**{self.keys.input: tf.constant(np.stack(images))})
        return out[self.keys.raw_boxes].numpy(), out[self.keys.raw_scores].numpy()


def open_detector(model: ModelConfig) -> OdapiDetector:
    return OdapiDetector(model)
