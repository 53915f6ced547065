"""Every ```python block of the docs pages and of README.md runs, each in a fresh namespace in an
empty working directory.

Examples that need a model use tiny seeded arrays (or the bundled demo detector). A block that
cannot run here is preceded by `<!-- docs-example: skip (the reason) -->` and is reported as
skipped with that reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
_BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```$", re.S | re.M)
_SKIP = re.compile(r"<!-- docs-example: skip \((?P<reason>[^)]+)\) -->\s*$")
# Blocks that import TensorFlow take seconds (its import alone): marked slow.
_HEAVY = re.compile(r"\b(keras|tensorflow|tfcal\.(layers|calibration|postprocess|export))\b")


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = _SKIP.search(before)
            yield pytest.param(
                page.relative_to(REPO).as_posix(), line, match["code"],
                skip["reason"] if skip else None,
                id=f"{page.relative_to(REPO).as_posix()}:{line}",
                marks=[pytest.mark.slow] if _HEAVY.search(match["code"]) else [])


BLOCKS = list(_blocks())


def test_the_pages_have_examples():
    # The collector finds the examples: a changed fence or page layout must not empty this test.
    pages = {p.values[0] for p in BLOCKS}
    assert {"docs/layers.md", "docs/own-model.md", "docs/configuration.md"} <= pages


@pytest.mark.parametrize("page, line, code, skip", BLOCKS)
def test_example_runs(page, line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"{page}:{line}: {skip}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs_example__"})
