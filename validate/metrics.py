"""Copy-detection metrics under the ISC2021 / DISC2021 rules.

Predictions (query, reference, score) from all queries are pooled and sorted globally by
decreasing score; among equal scores, wrong matches come first (ties are pessimistic, so a
constant score cannot buy precision). Micro-average precision is the area under that
precision-recall curve with recall's denominator the number of true pairs in the ground truth,
so missed pairs and unmatched queries count. Recall at precision 0.9 is the highest recall of any
prefix whose precision is at least 0.9 (0 when no prefix reaches it). No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from rdcd.errors import RdcdError


@dataclasses.dataclass
class Metrics:
    micro_ap: float
    recall_at_p90: float
    threshold_at_p90: float | None
    acc_at_1: float  # share of true pairs ranked first for their query (ISC "recall at rank 1")
    recall_at_rank10: float
    num_positives: int
    num_predictions: int
    precisions: np.ndarray = dataclasses.field(repr=False)
    recalls: np.ndarray = dataclasses.field(repr=False)
    thresholds: np.ndarray = dataclasses.field(repr=False)

    def to_dict(self, curve: bool = False) -> dict:
        d = {"micro_ap": self.micro_ap, "recall_at_p90": self.recall_at_p90,
             "threshold_at_p90": self.threshold_at_p90, "acc_at_1": self.acc_at_1,
             "recall_at_rank10": self.recall_at_rank10, "num_positives": self.num_positives,
             "num_predictions": self.num_predictions}
        if curve:
            d["curve"] = {"precision": self.precisions.tolist(), "recall": self.recalls.tolist(),
                          "threshold": self.thresholds.tolist()}
        return d


@dataclasses.dataclass
class Predictions:
    queries: np.ndarray  # object arrays of ids
    references: np.ndarray
    scores: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, float]]) -> "Predictions":
        rows = list(rows)
        q = np.array([r[0] for r in rows], dtype=object)
        r = np.array([r[1] for r in rows], dtype=object)
        s = np.array([float(r[2]) for r in rows], dtype=np.float64)
        return cls(q, r, s)

    def top_k_per_query(self, k: int) -> "Predictions":
        """Keep each query's k highest-scoring predictions (ISC2021 allows k = 10 per query)."""
        keep = []
        by_q: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(self.queries):
            by_q[q].append(i)
        for idx in by_q.values():
            idx.sort(key=lambda i: -self.scores[i])
            keep.extend(idx[:k])
        keep.sort()
        return Predictions(self.queries[keep], self.references[keep], self.scores[keep])


def precision_recall(y_true: np.ndarray, scores: np.ndarray, num_positives: int):
    """Precision, recall and threshold after each prediction in pessimistic global order."""
    y_true = np.asarray(y_true, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.lexsort((y_true, -scores))  # primary: score desc; ties: false matches first
    y, s = y_true[order], scores[order]
    ntp = np.cumsum(y)
    precisions = ntp / np.arange(1, len(y) + 1)
    recalls = ntp / num_positives
    return precisions, recalls, s


def average_precision(precisions: np.ndarray, recalls: np.ndarray) -> float:
    """Sum of precision x recall increment along the curve (recalls must be non-decreasing)."""
    prev = np.concatenate([[0.0], recalls[:-1]])
    return float(np.sum((recalls - prev) * precisions))


def _check(preds: Predictions) -> None:
    if len(preds) and not np.all(np.isfinite(preds.scores)):
        bad = int(np.flatnonzero(~np.isfinite(preds.scores))[0])
        raise RdcdError(f"prediction {bad + 1} has a non-finite score ({preds.scores[bad]})")
    pairs = set(zip(preds.queries.tolist(), preds.references.tolist()))
    if len(pairs) != len(preds):
        raise RdcdError(f"predictions contain {len(preds) - len(pairs)} duplicate (query, reference) pairs")


def evaluate(preds: Predictions, gt_pairs: Sequence[tuple[str, str]]) -> Metrics:
    """ISC2021 metrics of pooled predictions against the true pairs."""
    gt = set(gt_pairs)
    if not gt:
        raise RdcdError("the ground truth has no true pairs: micro-AP is undefined")
    _check(preds)
    y_true = np.fromiter(((q, r) in gt for q, r in zip(preds.queries, preds.references)), dtype=bool,
                         count=len(preds))
    p, r, t = precision_recall(y_true, preds.scores, len(gt))
    ap = average_precision(p, r) if len(preds) else 0.0
    ok = p >= 0.9
    if ok.any():
        best = int(np.argmax(np.where(ok, r, -1.0)))
        r90, t90 = float(r[best]), float(t[best])
    else:
        r90, t90 = 0.0, None
    ranks = _true_pair_ranks(preds, gt)
    return Metrics(micro_ap=ap, recall_at_p90=r90, threshold_at_p90=t90,
                   acc_at_1=float(np.mean(ranks == 0)), recall_at_rank10=float(np.mean(ranks < 10)),
                   num_positives=len(gt), num_predictions=len(preds), precisions=p, recalls=r, thresholds=t)


def _true_pair_ranks(preds: Predictions, gt: set[tuple[str, str]]) -> np.ndarray:
    """Rank of each true pair within its query's predictions (ties pessimistic; huge if absent)."""
    by_q: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for q, r, s in zip(preds.queries, preds.references, preds.scores):
        by_q[q].append((s, r))
    ranks = []
    for q, ref in gt:
        res = by_q.get(q, [])
        hit = [s for s, r in res if r == ref]
        ranks.append(sum(1 for s, _ in res if s >= hit[0]) - 1 if hit else 1 << 35)
    return np.asarray(ranks, dtype=np.int64)


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read ``query_id,reference_id,score`` (header optional); malformed rows are one-line errors with the line."""
    from rdcd.benchmark import read_csv_rows

    rows = []
    for lineno, (q, r, s) in read_csv_rows(path, ("query_id", "reference_id", "score")):
        if not q or not r:
            raise RdcdError(f"{path}:{lineno}: empty query_id or reference_id")
        try:
            score = float(s)
        except ValueError:
            hint = " (the header must be query_id,reference_id,score)" if lineno == 1 else ""
            raise RdcdError(f"{path}:{lineno}: score {s!r} is not a number{hint}") from None
        if not math.isfinite(score):
            raise RdcdError(f"{path}:{lineno}: score {s!r} is not finite")
        rows.append((q, r, score))
    return Predictions.from_rows(rows)


def check_alignment(preds: Predictions, listed: set[str], pred_path: str = "the predictions",
                    gt_path: str = "the ground truth") -> None:
    """Refuse predictions and ground truth that share no query id (another benchmark, swapped files):
    their micro-AP of 0 would be a meaningless result, not a measurement."""
    pred_q = set(preds.queries.tolist())
    if pred_q and listed and not pred_q & listed:
        raise RdcdError(f"none of the {len(pred_q)} query ids of {pred_path} (e.g. {sorted(pred_q)[:2]}) is in "
                        f"{gt_path} ({len(listed)} query ids, e.g. {sorted(listed)[:2]}): they are not about the "
                        f"same queries")


def write_predictions(path: str | os.PathLike, preds: Predictions) -> None:
    from rdcd.benchmark import write_csv

    write_csv(path, ("query_id", "reference_id", "score"),
              ((q, r, f"{s:.9g}") for q, r, s in zip(preds.queries, preds.references, preds.scores)))
