"""Paired bootstrap over queries: how precisely a benchmark measures a µAP difference. No torch here.

A µAP drop of 0.004 on 180 true pairs is noise (one pair moves µAP by ~0.006). To say whether a
quantized model's Δ µAP is resolved, the queries are resampled with replacement, the *same*
resamples are applied to both models' predictions, and micro-AP is recomputed for each under the
ISC2021 rules of :mod:`rdcd.validate.metrics` (global pessimistic order, recall over the
resample's true pairs). The 2.5 / 97.5 percentiles of the resampled drops give the 95 % interval.

A query drawn ``c`` times contributes its predictions and its true pairs ``c`` times. The global
order of predictions does not depend on the resample, so each resample is one ``np.repeat`` of the
pre-sorted predictions (no re-sorting) and the recomputed µAP is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rdcd.validate.metrics import Predictions

RESAMPLES = 1000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class DropInterval:
    drop: float  # reference µAP - candidate µAP on the full benchmark
    low: float
    high: float
    resamples: int
    level: float = LEVEL

    @property
    def width(self) -> float:
        return self.high - self.low

    def to_dict(self) -> dict:
        return {"drop": round(self.drop, 6), "ci_low": round(self.low, 6), "ci_high": round(self.high, 6),
                "level": self.level, "resamples": self.resamples, "over": "queries (paired)"}

    def __str__(self) -> str:
        return f"{self.drop:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


class _Sorted:
    """One model's predictions in pessimistic global order, as query indices and true/false flags."""

    def __init__(self, preds: Predictions, gt: set[tuple[str, str]], qindex: dict[str, int]):
        y = np.fromiter(((q, r) in gt for q, r in zip(preds.queries, preds.references)), dtype=bool, count=len(preds))
        order = np.lexsort((y, -preds.scores))
        self.y = y[order]
        self.q = np.fromiter((qindex[q] for q in preds.queries[order]), dtype=np.int64, count=len(preds))

    def micro_ap(self, counts: np.ndarray, positives: int) -> float:
        if positives == 0:
            return 0.0
        w = counts[self.q]
        y = np.repeat(self.y, w)
        if not y.any():
            return 0.0
        ntp = np.cumsum(y)
        ranks = np.flatnonzero(y) + 1
        return float(np.sum(ntp[ranks - 1] / ranks) / positives)


def paired_drop_interval(reference: Predictions, candidate: Predictions, gt_pairs: Sequence[tuple[str, str]],
                         query_ids: Sequence[str], resamples: int = RESAMPLES, seed: int = 0,
                         level: float = LEVEL) -> DropInterval:
    """µAP(reference) - µAP(candidate) with a paired percentile-bootstrap interval over ``query_ids``.

    ``query_ids``: every query of the benchmark (queries without predictions and negative queries are
    drawn too: they carry true pairs that were missed, or nothing)."""
    from rdcd.errors import RdcdError

    gt = set(gt_pairs)
    if not gt or resamples < 1:
        raise RdcdError("a bootstrap interval needs true pairs and at least one resample")
    qindex = {q: i for i, q in enumerate(dict.fromkeys(query_ids))}
    for q, _ in gt:
        qindex.setdefault(q, len(qindex))
    for preds in (reference, candidate):
        for q in preds.queries:
            qindex.setdefault(q, len(qindex))
    nq = len(qindex)
    gt_q = np.fromiter((qindex[q] for q, _ in gt), dtype=np.int64, count=len(gt))
    a, b = _Sorted(reference, gt, qindex), _Sorted(candidate, gt, qindex)
    ones = np.ones(nq, dtype=np.int64)
    point = a.micro_ap(ones, len(gt)) - b.micro_ap(ones, len(gt))
    rng = np.random.default_rng(seed)
    n_real = len(dict.fromkeys(query_ids)) or nq
    if not np.any(gt_q < n_real):
        raise RdcdError("no true pair belongs to the queries being resampled")
    drops = np.empty(resamples)
    i = 0
    while i < resamples:
        counts = np.bincount(rng.integers(0, n_real, n_real), minlength=nq)
        pos = int(counts[gt_q].sum())
        if pos == 0:  # a resample without true pairs has no µAP: draw again
            continue
        drops[i] = a.micro_ap(counts, pos) - b.micro_ap(counts, pos)
        i += 1
    lo, hi = np.quantile(drops, [(1 - level) / 2, (1 + level) / 2])
    return DropInterval(float(point), float(lo), float(hi), resamples, level)
