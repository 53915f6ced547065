"""tfcal: calibrate detector scores, tune per-class thresholds and NMS IoU, export for TF Serving."""

__version__ = "0.1.0"


class TfcalWarning(UserWarning):
    """Base class of every warning tfcal emits (tests turn these into errors)."""


class TfcalError(ValueError):
    """A bad input found at a boundary: the message names the file and field."""
