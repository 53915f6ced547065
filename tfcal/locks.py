"""Advisory locks on output folders: one writer at a time, and a clear word about who holds it.

A lock is ``<folder>/.tfcal.lock``, held with ``flock(2)`` for as long as the holder runs: the
kernel releases it when the process ends, however it ends, so a killed run never leaves a
stale lock. The file also records the holder (pid, host, command, UTC start time) for the
message the next process shows; the file itself stays, and holds no lock once released.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from tfcal import TfcalError

LOCK_NAME = ".tfcal.lock"


def _describe(info: dict) -> str:
    if not info:
        return "another process (it has not recorded itself yet)"
    return (f"`{info.get('command', 'tfcal')}` (pid {info.get('pid')} on host "
            f"{info.get('host')}, since {info.get('since')})")


def holder(folder: str | Path) -> dict:
    """What the lock file of `folder` says about its holder ({} if nothing readable)."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def hold(folder: str | Path, command: str, *, wait: float = 0.0,
         what: str = "folder") -> Iterator[None]:
    """Holds the lock of `folder` (created if needed) for the block.

    Args:
      folder: the folder to lock.
      command: what the holder is doing, for others' messages (e.g. ``tfcal tune cfg.yaml``).
      wait: seconds to wait for another holder to finish; 0 fails at once.
      what: how messages name the folder (e.g. ``output.dir``).

    A folder this call created is removed again when the block raises and nothing else was
    written into it, so a run that fails on bad input leaves no output folder behind.

    Raises:
      TfcalError: the lock is held by another process (naming it, its host and start time)
        after `wait` seconds; or the folder cannot be written (naming it).
    """
    import fcntl

    folder = Path(folder)
    path = folder / LOCK_NAME
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TfcalError(f"{what} {folder}: cannot create {LOCK_NAME} "
                         f"({e.strerror or e})") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TfcalError(
                        f"{what} {folder}: in use by {_describe(holder(folder))}; wait for it "
                        f"to finish or use another folder ({path} is released when that "
                        "process ends)") from None
                time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield
        except BaseException:
            if created:  # a failed run leaves no folder it made (only the lock was in it)
                with contextlib.suppress(OSError):
                    path.unlink()
                    folder.rmdir()
            raise
    finally:
        os.close(fd)  # releases the flock


def command_line() -> str:
    """This process's command line, shortened, for `hold`'s `command`."""
    args = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    text = " ".join(args)
    return text if len(text) <= 200 else text[:197] + "..."
