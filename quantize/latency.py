"""Batch-1 latency of a runner: warm-up, then p50/p90 over many runs, repeated (the CPU may be shared).

The gate's ``rdcd-bench`` is the device-side tool; this is the quick FP32-vs-INT8 comparison the quantize
report prints. No torch here.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np


def measure(run: Callable[[np.ndarray], np.ndarray], size: int, iters: int = 200, warmup: int = 20,
            repeats: int = 3, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for _ in range(warmup):
        run(x)
    p50s, p90s = [], []
    for _ in range(max(1, repeats)):
        ts = np.empty(iters)
        for i in range(iters):
            t0 = time.perf_counter()
            run(x)
            ts[i] = time.perf_counter() - t0
        p50s.append(float(np.percentile(ts, 50) * 1e3))
        p90s.append(float(np.percentile(ts, 90) * 1e3))
    return {"p50_ms_best": round(min(p50s), 3), "p50_ms_median": round(statistics.median(p50s), 3),
            "p90_ms_median": round(statistics.median(p90s), 3), "p50_ms_repeats": [round(v, 3) for v in p50s],
            "iters": iters, "warmup": warmup, "repeats": repeats, "batch": 1}


def compare(runners: dict[str, Callable], size: int, iters: int = 200, warmup: int = 20, rounds: int = 3) -> dict:
    """Interleave the runners round by round so that CPU contention hits them alike."""
    per: dict[str, list[dict]] = {k: [] for k in runners}
    for r in range(rounds):
        for name, run in runners.items():
            per[name].append(measure(run, size, iters, warmup if r == 0 else 5, repeats=1, seed=r))
    out = {}
    for name, ms in per.items():
        p50s = [m["p50_ms_best"] for m in ms]
        out[name] = {"p50_ms_best": round(min(p50s), 3), "p50_ms_median": round(statistics.median(p50s), 3),
                     "p50_ms_rounds": p50s, "iters_per_round": iters, "rounds": rounds, "batch": 1}
    return out
