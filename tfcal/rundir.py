"""The output folder (`output.dir`): each run's files as one generation, switched by one link.

A run's outputs are written together into a new generation folder and published by replacing
one symbolic link, so a reader sees the previous run's set or the new one, never a mix:

    output.dir/
      runs/<UTC time>-<pid>/     postprocess.json, detector.json, report.json, report.md, plots/
      current -> runs/<...>      the published generation (relative link, replaced atomically)
      postprocess.json -> current/postprocess.json
      report.json, report.md, plots -> current/...    (the same, for the other files)
      cache/                     raw-output cache (default model.cache_dir)
      drift/drift-<UTC time>.json   one per `tfcal drift` run, never replaced
      .tfcal.lock                held by the run writing here (`tfcal.locks`)

The top-level links keep the old paths working. A reader that needs several files of one run
resolves `current` once (`current_run`) and reads them from there. The newest `KEEP_RUNS`
generations are kept; older ones are deleted after a commit. A folder written by an older
tfcal (plain files at the top) is converted by the first commit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from tfcal import atomic

log = logging.getLogger(__name__)

#: The tuned post-processing of a run (`tfcal.postprocess.PostProcessConfig`).
POSTPROCESS_FILE = "postprocess.json"
#: The detector it was tuned for (`tfcal.handoff.DetectorDescription`).
DETECTOR_FILE = "detector.json"
#: The files of one run, linked at the top of output.dir.
RUN_FILES = (POSTPROCESS_FILE, DETECTOR_FILE, "report.json", "report.md", "plots")
#: Generations kept under output.dir/runs/.
KEEP_RUNS = 5
CURRENT = "current"
RUNS = "runs"


def current_run(output_dir: str | Path) -> Path:
    """The folder holding the published run's files: ``output.dir/runs/<generation>`` (the link
    `current` read once), or `output_dir` itself for a folder of the old layout or none yet."""
    output_dir = Path(output_dir)
    try:
        target = os.readlink(output_dir / CURRENT)
    except OSError:
        return output_dir
    return output_dir / target


def output_dir_of(path: str | Path) -> Path:
    """The output.dir that `path` (an output.dir, a generation folder in it, or a file in
    either) belongs to."""
    path = Path(path)
    folder = path if path.is_dir() and not path.is_symlink() else path.parent
    if folder.parent.name == RUNS and (folder.parent.parent / CURRENT).is_symlink():
        return folder.parent.parent
    return folder


def _generation_name() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}"


@contextlib.contextmanager
def new_run(output_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder for a run's files; publishes it as `output_dir`'s current run when
    the block ends without error (nothing changes for readers otherwise).

    The folder is renamed to ``runs/<generation>`` (never replacing one), then `current` is
    switched with one atomic rename of a new link onto it. The caller should hold the folder's
    lock (`tfcal.locks.hold`), so that the last run to start is the one published.
    """
    output_dir = Path(output_dir)
    runs = output_dir / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(runs, what="an interrupted run")
    atomic.remove_stale(output_dir, what="an interrupted run")
    tmp = atomic.mkdtemp(runs, "run")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~atomic.umask())
        while True:
            final = runs / _generation_name()
            try:
                atomic.rename_noreplace(tmp, final)
                break
            except FileExistsError:  # pragma: no cover - same microsecond and pid
                continue
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(runs)
    _publish(output_dir, final)
    _prune(runs, keep=final)


def _link(output_dir: Path, name: str, target: str) -> None:
    """Points ``output_dir/name`` at `target` (relative), replacing what is there atomically."""
    path = output_dir / name
    try:
        if os.readlink(path) == target:
            return
    except OSError:
        pass
    tmp = output_dir / atomic.temp_name(name)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)  # a link or a file: replaced in one rename
    except IsADirectoryError:
        atomic.replace_directory(tmp, path)  # a plots/ folder of the old layout
    except BaseException:
        atomic.remove(tmp)
        raise


def _publish(output_dir: Path, final: Path) -> None:
    _link(output_dir, CURRENT, f"{RUNS}/{final.name}")
    for name in RUN_FILES:
        if (final / name).exists():
            _link(output_dir, name, f"{CURRENT}/{name}")
        else:  # e.g. no plots this time: nothing of an earlier run may look like this run's
            atomic.remove(output_dir / name)
    _fsync_dir(output_dir)


def _prune(runs: Path, *, keep: Path) -> None:
    gens = sorted(p for p in runs.iterdir() if not p.name.startswith(".") and p.is_dir())
    for old in gens[:-KEEP_RUNS]:
        if old != keep:
            log.debug("removing old run %s", old)
            atomic.remove(old)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
