"""Evaluate an embedder (any runtime, the teacher, PDQ) on a DISC-layout benchmark. No torch here."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from rdcd.benchmark import Benchmark
from rdcd.errors import RdcdError
from rdcd.preprocess import PreprocessSpec
from rdcd.validate.extract import Embedder, extract
from rdcd.validate.metrics import Metrics, Predictions, evaluate
from rdcd.validate.search import ScoreNorm, Whitening, knn, predictions_from_knn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Descriptors:
    query_ids: list[str]
    queries: np.ndarray
    ref_ids: list[str]
    refs: np.ndarray
    training: np.ndarray | None
    seconds: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.refs.shape[1])

    def map(self, fn) -> "Descriptors":
        """Apply ``fn`` to every descriptor matrix (e.g. a quantize/dequantize code round trip)."""
        return dataclasses.replace(self, queries=fn(self.queries), refs=fn(self.refs),
                                   training=None if self.training is None else fn(self.training))


@dataclasses.dataclass
class EvalResult:
    metrics: Metrics
    predictions: Predictions
    setting: str
    dim: int

    def row(self) -> dict:
        m = self.metrics
        return {"setting": self.setting, "dim": self.dim, "micro_ap": m.micro_ap, "recall_at_p90": m.recall_at_p90,
                "acc_at_1": m.acc_at_1}


def describe(bench: Benchmark, embedder: Embedder, spec: PreprocessSpec, batch_size: int = 32,
             with_training: bool = True, skip_bad: bool = False, label: str = "") -> Descriptors:
    t0 = time.perf_counter()
    q, qk = extract(embedder, bench.queries.paths, spec, batch_size, f"{label} queries".strip(), skip_bad)
    r, rk = extract(embedder, bench.references.paths, spec, batch_size, f"{label} references".strip(), skip_bad)
    t = None
    if with_training and bench.training is not None and len(bench.training):
        t, _ = extract(embedder, bench.training.paths, spec, batch_size, f"{label} training".strip(), skip_bad)
    return Descriptors([bench.queries.ids[i] for i in qk], q, [bench.references.ids[i] for i in rk], r, t,
                       time.perf_counter() - t0)


def evaluate_descriptors(bench: Benchmark, desc: Descriptors, k: int = 10, whiten: bool = False,
                         score_norm: ScoreNorm | str | None = None) -> EvalResult:
    """Search k neighbours per query (faiss, inner product) and score them with ISC2021 rules."""
    q, r, t = desc.queries, desc.refs, desc.training
    setting = []
    if whiten:
        if t is None:
            raise RdcdError("PCA-whitening needs a training/ folder of background images in the benchmark")
        w = Whitening.fit(t)
        q, r, t = w(q), w(r), w(t)
        setting.append(f"PCAW{w.d_out}")
    if score_norm:
        sn = ScoreNorm.parse(score_norm) if isinstance(score_norm, str) else score_norm
        q, r = sn.apply(q, r, t)
        setting.append(f"norm {sn}")
    sims, idx = knn(q, r, k)
    preds = predictions_from_knn(desc.query_ids, desc.ref_ids, sims, idx)
    return EvalResult(evaluate(preds, bench.gt_pairs), preds, "+".join(setting) or "raw", desc.dim)
