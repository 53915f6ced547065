"""Raw detector outputs and their storage: the `RawOutputs` record, the fingerprints that key
the cache, the verified cache directory (writer and reader), precomputed ``.npz`` outputs and
their conversion, and the value checks (one box-range check for every path).

Modules, bottom up: `record` (the record and its read-only memory map), `fingerprint`,
`checks`, `npz` (npz members read without loading them whole), `cache` (the on-disk format,
its writer and verified reader), `precomputed` (a user's npz or folder for a data set, and
`tfcal convert-raw-outputs`). This package imports nothing of tfcal but the root package,
`tfcal.atomic` and `tfcal.vocabulary`: the COCO code, the detectors, the detector handoff, the
Beam runner and the tuner build on it.
"""

from tfcal.raw.cache import RawOutputsWriter, cache_path, load_cache, save_cache
from tfcal.raw.checks import BOX_TOLERANCE, check_box_range, check_value_ranges
from tfcal.raw.fingerprint import (combined_fingerprint, data_fingerprint, file_sha256,
                                   model_fingerprint)
from tfcal.raw.precomputed import convert_raw_outputs, load_raw_outputs, save_npz_atomic
from tfcal.raw.record import RawOutputs, ReleasingMemmap

__all__ = [
    "BOX_TOLERANCE", "RawOutputs", "RawOutputsWriter", "ReleasingMemmap", "cache_path",
    "check_box_range", "check_value_ranges", "combined_fingerprint", "convert_raw_outputs",
    "data_fingerprint", "file_sha256", "load_cache", "load_raw_outputs", "model_fingerprint",
    "save_cache", "save_npz_atomic",
]
