"""Paired bootstrap of a µAP drop: exact on the full sample, degenerate when nothing changes, wider on
fewer queries, and the same resamples for both models (a shared offset cancels)."""

from __future__ import annotations

import numpy as np
import pytest

from rdcd.validate.bootstrap import paired_drop_interval
from rdcd.validate.metrics import Predictions, evaluate


def _bench(n_queries: int, seed: int, noise: float):
    """Queries q0.. with one true reference each (half of them), 10 scored candidates per query."""
    rng = np.random.default_rng(seed)
    gt = [(f"q{i}", f"r{i}") for i in range(0, n_queries, 2)]
    rows_a, rows_b = [], []
    for i in range(n_queries):
        refs = [f"r{i}"] + [f"r{j}" for j in rng.choice(n_queries, 9, replace=False) if j != i][:9]
        base = rng.normal(0.5, 0.15, len(refs))
        base[0] += 0.2  # the true (or, for negatives, the nearest) reference scores higher
        pert = base + rng.normal(0, noise, len(refs))
        rows_a += [(f"q{i}", r, float(s)) for r, s in zip(refs, base)]
        rows_b += [(f"q{i}", r, float(s)) for r, s in zip(refs, pert)]
    ids = [f"q{i}" for i in range(n_queries)]
    return Predictions.from_rows(rows_a), Predictions.from_rows(rows_b), gt, ids


def test_point_estimate_is_the_full_sample_difference():
    a, b, gt, ids = _bench(200, 0, 0.05)
    iv = paired_drop_interval(a, b, gt, ids, resamples=200)
    assert iv.drop == pytest.approx(evaluate(a, gt).micro_ap - evaluate(b, gt).micro_ap, abs=1e-12)
    assert iv.low <= iv.drop <= iv.high and iv.low < iv.high


def test_identical_models_have_a_zero_interval():
    a, _, gt, ids = _bench(100, 1, 0.0)
    iv = paired_drop_interval(a, a, gt, ids, resamples=100)
    assert iv.drop == 0 and iv.low == 0 and iv.high == 0


def test_fewer_queries_give_a_wider_interval():
    small = paired_drop_interval(*_bench(60, 2, 0.08), resamples=400)
    large = paired_drop_interval(*_bench(2000, 2, 0.08), resamples=400)
    assert large.width < small.width / 2


def test_resamples_are_paired():
    # b = a with every score shifted by a constant: rankings are unchanged, so every paired resample has
    # drop 0, while unpaired resampling would not
    a, _, gt, ids = _bench(150, 3, 0.0)
    b = Predictions(a.queries, a.references, a.scores + 0.25)
    iv = paired_drop_interval(a, b, gt, ids, resamples=200)
    assert (iv.low, iv.high) == (0.0, 0.0)


def test_queries_without_predictions_still_count():
    # q2's true pair is never predicted: the resampled recall denominator includes it
    gt = [("q1", "r1"), ("q2", "r2")]
    a = Predictions.from_rows([("q1", "r1", 0.9)])
    iv = paired_drop_interval(a, a, gt, ["q1", "q2"], resamples=50)
    assert iv.drop == 0
    assert evaluate(a, gt).micro_ap == pytest.approx(0.5)
