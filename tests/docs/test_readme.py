"""README.md is the front door: its two commands are the ones CI runs, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
INSTALL = ("python3 -m venv .venv && .venv/bin/pip install -e '.[test,plots]' "
           "&& .venv/bin/tfcal demo")
TESTS = ".venv/bin/python -m pytest"
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _headings(text: str) -> set[str]:
    """The anchors GitHub and the site's toc give a page's headings (lowercase, dashes)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {slugify(m[1].replace("`", ""), "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_two_commands_are_the_ones_ci_runs():
    assert INSTALL in README
    assert TESTS in README
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test,plots]'" in ci
    assert f"{TESTS}\n" in ci


def test_every_relative_link_resolves():
    links = [m["target"] for m in _LINK.finditer(README)]
    relative = [t for t in links if not re.match(r"[a-z]+:", t)]
    assert len(relative) >= 10, "the front door links into the site"
    for target in relative:
        path, _, anchor = target.partition("#")
        file = REPO / path if path else REPO / "README.md"
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in _headings(file.read_text()), (
                f"README.md links to {target}: no heading with that anchor")
