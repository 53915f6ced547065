"""Arrays of an ``.npz`` read without loading them whole: stored members memory-mapped at their
zip offset, compressed members streamed a few rows at a time.

An ``.npz`` is a zip archive of ``.npy`` files. `np.savez` stores them uncompressed
(``ZIP_STORED``): the ``.npy`` bytes then sit contiguously in the archive, after the member's
local header, and `open_members` memory-maps the array data right there (read-only, no copy;
`tfcal.raw` views it as a `ReleasingMemmap`, so reading rows does not leave them in the
process RSS). `np.savez_compressed` deflates them: such a member (or a Fortran-order or
non-native-endian one, which cannot be mapped as C rows) is an `NpzStream`, whose `batches`
decompress `rows` rows at a time. Nothing here reads a whole array into memory.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True)
class NpzStream:
    """An npz member read sequentially (shape and dtype from its ``.npy`` header).

    Attributes:
      path: the npz file. member: the member's name (``boxes.npy``).
      shape: the array's shape. dtype: its dtype. fortran_order: its ``.npy`` flag.
    """

    path: Path
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The whole array in memory (for Fortran-order members, which have no C rows)."""
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        """C-order arrays of `rows` rows (the last one shorter), decompressed as they go.

        Raises:
          ValueError: Fortran order (no C rows), or the member ends early.
        """
        if self.fortran_order:
            raise ValueError(f"{self.member}: Fortran-order array cannot be read by rows")
        row_shape = self.shape[1:]
        row_bytes = self.dtype.itemsize * math.prod(row_shape)
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            _read_header(f)
            for start in range(0, self.shape[0], rows):
                k = min(rows, self.shape[0] - start)
                buf = f.read(k * row_bytes)
                if len(buf) != k * row_bytes:
                    raise ValueError(f"{self.member}: ends after {start} rows of "
                                     f"{self.shape[0]}")
                yield np.frombuffer(buf, self.dtype).reshape((k,) + row_shape)


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def _data_offset(fh, info: zipfile.ZipInfo) -> int:
    """Offset in the archive of the first byte of a stored member's data."""
    fh.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_MAGIC:
        raise ValueError(f"{info.filename}: bad zip local header")
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def open_members(path: str | Path, names: Sequence[str], *,
                 in_memory: Sequence[str] = ()) -> dict[str, np.ndarray | NpzStream]:
    """The arrays `names` of the npz `path`, without reading them whole.

    Args:
      path: the npz file.
      names: array names (without ``.npy``).
      in_memory: names read into memory as plain arrays (small ones, e.g. ``image_ids``).

    Returns:
      ``{name: array}``: a read-only `np.memmap` for a stored, C-order, native-endian
      member; an `NpzStream` for any other; an `np.ndarray` for the `in_memory` names.

    Raises:
      ValueError: not a zip archive, a missing array (message lists what it has), or a
        member that is not a readable ``.npy`` (object arrays are refused).
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a readable npz (not a zip archive)")
        out: dict[str, np.ndarray | NpzStream] = {}
        with zipfile.ZipFile(path) as zf:
            have = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            missing = [n for n in names if n not in have]
            if missing:
                raise ValueError(f"missing arrays {missing} (has {sorted(have)})")
            with open(path, "rb") as fh:
                for name in names:
                    member = have[name]
                    info = zf.getinfo(member)
                    if name in in_memory:
                        with zf.open(member) as f:
                            out[name] = np.lib.format.read_array(f, allow_pickle=False)
                        continue
                    with zf.open(member) as f:
                        shape, fortran, dtype = _read_header(f)
                        header = f.tell()
                    if dtype.hasobject:
                        raise ValueError(f"{name}: object arrays are not allowed")
                    mappable = (info.compress_type == zipfile.ZIP_STORED
                                and not info.flag_bits & 0x1 and not fortran
                                and dtype.isnative and math.prod(shape) > 0)
                    if mappable:
                        offset = _data_offset(fh, info) + header
                        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset,
                                              shape=tuple(shape))
                    else:
                        out[name] = NpzStream(path, member, tuple(shape), dtype, bool(fortran))
        return out
    except ValueError as e:
        if str(e).startswith(("not a readable npz", "missing arrays")):
            raise
        raise ValueError(f"not a readable npz (ValueError: {e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, struct.error) as e:
        raise ValueError(f"not a readable npz ({type(e).__name__}: {e})") from None
