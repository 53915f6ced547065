"""Atomic writes: a file or directory appears whole, or not at all.

Everything users depend on (reports, caches, exports) is written to a temporary sibling and
renamed into place, so a crash or Ctrl-C never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically (temporary sibling, fsync, `os.replace`)."""
    return write_with(path, lambda f: f.write(data))


def write_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Calls `write(f)` on a binary file that becomes `path` only once `write` returned and
    the bytes are on disk (temporary sibling, fsync, `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so a
        # server running as another user (e.g. TF Serving in a container) can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes `obj` as indented JSON (no NaN/Infinity: they are not JSON) atomically."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` when the block ends without error.

    Args:
      path: the final directory. Its parent is created if needed.
      overwrite: replace an existing `path`; when False an existing `path` raises
        `FileExistsError` before anything is written.

    The temporary directory is a hidden sibling of `path` (same file system, so the final
    rename is atomic). On any exception, including KeyboardInterrupt, it is removed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700), unlike mkdir
        if path.exists() and not overwrite:  # it appeared while we were writing
            raise FileExistsError(f"{path} already exists")
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Renames the directory `tmp` to `final`; an existing `final` is first moved aside under a
    unique hidden name (``.<name>.old-<host>-<pid>-<random>``), then deleted."""
    tmp, final = Path(tmp), Path(final)
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if not (final.exists() or final.is_symlink()):
            raise
    old = final.with_name(f".{final.name}.old-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    finally:
        remove(old)


def host_tag() -> str:
    """This host's name reduced to ``[A-Za-z0-9_]``, for temporary names owned by a process."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def remove(path: str | Path) -> None:
    """Deletes a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
