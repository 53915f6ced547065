"""The config reference page (docs/reference/config.md) is what tools/config_reference.py
generates from tfcal/config.py and configs/example.yaml: never hand-edited, never stale."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from tfcal.config import Config

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _key_paths(cls, prefix=""):
    """Every settable key path of the schema below the top-level sections (`model.format`,
    `model.yolo`, `model.yolo.preset`, ...)."""
    for field in dataclasses.fields(cls):
        if not field.compare:  # Config.source / Config.sha256: bookkeeping, not keys
            continue
        path = f"{prefix}{field.name}"
        if prefix:
            yield path
        if dataclasses.is_dataclass(field.default):
            yield from _key_paths(type(field.default), f"{path}.")


@pytest.mark.slow  # the calibration method names come from the registry, which imports TF
def test_page_is_what_the_code_generates():
    assert gen.PAGE.read_text() == gen.render(), (
        "docs/reference/config.md differs from tfcal/config.py and configs/example.yaml: "
        "run python tools/config_reference.py")


def test_every_key_of_the_schema_is_on_the_page_under_its_section():
    text = gen.PAGE.read_text()
    sections = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            current = line.split(" ", 1)[1]
            sections[current] = []
        elif line.startswith("| `") and current is not None:
            sections[current].append(line.split("`")[1])
    for field in dataclasses.fields(Config):
        if field.compare:
            assert field.name in sections, f"section {field.name} is missing"
    for path in _key_paths(Config):
        section, _, key = path.rpartition(".")
        assert key in sections.get(section, []), f"{path} is missing from the config reference"
    # The per-class override entries have their own table.
    assert "target_precision" in sections["tuning.classes.&lt;class&gt;"]


def test_every_key_has_a_description_in_the_example():
    comments = gen.example_comments(gen.EXAMPLE.read_text())
    missing = [p for p in _key_paths(Config) if not comments.get(p)]
    assert not missing, f"keys without a comment in configs/example.yaml: {missing}"


def test_defaults_on_the_page_are_the_dataclass_defaults():
    text = gen.PAGE.read_text()
    # Hand-picked from tfcal/config.py: one of each value kind.
    for row in ("| `holdout_fraction` | number; must be in (0, 1) | `0.3` |",
                "| `nms_iou_grid` | list of numbers | `[0.4, 0.5, 0.6, 0.7]` |",
                "| `confidence` | number or `null` | `0.95` |",
                "| `background_column` | `true` or `false` | `true` |",
                "| `on_unreachable` | one of `disable`, `best_effort`, `error`, `pool` | `pool` |"):
        assert row in text


def test_comment_parser_reads_leading_trailing_and_continued_comments():
    text = (
        "# a file header, not a key's\n"
        "\n"
        "model:\n"
        "  # leading: belongs to format\n"
        "  format: odapi   # trailing\n"
        "                  # continued\n"
        "  yolo:           # a subsection\n"
        "    preset: null  # its key\n"
        "  classes: {}     # overrides, e.g.\n"
        "  #   person: {target_precision: 0.95}\n"
        "  # leading: belongs to batch_size\n"
        "  batch_size: 8\n"
    )
    assert gen.example_comments(text) == {
        "model": "",
        "model.format": "leading: belongs to format trailing continued",
        "model.yolo": "a subsection",
        "model.yolo.preset": "its key",
        "model.classes": "overrides, e.g. person: {target_precision: 0.95}",
        "model.batch_size": "leading: belongs to batch_size",
    }


def test_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(gen.PAGE.read_text().replace("| `seed` | integer | `0` |",
                                                  "| `seed` | integer | `1` |"))
    monkeypatch.setattr(gen, "PAGE", stale)
    monkeypatch.setattr(gen, "render", lambda: gen.PAGE.read_text().replace(
        "| `seed` | integer | `1` |", "| `seed` | integer | `0` |"))
    assert gen.main(["--check"]) == 1
    assert "is stale" in capsys.readouterr().err
