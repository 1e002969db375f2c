"""µAP of a model on a DISC-layout benchmark, with the images decoded once and reused.

The fallback loop evaluates many variants of one model: decoding and resizing the benchmark each time would
dominate, so :class:`BenchImages` keeps the preprocessed uint8 arrays (resized exactly as
:func:`rdcd.validate.evaluate.describe` does, through :func:`rdcd.validate.extract.load_images`) and scores
with :func:`rdcd.validate.evaluate.evaluate_descriptors`. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rdcd.artifact import Accuracy
from rdcd.benchmark import Benchmark, load_benchmark
from rdcd.errors import RdcdError
from rdcd.fsutil import sha256
from rdcd.preprocess import PreprocessSpec
from rdcd.validate.evaluate import Descriptors, EvalResult, evaluate_descriptors
from rdcd.validate.extract import load_images

log = logging.getLogger(__name__)

Embedder = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class BenchImages:
    bench: Benchmark
    spec: PreprocessSpec
    queries: np.ndarray
    refs: np.ndarray
    query_ids: list[str]
    ref_ids: list[str]
    training: np.ndarray | None
    gt_sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike, spec: PreprocessSpec, with_training: bool = True) -> "BenchImages":
        bench = load_benchmark(path)
        q, qk = load_images(bench.queries.paths, spec)
        r, rk = load_images(bench.references.paths, spec)
        t = None
        if with_training and bench.training is not None and len(bench.training):
            t, _ = load_images(bench.training.paths, spec)
        return cls(bench, spec, q, r, [bench.queries.ids[i] for i in qk], [bench.references.ids[i] for i in rk], t,
                   sha256(bench.gt_path))

    @property
    def root(self) -> Path:
        return self.bench.root

    def describe(self, embedder: Embedder, batch_size: int = 32, with_training: bool = False) -> Descriptors:
        t0 = time.perf_counter()
        q = run_batched(embedder, self.queries, batch_size)
        r = run_batched(embedder, self.refs, batch_size)
        t = run_batched(embedder, self.training, batch_size) if with_training and self.training is not None else None
        return Descriptors(self.query_ids, q, self.ref_ids, r, t, time.perf_counter() - t0)

    def evaluate(self, desc: Descriptors) -> EvalResult:
        return evaluate_descriptors(self.bench, desc)

    def micro_ap(self, embedder: Embedder, batch_size: int = 32) -> float:
        return float(self.evaluate(self.describe(embedder, batch_size)).metrics.micro_ap)

    def info(self) -> dict:
        return {"path": str(Path(self.root).resolve()), "ground_truth_sha256": self.gt_sha256, "queries": len(self.query_ids),
                "references": len(self.ref_ids), "true_pairs": self.bench.num_positives}


def run_batched(embedder: Embedder, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        emb = np.asarray(embedder(images[i: i + batch_size]), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(images[i: i + batch_size]):
            raise RdcdError(f"model returned shape {emb.shape} for a batch of {len(images[i: i + batch_size])}")
        if not np.all(np.isfinite(emb)):
            raise RdcdError("model returned non-finite descriptors")
        out.append(emb)
    return np.concatenate(out)


NORM_TOLERANCE = 1e-3


def check_unit_norm(embedder: Embedder, images: np.ndarray, label: str) -> dict:
    """The descriptor contract (L2-normalised) on a few real images: a quantized tail (the norm itself in 8 bits)
    breaks it while per-query rankings still look fine, so µAP alone can miss the cause."""
    out = np.asarray(run_batched(embedder, images[:32]), dtype=np.float64)
    norms = np.linalg.norm(out, axis=1)
    res = {"images": int(len(norms)), "norm_min": round(float(norms.min()), 6), "norm_max": round(float(norms.max()), 6)}
    if np.max(np.abs(norms - 1.0)) > NORM_TOLERANCE:
        raise RdcdError(f"{label}: descriptors are not L2-normalised (norms {res['norm_min']:.4f}..{res['norm_max']:.4f} "
                        "on calibration images): a quantizer sits in the normalisation tail")
    return res


def accuracy_block(bench: BenchImages, fp32_uap: float, uap: float, runtime: str, simulated: bool,
                   **extra) -> Accuracy:
    """The ``accuracy`` of a quantized artifact in ``manifest.json`` (``extra``: further :class:`Accuracy` fields)."""
    return Accuracy(benchmark=str(Path(bench.root).resolve()), ground_truth_sha256=bench.gt_sha256,
                    fp32_micro_ap=round(float(fp32_uap), 6), micro_ap=round(float(uap), 6),
                    drop=round(float(fp32_uap) - float(uap), 6), runtime=runtime, simulated=bool(simulated), **extra)
