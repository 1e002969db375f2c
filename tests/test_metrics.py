"""ISC2021 micro-AP: hand-computed cases (ties, unmatched queries, missed pairs) and agreement of the
``rdcd-validate metrics`` CLI with an independent, straightforward computation on random prediction sets."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from rdcd.errors import RdcdError
from rdcd.validate.metrics import Predictions, evaluate, read_predictions

GT = [("q1", "r1"), ("q2", "r2"), ("q3", "r3")]


def P(*rows):
    return Predictions.from_rows(rows)


def test_hand_computed_micro_ap_and_recall_at_p90():
    # order: T(0.9) F(0.8) T(0.7) F(0.6); 3 true pairs, q3 never predicted
    # precisions 1, 1/2, 2/3, 1/2 ; recalls 1/3, 1/3, 2/3, 2/3 ; AP = 1/3*1 + 1/3*2/3 = 5/9
    m = evaluate(P(("q1", "r1", 0.9), ("q2", "r9", 0.8), ("q2", "r2", 0.7), ("q4", "r1", 0.6)), GT)
    assert m.micro_ap == pytest.approx(5 / 9, abs=1e-12)
    assert m.recall_at_p90 == pytest.approx(1 / 3)
    assert m.threshold_at_p90 == pytest.approx(0.9)
    assert m.acc_at_1 == pytest.approx(1 / 3)  # q1 right at rank 0; q2's true match is second; q3 missing
    assert m.recall_at_rank10 == pytest.approx(2 / 3)


def test_ties_are_pessimistic():
    # same score for a wrong and a right match: the wrong one counts first -> AP 0.5, not 1.0
    m = evaluate(P(("q1", "r1", 0.5), ("q2", "r9", 0.5)), [("q1", "r1")])
    assert m.micro_ap == pytest.approx(0.5)
    m = evaluate(P(("q2", "r9", 0.5), ("q1", "r1", 0.5)), [("q1", "r1")])
    assert m.micro_ap == pytest.approx(0.5)  # input order does not matter
    # a constant score for everything cannot buy precision
    rows = [("q1", "r1", 1.0), ("q1", "r2", 1.0), ("q2", "r2", 1.0), ("q2", "r1", 1.0)]
    m = evaluate(P(*rows), [("q1", "r1"), ("q2", "r2")])
    assert m.micro_ap == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)


def test_unmatched_queries_and_missed_pairs_count():
    # a negative query (no match in the ground truth) scoring highest pushes every true pair down
    rows = [("q5", "r1", 0.95), ("q1", "r1", 0.9), ("q2", "r9", 0.8), ("q2", "r2", 0.7), ("q4", "r1", 0.6)]
    m = evaluate(P(*rows), GT)
    assert m.micro_ap == pytest.approx(1 / 3 * 1 / 2 + 1 / 3 * 2 / 4)
    assert m.recall_at_p90 == 0.0 and m.threshold_at_p90 is None
    # no predictions at all: AP 0, not an error
    assert evaluate(P(), GT).micro_ap == 0.0


def test_perfect_and_top_k():
    rows = [("q1", "r1", 0.9), ("q2", "r2", 0.8), ("q3", "r3", 0.7), ("q1", "r2", 0.1)]
    assert evaluate(P(*rows), GT).micro_ap == pytest.approx(1.0)
    preds = P(("q1", "r2", 0.9), ("q1", "r1", 0.8), ("q1", "r3", 0.7))
    assert len(preds.top_k_per_query(1)) == 1
    assert evaluate(preds.top_k_per_query(1), [("q1", "r1")]).micro_ap == 0.0


def test_invalid_predictions_are_clear_errors():
    with pytest.raises(RdcdError, match="duplicate"):
        evaluate(P(("q1", "r1", 0.9), ("q1", "r1", 0.8)), GT)
    with pytest.raises(RdcdError, match="non-finite"):
        evaluate(P(("q1", "r1", float("nan"))), GT)
    with pytest.raises(RdcdError, match="no true pairs"):
        evaluate(P(("q1", "r1", 0.9)), [])


def reference_isc(rows, gt):
    """Independent ISC2021 computation: walk predictions in pessimistic order, add precision at each hit."""
    gt = set(gt)
    ordered = sorted(rows, key=lambda r: (-r[2], (r[0], r[1]) in gt))
    hits, ap, best_r90 = 0, 0.0, 0.0
    for n, (q, r, _s) in enumerate(ordered, start=1):
        if (q, r) in gt:
            hits += 1
            ap += (hits / n) / len(gt)
        if hits / n >= 0.9:
            best_r90 = max(best_r90, hits / len(gt))
    return ap, best_r90


def random_set(seed: int):
    rng = random.Random(seed)
    n_q, n_r = rng.randint(5, 60), rng.randint(5, 80)
    gt = [(f"q{i}", f"r{rng.randrange(n_r)}") for i in range(n_q) if rng.random() < 0.6]
    gt += [(q, f"r{rng.randrange(n_r)}") for q, _ in gt[:2]]  # some queries with two true matches
    gt = list(dict.fromkeys(gt))
    rows = []
    truth = dict(gt)
    for i in range(n_q):
        refs = rng.sample(range(n_r), min(10, n_r))
        if f"q{i}" in truth and rng.random() < 0.7:
            refs[0] = int(truth[f"q{i}"][1:])
        for j in dict.fromkeys(refs):
            s = rng.random()
            if seed % 2:  # coarse scores: many exact ties
                s = round(s, 1)
            rows.append((f"q{i}", f"r{j}", s))
    return rows, gt


@pytest.mark.parametrize("seed", range(6))
def test_cli_agrees_with_independent_computation(tmp_path, seed):
    rows, gt = random_set(seed)
    pred_csv, gt_csv = tmp_path / "p.csv", tmp_path / "g.csv"
    pred_csv.write_text("query_id,reference_id,score\n" + "".join(f"{q},{r},{s!r}\n" for q, r, s in rows))
    matched = {q for q, _ in gt}
    negatives = sorted({q for q, _, _ in rows} - matched)
    gt_csv.write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in gt)
                      + "".join(f"{q},\n" for q in negatives))
    out = subprocess.run([sys.executable, "-m", "rdcd.validate.cli", "metrics", "--predictions", str(pred_csv),
                          "--ground-truth", str(gt_csv)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    ap, r90 = reference_isc(rows, gt)
    assert abs(got["micro_ap"] - ap) < 1e-6
    assert abs(got["recall_at_p90"] - r90) < 1e-6
    assert got["num_positives"] == len(gt)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("query_id,reference_id,score\nq1,r1,high\n")
    gt = tmp_path / "g.csv"
    gt.write_text("query_id,reference_id\nq1,r1\n")
    for args, needle in [(["--predictions", str(bad), "--ground-truth", str(gt)], "not a number"),
                         (["--predictions", str(tmp_path / "nope.csv"), "--ground-truth", str(gt)], "not found"),
                         (["--predictions", str(bad)], "required")]:
        out = subprocess.run([sys.executable, "-m", "rdcd.validate.cli", "metrics", *args], capture_output=True, text=True)
        assert out.returncode == 2, out
        assert needle in out.stderr and "Traceback" not in out.stderr
    short = tmp_path / "s.csv"
    short.write_text("q1,r1\n")
    with pytest.raises(RdcdError, match="expected 3 columns"):
        read_predictions(short)


def test_read_predictions_header_optional(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("q1,r1,0.5\nq2,r2,0.25\n")
    p = read_predictions(f)
    assert list(p.queries) == ["q1", "q2"] and np.allclose(p.scores, [0.5, 0.25])
