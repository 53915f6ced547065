"""The tuning objectives a config asks for: the global `Objective` and its per-class overrides.

`tuning.classes` keys are category names or ids of the annotations; each is resolved to its
score column here, once, with an error naming the config key.
"""

from __future__ import annotations

import dataclasses

from tfcal import TfcalError
from tfcal.config import Config
from tfcal.tuning.prepare import Prepared
from tfcal.tuning.search import Objective


def objectives(cfg: Config, prep: Prepared) -> tuple[Objective, dict[int, Objective]]:
    """`(objective, {column: override})` of `cfg.tuning` for the job's class columns."""
    t = cfg.tuning
    base = Objective(name=t.objective, target_precision=t.target_precision,
                     target_recall=t.target_recall, beta=t.beta, c_fp=t.c_fp, c_fn=t.c_fn,
                     confidence=t.confidence, on_unreachable=t.on_unreachable)
    overrides = {}
    for key, ov in t.classes.items():
        cat_id = resolve_category_key(cfg, prep, key)
        try:
            column = prep.mapping.column_of(cat_id)
        except ValueError:
            raise TfcalError(f"{cfg.source}: tuning.classes.{key}: category {cat_id} has no "
                             "score column") from None
        fields = {f.name: getattr(ov, f.name) for f in dataclasses.fields(ov)}
        overrides[column] = base.with_overrides(**fields)
    return base, overrides


def resolve_category_key(cfg: Config, prep: Prepared, key: str) -> int:
    """The category id a `tuning.classes` key names (a category name or id)."""
    ds = prep.dataset
    names = {n: int(i) for i, n in zip(ds.category_ids, ds.category_names)}
    if key in names:
        return names[key]
    if key.lstrip("-").isdigit() and int(key) in set(int(i) for i in ds.category_ids):
        return int(key)
    raise TfcalError(f"{cfg.source}: tuning.classes.{key}: not a category id or name of "
                     f"{cfg.data.annotations}")
