"""Every ```python block of the docs pages and of README.md runs, each in a fresh namespace in an
empty working directory.

Examples that need a model use tiny seeded arrays (or the bundled demo detector). A block
preceded by `<!-- docs-example: with tf-serving ... -->` talks to TF Serving on localhost:8500:
it runs against a gRPC `PredictionService` serving the demo detector's tfcal export (the
`tf_serving` fixture), with an `image.jpg` in its working directory. A block that cannot run
here is preceded by `<!-- docs-example: skip (the reason) -->` and is reported as skipped with
that reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
_BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```$", re.S | re.M)
_SKIP = re.compile(r"<!-- docs-example: skip \((?P<reason>[^)]+)\) -->\s*$")
_WITH = re.compile(r"<!-- docs-example: with (?P<setup>[\w-]+)\b.*-->\s*$")
SETUPS = {"tf-serving", "tflite"}
# Blocks that import TensorFlow take seconds (its import alone): marked slow.
_HEAVY = re.compile(r"\b(keras|tensorflow|tfcal\.(layers|calibration|postprocess|export))\b")


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = _SKIP.search(before)
            setup = _WITH.search(before)
            yield pytest.param(
                page.relative_to(REPO).as_posix(), line, match["code"],
                skip["reason"] if skip else None, setup["setup"] if setup else None,
                id=f"{page.relative_to(REPO).as_posix()}:{line}",
                marks=[pytest.mark.slow] if _HEAVY.search(match["code"]) or setup else [])


BLOCKS = list(_blocks())


def test_the_pages_have_examples():
    # The collector finds the examples: a changed fence or page layout must not empty this test.
    pages = {p.values[0] for p in BLOCKS}
    assert {"docs/layers.md", "docs/own-model.md", "docs/configuration.md"} <= pages


def test_every_setup_is_known():
    unknown = {p.values[4] for p in BLOCKS} - SETUPS - {None}
    assert not unknown, f"docs-example setups without a fixture: {unknown}"


@pytest.mark.parametrize("page, line, code, skip, setup", BLOCKS)
def test_example_runs(page, line, code, skip, setup, tmp_path, monkeypatch, request):
    if skip:
        pytest.skip(f"{page}:{line}: {skip}")
    monkeypatch.chdir(tmp_path)
    if setup == "tf-serving":
        import grpc

        port, jpeg = request.getfixturevalue("tf_serving")
        connect = grpc.insecure_channel
        monkeypatch.setattr(grpc, "insecure_channel", lambda target, *a, **k: connect(
            target.replace("localhost:8500", f"localhost:{port}"), *a, **k))
        (tmp_path / "image.jpg").write_bytes(jpeg)
    namespace = {"__name__": "__docs_example__"}
    if setup == "tflite":  # a converted post-processing where the example reads it, and inputs
        model, inputs = request.getfixturevalue("tflite_postprocess")
        (tmp_path / "export" / "detector_tflite").mkdir(parents=True)
        (tmp_path / "export" / "detector_tflite" / "postprocess.tflite").write_bytes(model)
        namespace["boxes"], namespace["scores"] = inputs
    exec(compile(code, f"{page}:{line}", "exec"), namespace)
    if setup == "tflite":  # the example read the on-device detections
        assert 0 < namespace["n"] <= 100 and namespace["ids"].shape == (namespace["n"],)
    if setup == "tf-serving":  # the example read the served detections
        num = namespace["num"]
        assert 0 <= num <= 100 and namespace["boxes"].shape == (num, 4)
