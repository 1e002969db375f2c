"""Compact descriptor codes for the reference index: int8 (per-dimension scale) and binary (sign) codes.

* int8: faiss ``IndexScalarQuantizer`` with ``QT_8bit`` - one byte per dimension, a scale and offset per
  dimension trained on the indexed references plus the background (``training/``) descriptors;
  queries stay float (asymmetric distance), references are stored as codes.
* binary: the sign of each (centred) dimension, packed 8 per byte, searched by Hamming distance with faiss
  ``IndexBinaryFlat``; the similarity is ``1 - 2 * hamming / d``.

Each comes with its µAP on the benchmark, bytes per image and the index size for one million references, so
users can size an index. No torch here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from rdcd.errors import RdcdError
from rdcd.fsutil import write_json
from rdcd.validate.evaluate import Descriptors
from rdcd.validate.metrics import evaluate
from rdcd.validate.search import _faiss, knn, predictions_from_knn

MILLION = 1_000_000


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclasses.dataclass
class Int8Codes:
    """faiss SQ8: per-dimension min/range trained on the descriptors to be indexed (and background ones)."""

    index: object
    dim: int

    @classmethod
    def fit(cls, background: np.ndarray) -> "Int8Codes":
        faiss = _faiss()
        if background is None or len(background) < 2:
            raise RdcdError("int8 codes need at least 2 background descriptors to fit their scales")
        d = background.shape[1]
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(_f32(background))
        return cls(index, d)

    @property
    def bytes_per_image(self) -> int:
        return int(self.index.sa_code_size())

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(_f32(x))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))

    def scales(self) -> dict:
        """The trained per-dimension ranges (vmin, vdiff): code = round(255 * (x - vmin) / vdiff)."""
        faiss = _faiss()
        trained = faiss.vector_to_array(self.index.sq.trained)
        return {"vmin": trained[: self.dim].tolist(), "vdiff": trained[self.dim:].tolist()}

    def search(self, queries: np.ndarray, refs: np.ndarray, k: int = 10):
        index = _faiss().clone_index(self.index)
        index.reset()
        index.add(_f32(refs))
        return index.search(_f32(queries), min(k, len(refs)))


@dataclasses.dataclass
class BinaryCodes:
    """Sign bits of descriptors centred on the background mean; Hamming search."""

    mean: np.ndarray
    dim: int

    @classmethod
    def fit(cls, background: np.ndarray | None, dim: int, center: bool = True) -> "BinaryCodes":
        if dim % 8:
            raise RdcdError(f"binary codes need a descriptor size divisible by 8, got {dim}")
        mean = _f32(background).mean(0) if (center and background is not None and len(background)) else np.zeros(dim, np.float32)
        return cls(mean.astype(np.float32), dim)

    @property
    def bytes_per_image(self) -> int:
        return self.dim // 8

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(_f32(x) - self.mean > 0, axis=1)

    def decode_signs(self, codes: np.ndarray) -> np.ndarray:
        """+1 / -1 per dimension."""
        return np.unpackbits(codes, axis=1, count=self.dim).astype(np.float32) * 2 - 1

    def search(self, queries: np.ndarray, refs: np.ndarray, k: int = 10):
        faiss = _faiss()
        index = faiss.IndexBinaryFlat(self.dim)
        index.add(self.encode(refs))
        ham, idx = index.search(self.encode(queries), min(k, len(refs)))
        return 1.0 - 2.0 * ham.astype(np.float32) / self.dim, idx


def _background(desc: Descriptors) -> tuple[np.ndarray, str]:
    """What the codecs are fitted on: the indexed references plus the background (training) set."""
    if desc.training is not None and len(desc.training):
        return np.concatenate([_f32(desc.refs), _f32(desc.training)]), "references+training"
    return _f32(desc.refs), "references"


def evaluate_codes(bench, desc: Descriptors, fp32_uap: float | None = None, k: int = 10) -> list[dict]:
    """µAP, bytes per image and the 1M-image index size of float, int8 and binary codes."""
    background, fit_on = _background(desc)
    d = desc.dim
    rows = []

    def score(name, sims, idx, nbytes, extra):
        preds = predictions_from_knn(desc.query_ids, desc.ref_ids, sims, idx)
        uap = evaluate(preds, bench.gt_pairs).micro_ap
        rows.append({"code": name, "bytes_per_image": nbytes, "index_1m_mb": round(nbytes * MILLION / 2 ** 20, 1),
                     "micro_ap": round(float(uap), 6), **extra})

    sims, idx = knn(desc.queries, desc.refs, k)
    score("float32", sims, idx, 4 * d, {"search": "faiss IndexFlatIP"})
    int8 = Int8Codes.fit(background)
    s8, i8 = int8.search(desc.queries, desc.refs, k)
    score("int8", s8, i8, int8.bytes_per_image, {"search": "faiss IndexScalarQuantizer QT_8bit (float queries)",
                                                 "fit_on": fit_on})
    binary = BinaryCodes.fit(background, d)
    sb, ib = binary.search(desc.queries, desc.refs, k)
    score("binary", sb, ib, binary.bytes_per_image, {"search": "faiss IndexBinaryFlat (Hamming)",
                                                     "fit_on": fit_on, "centred": True})
    base = rows[0]["micro_ap"] if fp32_uap is None else fp32_uap
    for r in rows:
        r["drop"] = round(base - r["micro_ap"], 6)
    return rows


def save_codecs(path: str | os.PathLike, desc: Descriptors) -> Path:
    """Write what a user needs to encode references like the evaluation did (int8 ranges, binary mean)."""
    background, _ = _background(desc)
    int8 = Int8Codes.fit(background)
    binary = BinaryCodes.fit(background, desc.dim)
    return write_json(path, {"dim": desc.dim,
                             "int8": {"faiss": "IndexScalarQuantizer QT_8bit", **int8.scales()},
                             "binary": {"center": binary.mean.tolist(), "bit_order": "numpy.packbits (big-endian)"}})


def load_int8_codec(path: str | os.PathLike) -> Int8Codes:
    faiss = _faiss()
    data = json.loads(Path(path).read_text())
    d = int(data["dim"])
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.asarray(data["int8"]["vmin"] + data["int8"]["vdiff"], np.float32), index.sq.trained)
    index.is_trained = True
    return Int8Codes(index, d)
