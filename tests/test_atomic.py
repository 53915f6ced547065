"""Tests of tfcal.atomic: results appear whole or not at all."""

import json
import os
import stat

import pytest

from tfcal import atomic


def test_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_rejects_nan_and_leaves_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        atomic.write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_directory_is_removed_on_interrupt(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic.directory(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_directory_refuses_existing_unless_overwrite(tmp_path):
    target = tmp_path / "out"
    with atomic.directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic.directory(target):
            pass
    with atomic.directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_and_directories_get_the_usual_modes(tmp_path):
    # A model server often runs as another user: what we write must be readable like a file
    # made by open() or a folder made by mkdir (tempfile would make them private).
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "models.config", "x")
        with atomic.directory(tmp_path / "1") as d:
            (d / "saved_model.pb").write_bytes(b"")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "models.config").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "1").st_mode) == 0o755


# --- never replacing what another process made ---------------------------------------------


def test_rename_noreplace_never_replaces_even_an_empty_directory(tmp_path):
    # Plain rename(2) silently replaces an empty directory: a version folder another process
    # just created (still empty, being filled) would be lost.
    src, dst = tmp_path / "src", tmp_path / "1"
    src.mkdir()
    (src / "a").write_text("mine")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(src, dst)
    assert list(dst.iterdir()) == [] and (src / "a").read_text() == "mine"
    other = tmp_path / "f"
    other.write_text("theirs")
    mine = tmp_path / "g"
    mine.write_text("mine")
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(mine, other)
    assert other.read_text() == "theirs"
    atomic.rename_noreplace(mine, tmp_path / "h")
    assert (tmp_path / "h").read_text() == "mine" and not mine.exists()


def test_replace_directory_deletes_exactly_what_it_swapped_out(tmp_path):
    final = tmp_path / "1"
    final.mkdir()
    (final / "old").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "new").write_text("new")
    atomic.replace_directory(new, final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # nothing moved aside left


def test_write_json_new_refuses_an_existing_file(tmp_path):
    path = tmp_path / "drift.json"
    atomic.write_json_new(path, {"run": 1})
    with pytest.raises(FileExistsError):
        atomic.write_json_new(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["drift.json"]


def test_dead_processes_temporaries_are_reclaimed(tmp_path):
    host = atomic.host_tag()
    dead = 4194304 + 17  # above Linux's largest pid_max (2**22): no such process
    stale = [tmp_path / f".1.tmp-{host}-{dead}-ab12", tmp_path / f".tfcal_meta.tmp-{host}-{dead}-c"]
    kept = [tmp_path / f".2.tmp-{host}-{os.getppid()}-x1",  # a live process
            tmp_path / f".3.tmp-otherhost-{dead}-x2",  # another host's: cannot know
            tmp_path / "1"]
    for p in stale + kept:
        p.mkdir()
    (tmp_path / f".report.json.tmp-{host}-{dead}-ff").write_text("half")
    stale.append(tmp_path / f".report.json.tmp-{host}-{dead}-ff")
    with atomic.directory(tmp_path / "4") as d:  # every directory() reclaims its folder
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + ["4"])


def test_check_room_names_the_folder(tmp_path):
    from tfcal import TfcalError

    atomic.check_room(tmp_path / "not" / "yet", 1, "output.dir")  # checked via its parent
    assert not (tmp_path / "not").exists()  # and nothing created
    with pytest.raises(TfcalError, match=r"output.dir .*: .* MB free on its file system, about "
                                         r".* MB needed"):
        atomic.check_room(tmp_path, 1 << 62, "output.dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TfcalError, match="is not a folder"):
        atomic.check_room(tmp_path / "file" / "sub", 1, "export.dir")


# --- locks ---------------------------------------------------------------------------------


def test_lock_names_its_holder_and_is_released(tmp_path):
    import socket

    from tfcal import TfcalError, locks

    with locks.hold(tmp_path, "tfcal tune a.yaml", what="output.dir"):
        with pytest.raises(TfcalError) as info:
            with locks.hold(tmp_path, "tfcal tune b.yaml", what="output.dir"):
                pass
    msg = str(info.value)
    assert f"output.dir {tmp_path}: in use by `tfcal tune a.yaml` (pid {os.getpid()} on host " \
           f"{socket.gethostname()}, since 20" in msg and "UTC)" in msg
    with locks.hold(tmp_path, "tfcal tune b.yaml"):  # released when the holder left
        pass


def test_failed_holder_leaves_no_folder_it_created(tmp_path):
    from tfcal import locks

    with pytest.raises(RuntimeError):
        with locks.hold(tmp_path / "out", "x"):
            raise RuntimeError
    assert not (tmp_path / "out").exists()
