"""Coverage of the tuner's certified targets on known-truth tune sets (tfcal.tuning.simulation).

The promise: with `confidence=0.95`, "with probability >= 95% over the draw of the tune images,
class C's precision on new images is >= the target" (budget `per_class`), and every class's at
once under the simultaneous budget. `default_scenario()` gives ten classes (5 to 500 boxes) whose
precision and recall curves are known exactly; each tune set is drawn from it, searched with
`joint_search`, and the true metric is read at every chosen point.

For each NMS IoU grid (the default 0.4-0.7, 4 values, and a wider 0.3-0.9, 7 values) and each
objective (precision_target 0.9, then recall_target 0.9), on the same seeded tune sets: the
search with confidence 0.95 under both budgets, and the point estimate (confidence None).
Printed per class, for the three searches (cert: confidence 0.95 with the per_class budget;
simul: with the simultaneous budget; point: the point estimate): enabled rate, coverage
P(disabled or true metric >= 0.9) with its standard error, coverage given enabled (cond, cert
only), and the mean true recall (precision for recall_target) at the chosen point, 0 when
disabled; then the simultaneous coverage (all judged classes at once) and
the ratio certified / point estimate of that mean for the classes with >= 500 boxes.

PASS, per grid and objective: every judged class (>= `min_support` 10 boxes; rare-5 gets the
pooled fallback, which makes no per-class statement) has per-class coverage >= 0.95 - 2 SE under
the per_class budget; the simultaneous coverage under the simultaneous budget is >= 0.95 - 2 SE;
and the ratio certified (per_class budget) / point is >= 0.85 for each class with >= 500 boxes
(the simultaneous budget's ratio is printed, not judged).

Each tune set is drawn as the tuner splits tune images by default (`--learn-fraction 0.3`): a
learn part that plans each certified class's test and a certify part that tests it; the point
estimate searches both parts merged, so every comparison is paired on the same draws.

Then `tuning.scope: pooled` (`pooled_coverage`, default grid, precision_target 0.9): one
certified threshold on per-class calibrated scores, for each calibration method fitted on the
learn part (the tuner's rule) and, for comparison, on every tune image. PASS also needs the
learn-part fit's pooled coverage >= 0.95 - 2 SE for every method (the all-tune fit is printed,
not judged).

Then `tuning.on_unreachable: pool` (the default) against `disable` and the point estimate on the
same tune sets, both budgets, on the default scenario and on `small_classes_scenario()` (six
classes of 20-60 boxes, none certifiable alone): how often the group is certified, the coverage
of each statement kind (alone: the class's true precision at its point; group: the group's true
pooled precision at its point, over all its members), the coverage of the statement each class
actually carries (which of the two depends on the certify data), per class and all at once, and
the recall of all boxes. PASS also needs the group's coverage >= 0.95 - 2 SE, and every class's
carried-statement coverage >= 0.95 - 2 SE (per_class budget) or all of them at once
(simultaneous budget).

Run: `python benchmarks/coverage_simulation.py [--sets N] [--quick] [--seed S]
[--learn-fraction F]` (default 1,000 sets per grid; `--quick`: 200). The run time is almost all
`joint_search`: 12 searches per tune set (6 per grid).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from tfcal.tuning.search import Objective
from tfcal.tuning.simulation import (
    CalibrationFit,
    coverage_runs,
    default_scenario,
    pooled_coverage,
    small_classes_scenario,
)

DEFAULT_GRID = (0.4, 0.5, 0.6, 0.7)
WIDE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TARGET = 0.9
LEVEL = 0.95
RATIO_MIN = 0.85
RATIO_MIN_BOXES = 500
BUDGETS = ("per_class", "simultaneous")


def _objectives(name: str):
    kw = {"target_precision": TARGET} if name == "precision_target" else {"target_recall": TARGET}
    return {b: Objective(name, confidence=LEVEL, **kw) for b in BUDGETS}, Objective(name, **kw)


def _table(name, certified, point):
    """Prints the per-class table; returns the failure messages."""
    pc, sim = certified["per_class"], certified["simultaneous"]
    gain = "recall" if name == "precision_target" else "precision"
    mean = (lambda r: r.mean_recall) if name == "precision_target" else (lambda r: r.mean_precision)
    print(f"  {'':16s} | {'enabled':^17s} | {'coverage ± SE':^38s} | {'cond':5s} | "
          f"{'mean true ' + gain:^17s}")
    print(f"  {'class':10s} {'boxes':>5s} | {'cert':>5s} {'simul':>5s} {'point':>5s} | "
          f"{'cert':>12s} {'simul':>12s} {'point':>12s} | {'cert':5s} | "
          f"{'cert':>5s} {'simul':>5s} {'point':>5s}")
    for k, n in enumerate(pc.names):
        note = "" if pc.judged[k] else "  (pooled, not judged)"
        enabled = " ".join(f"{r.enabled_rate[k]:5.2f}" for r in (pc, sim, point))
        cov = " ".join(f"{r.class_coverage[k]:6.3f}±{r.class_coverage_se[k]:.3f}"
                       for r in (pc, sim, point))
        cond = pc.conditional_coverage[k]
        means = " ".join(f"{mean(r)[k]:5.3f}" for r in (pc, sim, point))
        print(f"  {n:10s} {pc.num_gt[k]:5d} | {enabled} | {cov} | "
              f"{'  -  ' if np.isnan(cond) else f'{cond:5.3f}'} | {means}{note}")
    if all(np.array_equal(r.enabled, point.enabled)
           and np.array_equal(r.min_score_thresh, point.min_score_thresh, equal_nan=True)
           and np.array_equal(r.nms_iou, point.nms_iou, equal_nan=True) for r in (pc, sim)):
        print("  note: the certified search chose exactly the point estimate's points in every "
              "tune set: `confidence` had no effect on this objective")
    failures = []
    low = pc.judged & (pc.class_coverage < LEVEL - 2 * pc.class_coverage_se)
    if low.any():
        failures.append("per-class coverage < 0.95 - 2 SE: " + ", ".join(
            f"{pc.names[k]} {pc.class_coverage[k]:.3f}" for k in np.flatnonzero(low)))
    line = []
    for label, r in (("per_class budget", pc), ("simultaneous budget", sim), ("point", point)):
        line.append(f"{label} {r.simultaneous_coverage:.3f}±{r.simultaneous_coverage_se:.3f}")
    print("  simultaneous coverage (all judged classes at once): " + ", ".join(line))
    if sim.simultaneous_coverage < LEVEL - 2 * sim.simultaneous_coverage_se:
        failures.append(f"simultaneous coverage under the simultaneous budget "
                        f"{sim.simultaneous_coverage:.3f} < 0.95 - 2 SE")
    ratios = []
    for k in np.flatnonzero(pc.num_gt >= RATIO_MIN_BOXES):
        base = mean(point)[k]
        r_pc = mean(pc)[k] / base if base > 0 else float("nan")
        r_sim = mean(sim)[k] / base if base > 0 else float("nan")
        ratios.append(f"{pc.names[k]} {r_pc:.3f} / {r_sim:.3f}")
        if not r_pc >= RATIO_MIN:
            failures.append(f"{gain} ratio of {pc.names[k]} {r_pc:.3f} < {RATIO_MIN}")
    print(f"  {gain} ratio certified / point, >= {RATIO_MIN_BOXES} boxes (per_class / "
          f"simultaneous budget): " + ", ".join(ratios))
    return failures


def run(grid, num_sets, seed, learn_fraction):
    scenario = default_scenario()
    runs, keys = [], []
    for name in ("precision_target", "recall_target"):
        certified, point = _objectives(name)
        for b in BUDGETS:
            runs.append((certified[b], b))
            keys.append((name, b))
        runs.append((point, "per_class"))
        keys.append((name, "point"))
    t0 = time.perf_counter()
    results = dict(zip(keys, coverage_runs(scenario, runs, grid, num_sets, seed,
                                           learn_fraction=learn_fraction)))
    seconds = time.perf_counter() - t0
    ok = True
    for name in ("precision_target", "recall_target"):
        print(f"[{name} {TARGET}, confidence {LEVEL}, NMS IoU grid {list(grid)}, "
              f"learn_fraction {learn_fraction}, {num_sets} tune sets, seed {seed}]")
        failures = _table(name, {b: results[(name, b)] for b in BUDGETS},
                          results[(name, "point")])
        verdict = "PASS" if not failures else "FAIL"
        print(f"  -> {verdict}" + ("" if not failures else ": " + "; ".join(failures)))
        ok &= not failures
    print(f"  ({len(runs)} searches per tune set, {seconds:.1f} s, "
          f"{1000 * seconds / num_sets:.0f} ms per tune set)")
    return ok


def run_pooled(num_sets, seed, learn_fraction):
    print(f"[scope pooled, precision_target {TARGET}, confidence {LEVEL}, NMS IoU grid "
          f"{list(DEFAULT_GRID)}, learn_fraction {learn_fraction}, {num_sets} tune sets, "
          f"seed {seed}]")
    objective = Objective(target_precision=TARGET, confidence=LEVEL)
    failures = []
    t0 = time.perf_counter()
    for method in ("temperature", "platt", "isotonic"):
        for fit_on in ("learn", "tune"):
            r = pooled_coverage(default_scenario(), objective, DEFAULT_GRID, num_sets, seed,
                                CalibrationFit(method, fit_on=fit_on),
                                learn_fraction=learn_fraction)
            print(f"  {method:<11} fitted on {fit_on:<5}: coverage {r.coverage:.3f} +- "
                  f"{r.coverage_se:.3f}, enabled {r.enabled.mean():.3f}, mean pooled recall "
                  f"{r.recall.mean():.3f}")
            if fit_on == "learn" and r.coverage < LEVEL - 2 * r.coverage_se:
                failures.append(f"{method} pooled coverage {r.coverage:.3f}")
    print(f"  -> {'PASS' if not failures else 'FAIL: ' + '; '.join(failures)} "
          f"({time.perf_counter() - t0:.1f} s)")
    return not failures


def run_group(num_sets, seed, learn_fraction):
    """`tuning.on_unreachable: pool` (the default) against `disable` and the point estimate on
    the same tune sets: the coverage of each statement kind (alone, group) and of the statement
    each class actually carries, per class and all at once, and the recall it buys."""
    ok = True
    for label, scenario in (("default", default_scenario()),
                            ("small classes", small_classes_scenario())):
        print(f"[on_unreachable pool vs disable, {label} scenario, precision_target {TARGET}, "
              f"confidence {LEVEL}, grid {list(DEFAULT_GRID)}, learn_fraction "
              f"{learn_fraction}, {num_sets} tune sets, seed {seed}]")
        pool = Objective(target_precision=TARGET, confidence=LEVEL, on_unreachable="pool")
        plain = Objective(target_precision=TARGET, confidence=LEVEL)
        point = Objective(target_precision=TARGET)
        t0 = time.perf_counter()
        runs = [(pool, "per_class"), (pool, "simultaneous"), (plain, "per_class"),
                (point, "per_class")]
        res = coverage_runs(scenario, runs, DEFAULT_GRID, num_sets, seed,
                            learn_fraction=learn_fraction)
        d, pt = res[2], res[3]
        boxes = d.num_gt.sum()
        total = lambda x: float((x.recall * x.num_gt).sum(axis=1).mean() / boxes)  # noqa: E731
        for r, budget in zip(res[:2], BUDGETS):
            alone, alone_se, n_alone = r.kind_coverage("alone")
            grp, grp_se, n_grp = r.kind_coverage("group")
            cov, se = r.statement_coverage, r.statement_coverage_se
            worst = int(np.argmin(cov))
            sim, sim_se = r.simultaneous_statement_coverage, r.simultaneous_statement_coverage_se
            bad = r.group_coverage < LEVEL - 2 * r.group_coverage_se
            if budget == "per_class":
                bad |= bool(np.any(cov < LEVEL - 2 * se))
            else:
                bad |= sim < LEVEL - 2 * sim_se
            ok &= not bad
            ratios = ", ".join(f"{r.names[k]} {r.mean_recall[k] / pt.mean_recall[k]:.3f}"
                               for k in np.flatnonzero(r.num_gt >= RATIO_MIN_BOXES)
                               if pt.mean_recall[k] > 0)
            print(f"  {budget:<12}: group certified in {r.group_enabled_rate:.3f} of sets, "
                  f"group coverage {r.group_coverage:.3f} +- {r.group_coverage_se:.3f}; "
                  f"statement kinds: alone {alone:.3f} +- {alone_se:.3f} ({n_alone} class-sets), "
                  f"group {grp:.3f} +- {grp_se:.3f} ({n_grp}); carried statement per class: "
                  f"min {cov[worst]:.3f} +- {se[worst]:.3f} ({r.names[worst]}), all at once "
                  f"{sim:.3f} +- {sim_se:.3f}; classes emitted {r.enabled.sum(axis=1).mean():.2f}"
                  f" (disable {d.enabled.sum(axis=1).mean():.2f}); recall of all boxes "
                  f"{total(r):.3f} (disable {total(d):.3f}, point estimate {total(pt):.3f}); "
                  f"recall kept vs point, >= {RATIO_MIN_BOXES} boxes: {ratios or '-'} "
                  f"-> {'FAIL' if bad else 'PASS'}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=1000, help="tune sets per grid (default 1000)")
    parser.add_argument("--quick", action="store_true", help="200 tune sets per grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-fraction", type=float, default=0.3,
                        help="tuning.learn_fraction of the certified runs (default 0.3, the "
                             "tuner's default; 0: no learn split)")
    args = parser.parse_args(argv)
    num_sets = 200 if args.quick else args.sets
    if num_sets < 1:
        parser.error(f"--sets must be >= 1, got {num_sets}")
    t0 = time.perf_counter()
    ok = True
    for grid in (DEFAULT_GRID, WIDE_GRID):
        ok &= run(grid, num_sets, args.seed, args.learn_fraction)
    if args.learn_fraction > 0:
        ok &= run_pooled(num_sets, args.seed, args.learn_fraction)
        ok &= run_group(num_sets, args.seed, args.learn_fraction)
    print(f"total {time.perf_counter() - t0:.1f} s -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
