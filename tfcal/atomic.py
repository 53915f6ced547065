"""Atomic writes: a file or directory appears whole, or not at all.

Everything users depend on (reports, caches, exports) is written to a temporary sibling and
renamed into place, so a crash or Ctrl-C never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from tfcal import TfcalError

logger = logging.getLogger(__name__)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Temporary names owned by a process: ``.<name>.tmp-<host>-<pid>-<random>`` (``.old-`` for a
#: directory being replaced). `remove_stale` deletes those whose process is gone.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-"
                     r"[A-Za-z0-9_]+$")

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def temp_name(name: str, kind: str = "tmp") -> str:
    """A hidden name for a temporary sibling of `name`, owned by this process (see `TEMP_RE`)."""
    return f".{name}.{kind}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def mkdtemp(parent: str | Path, name: str) -> Path:
    """Creates the private temporary directory ``parent/<temp_name(name)>``."""
    parent = Path(parent)
    while True:
        path = parent / temp_name(name)
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically (temporary sibling, fsync, `os.replace`)."""
    return write_with(path, lambda f: f.write(data))


def _write_temp(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Writes a fsynced temporary sibling of `path` with the usual file mode; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # Give it the mode a plain open() would, so a server running as another user (e.g. TF
        # Serving in a container) can read it.
        os.chmod(tmp, 0o666 & ~umask())
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # e.g. a full disk in write()
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return tmp


def write_with(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Calls `write(f)` on a binary file that becomes `path` only once `write` returned and
    the bytes are on disk (temporary sibling, fsync, `os.replace`)."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def fsync_file(path: str | Path) -> None:
    """Flushes the file `path` (written by other means, e.g. a memory map) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flushes the directory `path` (its entries: files created or renamed in it) to disk; best
    effort: directories can be fsynced on POSIX only."""
    if os.name == "posix":
        with contextlib.suppress(OSError):
            fsync_file(path)


def write_text(path: str | Path, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes `obj` as indented JSON (no NaN/Infinity: they are not JSON) atomically."""
    return write_text(path, _json_text(obj))


def write_json_new(path: str | Path, obj: Any) -> Path:
    """Like `write_json`, but never replaces: `FileExistsError` when `path` exists (also when
    another process creates it meanwhile); nothing is left behind then."""
    path = Path(path)
    tmp = _write_temp(path, lambda f: f.write(_json_text(obj).encode("utf-8")))
    try:
        rename_noreplace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False, sort_keys=False) + "\n"


@contextlib.contextmanager
def directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` when the block ends without error.

    Args:
      path: the final directory. Its parent is created if needed.
      overwrite: replace an existing `path`; when False an existing `path` raises
        `FileExistsError`, before anything is written and again at the final rename, which
        never replaces a directory another process put there meanwhile.

    The temporary directory is a hidden sibling of `path` (same file system, so the final
    rename is atomic) named by `temp_name`. On any exception, including KeyboardInterrupt, it
    is removed; one left by a killed process is removed by the next `directory` call in the
    same folder (`remove_stale`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    tmp = mkdtemp(path.parent, path.name)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # private (0700) while written, then as mkdir makes
        if overwrite:
            replace_directory(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """`renameat2(2)` with `flags`; False where the system or file system lacks it."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None)
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Renames `src` (file or directory) to `dst`, which must not exist: `FileExistsError`
    otherwise, and an existing `dst` is never touched, even one created at the same instant.

    Uses ``renameat2(RENAME_NOREPLACE)`` (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...).
    Elsewhere a file is linked then unlinked (also atomic and never replacing); a directory is
    renamed after an existence check, which a concurrent creation of `dst` can still race.
    """
    src, dst = Path(src), Path(dst)
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst)) from None
    if not src.is_dir():
        try:
            os.link(src, dst)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst)) from None
        os.unlink(src)
        return
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst))
    os.rename(src, dst)  # fails on a non-empty directory; may replace an empty one (see above)


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Puts the directory `tmp` at `final`, replacing what is there, then deletes the old one.

    The swap is one ``renameat2(RENAME_EXCHANGE)``: what is deleted is exactly what was at
    `final` at that instant, never a directory that appeared between a check and a rename.
    Without that call, an existing `final` is moved aside under a unique hidden name first.
    """
    tmp, final = Path(tmp), Path(final)
    try:
        rename_noreplace(tmp, final)
        return
    except FileExistsError:
        pass
    if _renameat2(tmp, final, _RENAME_EXCHANGE):
        remove(tmp)  # now the old `final`
        return
    old = final.with_name(temp_name(final.name, "old"))  # pragma: no cover - no renameat2
    os.replace(final, old)
    try:
        rename_noreplace(tmp, final)
    finally:
        remove(old)


#: errno values that say the place is unusable (full, read-only, not ours), not that tfcal erred.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                  "Permission denied")


def disk_error(err: BaseException) -> str:
    """The reason when `err` says a write failed for lack of room or permission ('' otherwise);
    also recognizes TensorFlow's errors, which carry the OS message in their text."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return err.strerror or str(err)
    text = str(err)
    for m in _DISK_MESSAGES:
        if m in text:
            return m
    return ""


def check_room(folder: str | Path, need_bytes: int, what: str) -> None:
    """Checks, before any work, that `folder` can be written and has `need_bytes` free.

    A folder that does not exist yet is checked through its nearest existing parent (nothing
    is created). A probe file is created and deleted to learn whether writing works.

    Raises:
      TfcalError: naming `what` and the folder: not a folder, not writable, or too little room.
    """
    folder = Path(folder)
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise TfcalError(f"{what} {folder}: {place} is not a folder")
    probe = place / temp_name("probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise TfcalError(f"{what} {folder}: cannot write in {place} "
                         f"({e.strerror or e})") from None
    free = shutil.disk_usage(place).free
    if free < need_bytes:
        raise TfcalError(f"{what} {folder}: {free / 1e6:.1f} MB free on its file system, "
                         f"about {need_bytes / 1e6:.1f} MB needed")


def host_tag() -> str:
    """This host's name reduced to ``[A-Za-z0-9_]``, for temporary names owned by a process."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def process_gone(pid: int) -> bool:
    """True only when no process `pid` exists on this host (POSIX; elsewhere: never known)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it exists
        return False
    return False


def remove_stale(folder: str | Path, *, what: str = "an interrupted write") -> list[Path]:
    """Deletes the temporary files and directories (`TEMP_RE`) in `folder` left by processes of
    this host that are gone; returns them. Others' live temporaries are never touched."""
    host, me = host_tag(), os.getpid()
    removed = []
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            m = TEMP_RE.match(p.name)
            if m is None or m.group("host") != host or int(m.group("pid")) == me:
                continue
            if process_gone(int(m.group("pid"))):
                logger.info("removing %s, left by %s", p, what)
                remove(p)
                removed.append(p)
    return removed


def remove(path: str | Path) -> None:
    """Deletes a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
