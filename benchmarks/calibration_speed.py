"""Speed of per-class temperature fitting and threshold selection, each against a reference.

1. `fit_per_class("temperature")` for 80 classes over 1,000,000 detections (one vectorized
   Newton search for all classes plus the pooled fit) against a per-class loop of
   `scipy.optimize.minimize_scalar` (bounded, on log T). Target: < 5 s.
2. `select_threshold(objective="f1")` on 1,000,000 scores (sorting, then counting the scores
   above every candidate at once with `np.searchsorted`) against a naive loop that counts TP/FP with a full pass per candidate, timed on
   200 candidates and extrapolated to all distinct scores. Target: < 1 s.

Run: `python benchmarks/calibration_speed.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import time

import numpy as np

from tfcal import calibration, thresholds

NUM_DETECTIONS = 1_000_000
NUM_CLASSES = 80
TEMPERATURE_TARGET_S = 5.0
THRESHOLD_TARGET_S = 1.0


def _verdict(seconds: float, target: float) -> str:
    return "PASS" if seconds < target else "FAIL"


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, NUM_CLASSES, NUM_DETECTIONS)
    temps = np.exp(rng.uniform(np.log(0.3), np.log(3.0), NUM_CLASSES))
    z = rng.normal(-1.0, 3.0, NUM_DETECTIONS)
    y = (rng.random(NUM_DETECTIONS) < 1 / (1 + np.exp(-z / temps[c]))).astype(np.int64)
    return z, y, c, temps


def _reference_temperatures(z, y, c):
    from scipy.optimize import minimize_scalar

    lo, hi = calibration.TEMPERATURE_BOUNDS

    def fit(zk, yk):
        def nll(log_t):
            x = zk / np.exp(log_t)
            return np.mean(np.logaddexp(0.0, x) - yk * x)
        r = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded",
                            options={"xatol": 1e-8})
        return float(np.exp(r.x))

    out = [fit(z[c == k], y[c == k]) for k in range(NUM_CLASSES)]
    fit(z, y)  # the pooled fit, as fit_per_class also does
    return np.array(out)


def bench_temperature() -> None:
    z, y, c, temps = _data()
    t0 = time.perf_counter()
    fitted = calibration.fit_per_class("temperature", z, y, c, NUM_CLASSES)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = _reference_temperatures(z, y, c)
    base = time.perf_counter() - t0
    diff = float(np.max(np.abs(np.log(fitted.temperature) - np.log(ref))))
    err = float(np.max(np.abs(np.log(fitted.temperature) - np.log(temps))))
    print(f"[per-class temperature] {NUM_CLASSES} classes, {NUM_DETECTIONS:,} detections")
    print(f"  vectorized Newton (tfcal):      {ours:7.3f} s")
    print(f"  per-class scipy bounded loop:   {base:7.3f} s")
    print(f"  speed-up: {base / ours:.1f}x   max |log T - log T_ref| = {diff:.2e}   "
          f"max |log T - log T_true| = {err:.3f}")
    print(f"  target < {TEMPERATURE_TARGET_S:.0f} s: {ours:.3f} s "
          f"{_verdict(ours, TEMPERATURE_TARGET_S)}")


def _naive_f1(s, y, t):
    pred = s >= t
    tp = np.count_nonzero(pred & (y == 1))
    fp = np.count_nonzero(pred) - tp
    fn = np.count_nonzero(y) - tp
    return 2 * tp / (2 * tp + fp + fn)


def bench_threshold() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(NUM_DETECTIONS)
    s = np.round(p, 5).astype(np.float32)  # realistic ties
    y = (rng.random(NUM_DETECTIONS) < p).astype(np.int64)
    t0 = time.perf_counter()
    r = thresholds.select_threshold(s, y, "f1")
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    rp = thresholds.select_threshold(s, y, thresholds.ThresholdObjective(
        "precision_target", target=0.9, confidence=0.95))
    ours_cp = time.perf_counter() - t0
    cand = np.unique(s)
    sample = rng.choice(cand, 200, replace=False)
    t0 = time.perf_counter()
    naive = np.array([_naive_f1(s, y, t) for t in sample])
    per_candidate = (time.perf_counter() - t0) / sample.size
    base = per_candidate * cand.size
    ok = naive.max() <= r.value + 1e-12 and _naive_f1(s, y, r.threshold) == r.value
    print(f"[select_threshold] {NUM_DETECTIONS:,} scores, {cand.size:,} distinct candidates")
    print(f"  sort + searchsorted (tfcal, f1): {ours:6.3f} s   threshold {r.threshold:.5f}, "
          f"F1 {r.value:.4f}")
    print(f"  precision_target + 95% CP bound: {ours_cp:6.3f} s   threshold "
          f"{rp.threshold:.5f}, recall {rp.recall:.4f}")
    print(f"  naive full pass per candidate:  {base:7.1f} s (extrapolated from 200 candidates, "
          f"{per_candidate * 1e3:.2f} ms each)")
    print(f"  speed-up: {base / ours:.0f}x   agrees with the naive F1 on the sample: {ok}")
    print(f"  target < {THRESHOLD_TARGET_S:.0f} s: {ours:.3f} s "
          f"{_verdict(ours, THRESHOLD_TARGET_S)}")


def main() -> None:
    bench_temperature()
    bench_threshold()


if __name__ == "__main__":
    main()
