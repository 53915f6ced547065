"""Per-class certified precision on box-size-aware calibrated scores: coverage and recall of
`box_platt` against the class-only `platt` on the same seeded tune sets.

Known truth (`tfcal.tuning.box_simulation`): three classes whose true-positive chance depends on
the box's relative log size `s` (+3 logits from the smallest to the largest box, -2, and none),
a certified target precision >= 0.9 at 95% per class, learn part 0.3. Prints, per method, the
share of (set, class) choices whose exact precision reaches the target (with its standard
error), how often each class is certified, and its mean exact recall, and the recall ratio
box_platt / platt.

Run: `python benchmarks/box_calibration_coverage.py [--sets 200] [--seed 0]` (about 0.5 s per
set and method).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfcal.tuning.box_simulation import BoxClassModel, box_coverage  # noqa: E402

SCENARIO = (
    BoxClassModel(600, a=1.0, b=-1.0, c=3.0, z_mean=0.5),   # large boxes far more precise
    BoxClassModel(400, a=0.8, b=2.0, c=-2.0, z_mean=0.0),   # small boxes more precise
    BoxClassModel(300, a=1.2, b=0.5, c=0.0, z_mean=0.0),    # no size effect
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {m: box_coverage(SCENARIO, args.sets, args.seed, method=m)
               for m in ("box_platt", "platt")}
    for name, r in results.items():
        print(f"{name}: coverage {r.coverage:.3f} (se {r.coverage_se:.3f}) over "
              f"{int(r.enabled.sum())} certified choices; certified rate per class "
              f"{np.round(r.enabled.mean(axis=0), 3).tolist()}; mean exact recall per class "
              f"{np.round(r.mean_recall, 3).tolist()}")
    box, plain = results["box_platt"], results["platt"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = box.mean_recall / plain.mean_recall
    print(f"recall box_platt / platt per class: {np.round(ratio, 3).tolist()}")
    ok = box.coverage >= 0.95 - 2 * box.coverage_se
    print("PASS" if ok else "FAIL", "(box_platt coverage >= 0.95 within 2 standard errors)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
