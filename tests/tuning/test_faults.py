"""Faults around a tuning run's outputs: one commit per run, locks, full and read-only disks,
and `tfcal report` validating before it writes (issue #14's fault corpus, cases 2, 3, 6, 7).

Disk faults use a small tmpfs in a private mount namespace (``unshare -m``, or ``unshare -rm``
when not root); they are skipped, saying why, where the system does not allow that.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import known_answer as ka
from tfcal import locks, rundir
from tfcal.cli import main
from tfcal.config import load_config
from tfcal.tuning import pipeline, report as report_lib

RUN_FILES = ("postprocess.json", "report.json", "report.md")


def _job(root: Path, **sections) -> Path:
    return ka.write_job(root, config=ka.default_config(**sections))


def _snapshot(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in RUN_FILES} | {
        "current": os.readlink(out / "current")}


@pytest.mark.slow
def test_run_files_are_one_generation_behind_one_link(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "KEEP_RUNS", 2)
    config = _job(tmp_path, output={"plots": True})
    cfg = load_config(config)
    gens = []
    for _ in range(3):
        pipeline.run_tune(cfg, export=False)
        gens.append(os.readlink(tmp_path / "run" / "current"))
    out = tmp_path / "run"
    assert len(set(gens)) == 3 and all(g.startswith("runs/") for g in gens)
    for name in (*RUN_FILES, "plots"):
        assert os.readlink(out / name) == f"current/{name}"
    # The newest KEEP_RUNS generations are kept; readers resolve `current` once.
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        Path(g).name for g in gens[1:])
    assert rundir.current_run(out) == out / gens[-1]
    assert (rundir.current_run(out) / "report.json").read_bytes() == \
        (out / "report.json").read_bytes()


@pytest.mark.slow
def test_a_failed_commit_leaves_the_previous_set_whole(tmp_path, monkeypatch, capsys):
    # Fault corpus: with the disk full mid-run, postprocess.json was replaced while
    # report.json stayed from the previous run. Here report.json fails to be written after
    # postprocess.json was: the published set must still be the previous run's, entirely.
    config = _job(tmp_path)
    assert main(["tune", str(config)]) == 0
    out = tmp_path / "run"
    before = _snapshot(out)
    real = report_lib.write_report

    def full_disk(run_dir, report, *, plots=True):
        (Path(run_dir) / "report.md").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "report.json"))

    monkeypatch.setattr(report_lib, "write_report", full_disk)
    cfg = load_config(config)
    ka_cfg = json.loads((out / "postprocess.json").read_text())
    capsys.readouterr()
    assert main(["tune", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "report.json: cannot write: No space left on device" in err
    assert _snapshot(out) == before
    assert [p.name for p in (out / "runs").iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(report_lib, "write_report", real)
    pipeline.run_tune(cfg, export=False)
    assert _snapshot(out)["current"] != before["current"]
    assert json.loads((out / "postprocess.json").read_text())["num_classes"] == \
        ka_cfg["num_classes"]


@pytest.mark.slow
def test_an_older_output_folder_is_converted_by_the_next_run(tmp_path):
    config = _job(tmp_path)
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    for name in RUN_FILES:
        (out / name).write_text("from an older tfcal")
    (out / "plots" / "old.png").write_bytes(b"")
    pipeline.run_tune(load_config(config), export=False)
    for name in RUN_FILES:
        assert (out / name).is_symlink()
    assert json.loads((out / "report.json").read_text())["classes"]
    assert not (out / "plots" / "old.png").exists()


def test_a_second_run_on_the_same_output_dir_names_the_holder(tmp_path, capsys):
    # Fault corpus: two runs at once on the same folders. The second now stops at once.
    import socket

    config = _job(tmp_path)
    with locks.hold(tmp_path / "run", "tfcal tune other.yaml", what="output.dir"):
        assert main(["tune", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"output.dir {tmp_path / 'run'}: in use by `tfcal tune other.yaml` (pid " \
           f"{os.getpid()} on host {socket.gethostname()}, since " in err
    assert not (tmp_path / "run" / "runs").exists()


# --- tfcal report: validate, render, then publish ------------------------------------------


@pytest.fixture
def tuned(tmp_path):
    config = _job(tmp_path, output={"plots": True})
    pipeline.run_tune(load_config(config), export=False)
    return tmp_path / "run"


def _edit_report(out: Path, edit) -> None:
    path = (out / "report.json").resolve()
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r.update(summary=[1, 2]), "summary: must be an object, got list"),
    (lambda r: r["classes"][0].pop("holdout"), "classes[0].holdout: missing"),
    (lambda r: r["summary"].update(holdout="x"), "summary.holdout: must be an object, got str"),
])
def test_report_validates_before_it_writes(tuned, capsys, edit, fragment):
    # Fault corpus: `tfcal report` rewrote report.json and the plots, then failed on a bad
    # field (and a non-object summary was an AttributeError, exit 3).
    _edit_report(tuned, edit)
    before = _snapshot(tuned)
    plots = sorted(p.name for p in (tuned / "plots").iterdir())
    assert main(["report", str(tuned)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "report.json" in err and fragment in err, err
    assert _snapshot(tuned) == before
    assert sorted(p.name for p in (tuned / "plots").iterdir()) == plots
    assert len(list((tuned / "runs").iterdir())) == 1


@pytest.mark.slow
def test_report_rerenders_into_a_new_generation(tuned):
    before = _snapshot(tuned)
    assert main(["report", str(tuned / "report.json")]) == 0
    after = _snapshot(tuned)
    assert after["current"] != before["current"]
    assert after["report.json"] == before["report.json"]
    assert after["postprocess.json"] == before["postprocess.json"]  # carried over


# --- full and read-only disks (tmpfs in a private mount namespace) -------------------------


def _unshare_prefix() -> list[str]:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux unshare(1) for a private tmpfs")
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"private tmpfs mounts are not permitted here ({' '.join(prefix)}: "
                    f"{probe.stderr.strip()})")
    return prefix


def _in_namespace(tmp_path: Path, script: str) -> dict:
    """Runs `script` (Python; `MNT` is a fresh tmpfs folder) in a private mount namespace and
    returns the JSON it prints last."""
    prefix = _unshare_prefix()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    body = textwrap.dedent('''
        import json, os, subprocess, sys
        from pathlib import Path
        MNT = Path(sys.argv[1])

        def tfcal(*args, patch=""):
            code = (patch + "\\n" if patch else "") + (
                "import sys; from tfcal.cli import main; sys.exit(main(sys.argv[1:]))")
            r = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                               capture_output=True, text=True)
            return r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    ''') + textwrap.dedent(script)
    (tmp_path / "inside.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(pipeline.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=48m tmpfs "$0" && '
                        'exec "$1" "$2" "$0"', str(mnt), sys.executable,
                        str(tmp_path / "inside.py")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_full_disk_mid_run_and_before_the_run(tmp_path):
    config = ka.write_job(tmp_path, config=ka.default_config(
        output={"dir": str(tmp_path / "mnt" / "out"), "plots": True}))
    result = _in_namespace(tmp_path, f'''
        config = {str(config)!r}
        first = tfcal("tune", config)
        out = MNT / "out"
        names = ("postprocess.json", "report.json", "report.md")
        before = {{n: (out / n).read_text() for n in names}}
        current = os.readlink(out / "current")
        with open(MNT / "fill", "wb") as f:  # fill the disk
            try:
                while True:
                    f.write(b"x" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        # The room check passes (patched to ask for nothing), then the disk is full mid-run.
        mid = tfcal("tune", config, patch="import tfcal.tuning.pipeline as p; "
                                          "p.OUTPUT_ROOM_BYTES = 0")
        same = {{n: (out / n).read_text() for n in names}} == before and \\
            os.readlink(out / "current") == current
        leftovers = sorted(p.name for p in (out / "runs").iterdir() if p.name.startswith("."))
        early = tfcal("tune", config)
        print(json.dumps({{"first": first, "mid": mid, "same": same, "leftovers": leftovers,
                          "early": early}}))
    ''')
    assert result["first"][0] == 0, result
    code, err = result["mid"]
    assert code == 2 and "cannot write: No space left on device" in err, result
    assert str(tmp_path / "mnt" / "out") in err
    assert result["same"] and result["leftovers"] == []
    code, err = result["early"]
    assert code == 2 and f"output.dir {tmp_path / 'mnt' / 'out'}: " in err and \
        "MB free on its file system" in err, result


@pytest.mark.slow
def test_read_only_and_full_export_folders_are_found_before_the_work(tmp_path):
    # Fault corpus: a read-only export folder and a full disk were internal errors naming no
    # path, and under `tfcal tune` came only after the whole run.
    config = ka.write_job(tmp_path, config=ka.default_config(
        output={"dir": str(tmp_path / "run")},
        export={"enabled": True, "dir": str(tmp_path / "mnt" / "ro" / "export"),
                "verify": False}))
    result = _in_namespace(tmp_path, f'''
        (MNT / "ro").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(MNT)], check=True)
        tune = tfcal("tune", {str(config)!r})
        print(json.dumps({{"tune": tune, "runs": os.path.exists({str(tmp_path / "run")!r})}}))
    ''')
    code, err = result["tune"]
    assert code == 2 and f"export.dir {tmp_path / 'mnt' / 'ro' / 'export'}: cannot write in " \
        in err and "Read-only file system" in err, result
    assert result["runs"] is False  # found before any work: no run was written
