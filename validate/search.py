"""k-NN search with faiss, PCA-whitening and SSCD-style score normalisation (no torch)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.validate.metrics import Predictions

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("faiss-cpu", "pip install faiss-cpu") from None
    return faiss


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def l2n(x: np.ndarray) -> np.ndarray:
    x = _f32(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(queries: np.ndarray, refs: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: (similarities, indices), each [n_queries, min(k, n_refs)]."""
    if queries.ndim != 2 or refs.ndim != 2 or queries.shape[1] != refs.shape[1]:
        raise RdcdError(f"descriptor dims differ: queries {queries.shape}, references {refs.shape}")
    faiss = _faiss()
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(_f32(refs))
    return index.search(_f32(queries), min(k, refs.shape[0]))


def predictions_from_knn(query_ids, ref_ids, sims: np.ndarray, idx: np.ndarray) -> Predictions:
    q, r, s = [], [], []
    for qi, (row_s, row_i) in enumerate(zip(sims, idx)):
        for sim, j in zip(row_s, row_i):
            if j < 0:
                continue
            q.append(query_ids[qi])
            r.append(ref_ids[j])
            s.append(float(sim))
    return Predictions(np.array(q, dtype=object), np.array(r, dtype=object), np.array(s, dtype=np.float64))


@dataclasses.dataclass
class Whitening:
    """PCA-whitening fitted on background descriptors (faiss PCAMatrix, eigen power -0.5)."""

    pca: object
    d_in: int
    d_out: int

    @classmethod
    def fit(cls, background: np.ndarray, d_out: int | None = None) -> "Whitening":
        faiss = _faiss()
        n, d = background.shape
        d_out = min(d_out or d, d, n - 1)
        if d_out < 2:
            raise RdcdError(f"PCA-whitening needs more background images than {n}")
        if d_out < d:
            log.warning("PCA-whitening: %d background images for %d dims, keeping %d components", n, d, d_out)
        pca = faiss.PCAMatrix(d, d_out, -0.5)
        pca.train(_f32(background))
        return cls(pca, d, d_out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != self.d_in:
            raise RdcdError(f"whitening was fitted on {self.d_in}-d descriptors, got {x.shape[1]}-d")
        return l2n(self.pca.apply_py(_f32(x)))


@dataclasses.dataclass(frozen=True)
class ScoreNorm:
    """SSCD score normalisation: subtract ``beta`` x mean of the query's ``start..end`` (inclusive)
    nearest similarities to a background set, as an extra query dimension against a constant 1."""

    beta: float = 1.0
    start: int = 0
    end: int = 2

    @classmethod
    def parse(cls, spec: str) -> "ScoreNorm":
        """``"1.0[0,2]"`` (SSCD's notation) or ``"1.0"``."""
        try:
            if "[" in spec:
                w, rng = spec.split("[", 1)
                a, _, b = rng.rstrip("]").partition(",")
                return cls(float(w), int(a), int(b or a))
            return cls(float(spec))
        except ValueError:
            raise RdcdError(f"bad score normalisation {spec!r}: expected BETA[START,END], e.g. 1.0[0,2]") from None

    def offsets(self, queries: np.ndarray, background: np.ndarray | None) -> np.ndarray:
        """The per-query score shift, ``-beta x`` mean of its ``start..end`` background similarities (N x 1)."""
        if background is None or len(background) <= self.end:
            raise RdcdError(f"score normalisation needs more than {self.end} background (training/) images")
        sims, _ = knn(queries, background, self.end + 1)
        return (-self.beta * sims[:, self.start: self.end + 1].mean(axis=1, keepdims=True)).astype(np.float32)

    def apply(self, queries: np.ndarray, refs: np.ndarray, background: np.ndarray):
        """Queries and references with one extra dimension, so that inner products are normalised scores."""
        adj = self.offsets(queries, background)
        return (np.concatenate([_f32(queries), adj.astype(np.float32)], axis=1),
                np.concatenate([_f32(refs), np.ones((len(refs), 1), np.float32)], axis=1))

    def __str__(self) -> str:
        return f"{self.beta:g}[{self.start},{self.end}]"
