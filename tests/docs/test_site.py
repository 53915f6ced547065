"""The documentation site builds with `mkdocs build --strict` (mkdocs.yml at the repository root).

Strict mode turns every warning into a failure: a page missing from the nav, a link to a missing
page or heading, a `::: tfcal.x` the API reference cannot resolve, a docstring griffe cannot
parse. The build reads the package's source (griffe, no import), so it takes about 3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    # The API reference is rendered from the docstrings, not left as `::: tfcal.layers...`.
    layers = (site / "api" / "layers" / "index.html").read_text()
    assert 'id="tfcal.layers.CombinedNMS"' in layers
    assert "::: tfcal" not in layers
    assert (site / "index.html").is_file()
