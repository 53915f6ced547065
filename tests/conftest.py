"""Fixtures shared by the test directories. Being the root conftest of `tests/` (not a
package), it also puts `tests/` on `sys.path`, so every test directory imports the shared
helpers (`box_reference`, `coco.cocogen`) the same way."""

from __future__ import annotations

import pytest

from coco.cocogen import make_gt, write_json
from tfcal.coco.dataset import load_coco

#: The default `dataset`: make_gt(seed 1) with 2 images (ids 2, 4) and 3 categories (2, 4, 6).
COCO_SET = {"seed": 1, "num_images": 2, "num_categories": 3}


@pytest.fixture
def dataset(request, tmp_path):
    """A small synthetic COCO set (`coco.cocogen.make_gt`), written to ``instances.json`` in
    `tmp_path` and loaded with `tfcal.coco.load_coco` (no images folder).

    A test module shapes it with a module-level ``COCO_SET`` dict: ``seed``, ``num_images``,
    ``num_categories`` (defaults above) and ``edit``, a function that changes the ground-truth
    dict in place before it is written.
    """
    spec = {**COCO_SET, **getattr(request.module, "COCO_SET", {})}
    gt = make_gt(spec["seed"], num_images=spec["num_images"],
                 num_categories=spec["num_categories"])
    if spec.get("edit") is not None:
        spec["edit"](gt)
    return load_coco(write_json(tmp_path / "instances.json", gt))
