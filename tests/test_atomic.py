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
