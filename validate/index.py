"""The ``rdcd-index`` reference index: its on-disk format and the embedded faiss backend. **No torch.**

An index is a folder::

    INDEX/
      index.json    metadata (schema ``rdcd-index/1``): the model's sha256, descriptor dim, preprocessing,
                    code type, faiss / Milvus settings, reference count, history of builds and adds
      index.faiss   the faiss index (faiss backend only; binary codes: a faiss binary index)
      ids.npz       faiss int64 label -> reference id (faiss backend only; :mod:`rdcd.validate.index_ids`)
      background.npy  descriptors of background images (``build --background DIR``), for ``search --score-norm``

The whole folder is written next to itself and renamed into place (:func:`rdcd.fsutil.atomic_path`), so
an interrupted ``build`` or ``add`` leaves the previous index intact and no temporary files. With
``--uri`` the vectors live in Milvus (:mod:`rdcd.validate.index_milvus`) and the folder holds only
``index.json``.

Codes (``--codes``), all scored so that higher is more similar:

* ``fp32``: float inner product (``IndexFlatIP``; ``IndexIVFFlat`` with IVF) - the scores of ``rdcd-validate``
* ``int8``: faiss ``IndexScalarQuantizer`` ``QT_8bit``, inner product, float queries (per-dimension ranges fitted
  on the references of the build, as :class:`rdcd.quantize.codes.Int8Codes`)
* ``binary``: sign bits of the descriptor centred on the build's mean (:class:`rdcd.quantize.codes.BinaryCodes`),
  Hamming search with ``IndexBinaryFlat``; score ``1 - 2 * hamming / dim``
* ``pq``: IVF-PQ (``IndexIVFPQ``, ``m`` sub-quantizers of 8 bits, inner product)

IVF (``--ivf auto``) follows faiss's guidelines: exhaustive search below :data:`IVF_AUTO_MIN` references,
else ``nlist = 4 * sqrt(N)`` lists (at most N / 39 so each list has 39 training points, at most 65,536),
searched with ``nprobe = max(8, nlist / 16)``, its k-means trained on at most :data:`IVF_TRAIN_PER_LIST`
references per list; PQ codes always use IVF. An index trained on N references
keeps its centroids / ranges when references are added later (``trained_on`` in the metadata).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd.errors import RdcdError
from rdcd.fsutil import read_json
from rdcd.validate.index_ids import IdTable

log = logging.getLogger(__name__)

SCHEMA = "rdcd-index/1"
META_FILE = "index.json"
FAISS_FILE = "index.faiss"
BACKGROUND_FILE = "background.npy"
CODES = ("fp32", "int8", "binary", "pq")
#: ``--ivf auto``: exhaustive (exact for fp32) search below this many references.
IVF_AUTO_MIN = 200_000
MAX_NLIST = 65_536
#: k-means of the IVF lists samples at most this many references per list (faiss: 30 to 256 per centroid);
#: 64 keeps the 512-d teacher's 1M-reference build in minutes on a 2-core CPU.
IVF_TRAIN_PER_LIST = 64
#: faiss warns below 39 training points per centroid; PQ's 256 centroids per sub-quantizer need this many.
MIN_PQ_TRAIN = 1_000


def _faiss():
    from rdcd.validate.search import _faiss as load

    return load()


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------------------- planning
def ivf_plan(n: int, codes: str, ivf: str | int = "auto") -> dict | None:
    """``{"nlist", "nprobe"}`` for an IVF index over ``n`` references, or ``None`` for exhaustive search."""
    if codes not in CODES:
        raise RdcdError(f"unknown code type {codes!r}: choose from {', '.join(CODES)}")
    if ivf in ("off", "none", "0", 0):
        return None
    if ivf == "auto":
        if codes != "pq" and n < IVF_AUTO_MIN:
            return None
        nlist = default_nlist(n)
    else:
        try:
            nlist = int(ivf)
        except (TypeError, ValueError):
            raise RdcdError(f"--ivf must be auto, off or a number of lists, not {ivf!r}") from None
        if nlist < 1:
            raise RdcdError("--ivf lists must be >= 1")
        if nlist > n:
            raise RdcdError(f"--ivf {nlist} needs at least {nlist} references to train its centroids, got {n}")
    return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16))}


def default_nlist(n: int) -> int:
    """faiss's guideline for ``n`` references: 4 sqrt(n) lists, at most n / 39 and :data:`MAX_NLIST`."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39 or 1, MAX_NLIST))


def pq_subquantizers(dim: int, m: int | None = None) -> int:
    """PQ sub-quantizers: ``m`` if given (must divide ``dim``), else the largest divisor of ``dim`` <= dim/4."""
    if m is not None:
        if m < 1 or dim % m:
            raise RdcdError(f"--pq-m {m} must divide the descriptor dim {dim}")
        return m
    return max(k for k in range(1, max(1, dim // 4) + 1) if dim % k == 0)


def bytes_per_ref(codes: str, dim: int, pq_m: int | None = None) -> int:
    return {"fp32": 4 * dim, "int8": dim, "binary": dim // 8, "pq": pq_m or pq_subquantizers(dim)}[codes]


def new_meta(model: dict, dim: int, preprocess: dict, codes: str, ids_mode: str, ivf: dict | None,
             pq_m: int | None, backend: str = "faiss") -> dict:
    from rdcd import __version__
    from rdcd.manifest import now

    if codes == "binary" and dim % 8:
        raise RdcdError(f"binary codes need a descriptor dim divisible by 8, got {dim}")
    return {"schema": SCHEMA, "backend": backend, "rdcd_version": __version__, "created": now(), "updated": now(),
            "model": model, "dim": int(dim), "preprocess": preprocess, "codes": codes,
            "bytes_per_reference": bytes_per_ref(codes, dim, pq_m), "pq_m": pq_m if codes == "pq" else None,
            "ivf": ivf, "ids": {"mode": ids_mode}, "count": 0, "trained_on": 0, "operating_point": None,
            "history": []}


def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise RdcdError(f"index not found: {folder}")
    if not path.is_file():
        raise RdcdError(f"{folder} is not an rdcd index (no {META_FILE}): build one with rdcd-index build")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise RdcdError(f"{path} is not an {SCHEMA} index (schema {meta.get('schema') if isinstance(meta, dict) else '?'})")
    missing = [k for k in ("backend", "model", "dim", "codes", "preprocess", "ids") if k not in meta]
    if missing:
        raise RdcdError(f"malformed {path}: lacks {', '.join(missing)}")
    return meta


def check_new_ids(new_ids: Sequence[str], existing, replace: bool) -> list[str]:
    """The new ids already in the index (an error unless ``replace``); duplicates within ``new_ids`` are refused."""
    seen: set[str] = set()
    for i in new_ids:
        if i in seen:
            raise RdcdError(f"reference id {i!r} occurs twice in this batch")
        seen.add(i)
    dup = [i for i in new_ids if i in existing]
    if dup and not replace:
        more = f" and {len(dup) - 3} more" if len(dup) > 3 else ""
        raise RdcdError(f"{len(dup)} reference id(s) are already in the index ({', '.join(dup[:3])}{more}): "
                        f"pass --replace to replace them")
    return dup


# ------------------------------------------------------------------------------------------ faiss
class FaissStore:
    """The embedded backend: a faiss index with int64 labels and a label -> reference id table."""

    backend = "faiss"

    def __init__(self, meta: dict, index, table: IdTable):
        self.meta, self.index, self.table = meta, index, table

    # -- construction
    @classmethod
    def create(cls, meta: dict, train: np.ndarray) -> "FaissStore":
        """An empty index of ``meta["codes"]``, trained (ranges, centroids, centre) on ``train``."""
        faiss = _faiss()
        from rdcd.quantize.codes import BinaryCodes, Int8Codes

        codes, d, ivf = meta["codes"], int(meta["dim"]), meta.get("ivf")
        train = _f32(train)
        nlist = ivf["nlist"] if ivf else None
        ip = faiss.METRIC_INNER_PRODUCT
        if codes == "pq" and len(train) < MIN_PQ_TRAIN:
            raise RdcdError(f"pq codes need at least {MIN_PQ_TRAIN} references to train their codebooks, got "
                            f"{len(train)}: use --codes int8 or fp32 for a collection this small")
        if codes == "binary":
            binary = BinaryCodes.fit(train, d)
            meta["binary"] = {"center": binary.mean.tolist(), "bit_order": "numpy.packbits (big-endian)"}
            if nlist:
                base = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, nlist)
                base.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
                base.train(binary.encode(train))
                base.nprobe = ivf["nprobe"]
                index = base  # IVF indexes store the labels themselves
            else:
                index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(d))
        else:
            if codes == "fp32":
                base = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip) if nlist else faiss.IndexFlatIP(d)
            elif codes == "int8":
                base = (faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
                        if nlist else Int8Codes.fit(train).index)
            else:
                m = int(meta["pq_m"])
                base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, ip) if nlist else faiss.IndexPQ(d, m, 8, ip)
            if codes == "pq" and len(train) < 39 * 256:
                log.warning("pq: %d references train codebooks of 256 centroids (faiss advises >= %d)", len(train), 39 * 256)
                base.pq.cp.min_points_per_centroid = 1  # one warning here instead of one per sub-quantizer
            if nlist:
                base.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
            if not base.is_trained:
                base.train(train)
            if nlist:
                base.nprobe = ivf["nprobe"]
            # IndexIVF keeps the labels it is given; flat code indexes get an IndexIDMap (not IDMap2,
            # whose reverse hash map costs ~40 bytes per reference and serves only reconstruct())
            index = base if nlist else faiss.IndexIDMap(base)
        meta["trained_on"] = int(len(train))
        meta["faiss"] = {"file": FAISS_FILE, "version": faiss.__version__, "index": describe_faiss(codes, d, ivf, meta.get("pq_m"))}
        return cls(meta, index, IdTable())

    @classmethod
    def load(cls, folder: str | os.PathLike, meta: dict) -> "FaissStore":
        faiss = _faiss()
        folder = Path(folder)
        path = folder / FAISS_FILE
        if not path.is_file():
            raise RdcdError(f"index {folder} is incomplete: {FAISS_FILE} is missing")
        table = IdTable.load(folder)
        try:
            index = faiss.read_index_binary(str(path)) if meta["codes"] == "binary" else faiss.read_index(str(path))
        except RuntimeError as exc:
            raise RdcdError(f"cannot read index {folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if len(table) != index.ntotal:
            raise RdcdError(f"index {folder} is inconsistent: {index.ntotal} vectors, {len(table)} ids")
        return cls(meta, index, table)

    # -- content
    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def has(self, ids: Sequence[str]) -> set[str]:
        known = self.table.label_of()
        return {i for i in ids if i in known}

    def _encode(self, x: np.ndarray) -> np.ndarray:
        if self.meta["codes"] == "binary":
            return np.packbits(_f32(x) - np.asarray(self.meta["binary"]["center"], np.float32) > 0, axis=1)
        return _f32(x)

    def add(self, ids: Sequence[str], vectors: np.ndarray, replace: bool = False) -> tuple[int, int]:
        """Add references; returns (added, replaced). Existing ids are refused unless ``replace``."""
        vectors = _f32(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(ids), int(self.meta["dim"])):
            raise RdcdError(f"expected {len(ids)} descriptors of dim {self.meta['dim']}, got {vectors.shape}")
        dup = check_new_ids(ids, self.table.label_of(), replace)
        if dup:
            old = self.table.remove(dup)
            removed = self.index.remove_ids(old)
            if removed != len(old):
                raise RdcdError(f"faiss removed {removed} of {len(old)} replaced references")
        self.index.add_with_ids(self._encode(vectors), self.table.append(ids))
        self.meta["count"] = self.count
        return len(ids) - len(dup), len(dup)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` (reference id, score) per query, best first; fewer when the index is smaller."""
        faiss = _faiss()
        k = min(int(k), self.count)
        if k < 1:
            return [[] for _ in range(len(queries))]
        if self.meta.get("ivf"):
            ivf = faiss.extract_index_ivf(self.index) if self.meta["codes"] != "binary" else self.index
            ivf.nprobe = int(nprobe or self.meta["ivf"]["nprobe"])
        scores, labels = self.index.search(self._encode(queries), k)
        if self.meta["codes"] == "binary":
            scores = 1.0 - 2.0 * scores.astype(np.float32) / int(self.meta["dim"])
        ids = self.table.ids_of(labels.ravel())
        return [[(i, float(sc)) for sc, i in zip(srow.tolist(), ids[r * k:(r + 1) * k]) if i is not None]
                for r, srow in enumerate(scores)]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write index, id table and metadata into a fresh folder and rename it over ``folder``."""
        from rdcd.fsutil import atomic_path, write_json
        from rdcd.manifest import now

        faiss = _faiss()
        self.meta.update(count=self.count, updated=now())
        with atomic_path(folder, suffix="") as tmp:
            tmp.mkdir()
            (faiss.write_index_binary if self.meta["codes"] == "binary" else faiss.write_index)(self.index, str(tmp / FAISS_FILE))
            self.table.save(tmp)
            save_background(tmp, self.meta)
            write_json(tmp / META_FILE, public_meta(self.meta))
        return Path(folder)

    def stats(self) -> dict:
        return {"count": self.count, "bytes_on_disk": _folder_bytes(self.meta.get("_folder"))}

    def close(self) -> None:
        pass


def save_background(folder: Path, meta: dict) -> None:
    """Write the background descriptors (``--background``, for ``--score-norm``) into an index folder being saved."""
    bg = meta.get("_background")
    if bg is not None:
        np.save(folder / BACKGROUND_FILE, _f32(bg), allow_pickle=False)


def load_background(folder: Path, meta: dict) -> None:
    if meta.get("background"):
        try:
            meta["_background"] = np.load(Path(folder) / BACKGROUND_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RdcdError(f"index {folder}: cannot read {BACKGROUND_FILE}: {exc}") from None


def _folder_bytes(folder) -> int | None:
    if not folder:
        return None
    from rdcd.fsutil import size_bytes

    return size_bytes(folder)


def describe_faiss(codes: str, dim: int, ivf: dict | None, pq_m: int | None) -> str:
    """A faiss-factory-like name of the index, e.g. ``IDMap,SQ8 (IP)`` or ``IVF4000,PQ32 (IP)``."""
    if codes == "binary":
        return f"BIVF{ivf['nlist']},B{dim} (Hamming)" if ivf else f"BIDMap,BFlat{dim} (Hamming)"
    body = {"fp32": "Flat", "int8": "SQ8", "pq": f"PQ{pq_m}x8"}[codes]
    return f"IVF{ivf['nlist']},{body} (IP)" if ivf else f"IDMap,{body} (IP)"


def open_store(folder: str | os.PathLike, meta: dict | None = None, uri: str | None = None, token: str | None = None):
    """The backend of an existing index folder (faiss files, or the Milvus collection it names)."""
    meta = meta or read_meta(folder)
    meta["_folder"] = str(folder)
    load_background(folder, meta)
    if meta["backend"] == "faiss":
        if uri:
            raise RdcdError(f"index {folder} is a faiss index: --uri applies to Milvus indexes only")
        return FaissStore.load(folder, meta)
    if meta["backend"] == "milvus":
        from rdcd.validate.index_milvus import MilvusStore

        return MilvusStore.open(meta, uri=uri, token=token)
    raise RdcdError(f"index {folder}: unknown backend {meta['backend']!r}")


def public_meta(meta: dict) -> dict:
    """The metadata as written to ``index.json`` (without the in-memory ``_`` keys)."""
    return {k: v for k, v in meta.items() if not k.startswith("_")}
