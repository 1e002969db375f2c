"""The Milvus backend of ``rdcd-index`` (``--uri``), through ``pymilvus``. **No torch.**

``--uri ./refs.db`` is Milvus Lite (embedded, one local file; what the tests use), ``--uri
http://host:19530`` a Milvus server or cluster for collections that outgrow one machine (``--token`` or
``MILVUS_TOKEN`` for authentication; never written to the index). The index folder keeps ``index.json``
only; the collection holds the vectors with the reference id as its primary key, and carries a
fingerprint of the metadata (model sha256, dim, codes) as the collection property ``rdcd.index``, so a
collection rebuilt by someone else is refused rather than searched with the wrong model.

Code types map onto Milvus index types: ``fp32`` -> ``FLAT`` (``IVF_FLAT`` with IVF), ``int8`` ->
``IVF_SQ8`` (one list without IVF: exhaustive 8-bit search), ``pq`` -> ``IVF_PQ``, ``binary`` ->
``BIN_FLAT`` / ``BIN_IVF_FLAT`` with Hamming distance (Milvus servers only: Milvus Lite has no binary
vectors; it also forgets IVF list counts between sessions, so there every IVF search visits all lists).
Scores are inner products (binary: ``1 - 2 * hamming / dim``), as with faiss.

Adds are checked before anything is written (existing ids are refused without ``--replace``, which
upserts), but a Milvus insert is not one transaction: an add interrupted half-way leaves the rows it
inserted, and ``rdcd-index info`` then shows the collection's row count beside the recorded one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.validate.index import META_FILE, MIN_PQ_TRAIN, check_new_ids, public_meta, save_background

log = logging.getLogger(__name__)

PROPERTY = "rdcd.index"
MAX_ID_LEN = 512
CHUNK = 1000
LITE_NPROBE = 65_536  # Milvus's largest nprobe
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def is_lite(uri: str) -> bool:
    return not uri.startswith(SERVER_SCHEMES)


def normalise_uri(uri: str) -> str:
    if not is_lite(uri):
        return uri
    if not uri.endswith(".db"):
        raise RdcdError(f"--uri {uri}: a Milvus Lite URI is a local file ending in .db (e.g. ./refs.db); "
                        f"a Milvus server URI starts with http:// or https://")
    return str(Path(uri).expanduser().resolve())


def default_collection(index_folder: str | os.PathLike) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(index_folder).name.split(".")[0]) or "refs"
    return ("rdcd_" + name)[:255]


def _check_collection_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise RdcdError(f"--collection {name!r}: Milvus names are letters, digits and '_', not starting with a digit")
    return name


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MissingDependency("pymilvus", "pip install 'rdcd[index]' (pymilvus, milvus-lite)") from None
    # pymilvus logs every failed RPC with a traceback, Milvus Lite each server start, and its gRPC server a
    # traceback for calls it does not implement (AllocTimestamp, harmless): rdcd's one-line errors say enough
    for name, level in (("pymilvus", logging.CRITICAL), ("grpc", logging.CRITICAL), ("milvus_lite", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    return pymilvus


def _why(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(msg).splitlines()[0]


def _client(uri: str, token: str | None):
    pymilvus = _pymilvus()
    token = token or os.environ.get("MILVUS_TOKEN") or ""
    if is_lite(uri):
        import importlib.util

        if importlib.util.find_spec("milvus_lite") is None:  # pymilvus needs it for local files
            raise MissingDependency("milvus-lite", "pip install milvus-lite, or give a Milvus server --uri")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token)
    except Exception as exc:  # noqa: BLE001 - connection problems are the user's to fix
        raise RdcdError(f"cannot connect to Milvus at {uri}: {_why(exc)}") from None


def fingerprint(meta: dict) -> str:
    m = meta["model"]
    return json.dumps({"schema": meta["schema"], "model_sha256": m.get("sha256"), "dim": meta["dim"],
                       "codes": meta["codes"], "ids": meta["ids"]["mode"]}, sort_keys=True)


def index_params(meta: dict) -> tuple[str, str, dict, dict]:
    """(Milvus index type, metric, build params, search params) for the index's code type."""
    codes, ivf = meta["codes"], meta.get("ivf")
    nlist, nprobe = (ivf["nlist"], ivf["nprobe"]) if ivf else (1, 1)
    if codes == "fp32":
        return ("IVF_FLAT", "IP", {"nlist": nlist}, {"nprobe": nprobe}) if ivf else ("FLAT", "IP", {}, {})
    if codes == "int8":
        return "IVF_SQ8", "IP", {"nlist": nlist}, {"nprobe": nprobe}
    if codes == "pq":
        return "IVF_PQ", "IP", {"nlist": nlist, "m": int(meta["pq_m"]), "nbits": 8}, {"nprobe": nprobe}
    return ("BIN_IVF_FLAT", "HAMMING", {"nlist": nlist}, {"nprobe": nprobe}) if ivf else ("BIN_FLAT", "HAMMING", {}, {})


class MilvusStore:
    backend = "milvus"

    def __init__(self, meta: dict, client, collection: str):
        self.meta, self.client, self.collection = meta, client, collection

    @classmethod
    def create(cls, meta: dict, uri: str, collection: str, train: np.ndarray, token: str | None = None,
               force: bool = False) -> "MilvusStore":
        uri, collection = normalise_uri(uri), _check_collection_name(collection)
        codes, d = meta["codes"], int(meta["dim"])
        if codes == "binary" and is_lite(uri):
            raise RdcdError("Milvus Lite has no binary vectors: use --codes binary with the faiss backend (no --uri) "
                            "or a Milvus server --uri")
        if codes == "pq" and len(train) < MIN_PQ_TRAIN:
            raise RdcdError(f"pq codes need at least {MIN_PQ_TRAIN} references to train, got {len(train)}")
        pymilvus = _pymilvus()
        client = _client(uri, token)
        kind, metric, params, search = index_params(meta)
        try:
            if client.has_collection(collection):
                if not force:
                    raise RdcdError(f"Milvus collection {collection!r} already exists at {uri}: pass --force to "
                                    f"replace it, or use rdcd-index add")
                client.drop_collection(collection)
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", pymilvus.DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LEN)
            vec_type = pymilvus.DataType.BINARY_VECTOR if codes == "binary" else pymilvus.DataType.FLOAT_VECTOR
            schema.add_field("vec", vec_type, dim=d)
            ip = client.prepare_index_params()
            ip.add_index(field_name="vec", index_type=kind, metric_type=metric, params=params)
            client.create_collection(collection, schema=schema, index_params=ip, properties={PROPERTY: fingerprint(meta)})
        except RdcdError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RdcdError(f"Milvus cannot create collection {collection!r} ({kind}, {metric}): {_why(exc)}") from None
        if codes == "binary":
            from rdcd.quantize.codes import BinaryCodes

            meta["binary"] = {"center": BinaryCodes.fit(train, d).mean.tolist(), "bit_order": "numpy.packbits (big-endian)"}
        meta["trained_on"] = int(len(train))
        meta["milvus"] = {"uri": uri, "collection": collection, "lite": is_lite(uri), "index_type": kind,
                          "metric": metric, "params": params, "search_params": search, "pymilvus": pymilvus.__version__}
        return cls(meta, client, collection)

    @classmethod
    def open(cls, meta: dict, uri: str | None = None, token: str | None = None) -> "MilvusStore":
        info = meta.get("milvus") or {}
        uri = normalise_uri(uri or info.get("uri") or "")
        collection = info.get("collection") or ""
        client = _client(uri, token)
        try:
            if not client.has_collection(collection):
                raise RdcdError(f"Milvus collection {collection!r} not found at {uri}")
            props = client.describe_collection(collection).get("properties") or {}
            if props.get(PROPERTY) == fingerprint(meta):
                client.load_collection(collection)  # a reopened collection is released until loaded
        except RdcdError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RdcdError(f"Milvus at {uri}: {_why(exc)}") from None
        if props.get(PROPERTY) != fingerprint(meta):
            raise RdcdError(f"Milvus collection {collection!r} at {uri} was not built for this index (its rdcd.index "
                            f"property differs from {META_FILE}): rebuild with rdcd-index build --force")
        meta["milvus"] = {**info, "uri": uri}
        return cls(meta, client, collection)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise RdcdError(f"Milvus {what} failed on {self.collection!r}: {_why(exc)}") from None

    @property
    def count(self) -> int:
        return int(self._call("stats", self.client.get_collection_stats, self.collection)["row_count"])

    def has(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), CHUNK):
            rows = self._call("get", self.client.get, collection_name=self.collection, ids=list(ids[i: i + CHUNK]),
                              output_fields=["id"])
            found.update(str(r["id"]) for r in rows)
        return found

    def _encode(self, x: np.ndarray) -> list:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.meta["codes"] == "binary":
            bits = np.packbits(x - np.asarray(self.meta["binary"]["center"], np.float32) > 0, axis=1)
            return [row.tobytes() for row in bits]
        return x.tolist()

    def add(self, ids: Sequence[str], vectors: np.ndarray, replace: bool = False) -> tuple[int, int]:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), int(self.meta["dim"])):
            raise RdcdError(f"expected {len(ids)} descriptors of dim {self.meta['dim']}, got {vectors.shape}")
        long = [i for i in ids if len(i.encode()) > MAX_ID_LEN]
        if long:
            raise RdcdError(f"reference id {long[0][:40]!r}… is longer than Milvus's {MAX_ID_LEN} bytes")
        dup = check_new_ids(ids, self.has(ids), replace)
        write = self.client.upsert if dup else self.client.insert
        for i in range(0, len(ids), CHUNK):
            rows = [{"id": r, "vec": v} for r, v in zip(ids[i: i + CHUNK], self._encode(vectors[i: i + CHUNK]))]
            self._call("upsert" if dup else "insert", write, self.collection, rows)
        self.meta["count"] = self.count
        return len(ids) - len(dup), len(dup)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        info = self.meta["milvus"]
        params = dict(info.get("search_params") or {})
        if nprobe and "nprobe" in params:
            params["nprobe"] = int(nprobe)
        if info.get("lite") and "nprobe" in params:
            # Milvus Lite (3.2) forgets an IVF index's nlist once the process that created it ends and rebuilds
            # it with its default (up to 128 lists): visiting every list keeps IVF_SQ8 / IVF_PQ exhaustive there
            params["nprobe"] = LITE_NPROBE
        binary, d = self.meta["codes"] == "binary", int(self.meta["dim"])
        out: list[list[tuple[str, float]]] = []
        for i in range(0, len(queries), 256):
            res = self._call("search", self.client.search, self.collection, data=self._encode(queries[i: i + 256]),
                             anns_field="vec", limit=int(k), output_fields=["id"],
                             search_params={"metric_type": info["metric"], "params": params})
            for hits in res:
                row = [(str(h["id"]), 1.0 - 2.0 * float(h["distance"]) / d if binary else float(h["distance"]))
                       for h in hits]
                out.append(sorted(row, key=lambda t: -t[1]))
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        from rdcd.fsutil import atomic_path, write_json
        from rdcd.manifest import now

        self.meta.update(count=self.count, updated=now())
        with atomic_path(folder, suffix="") as tmp:
            tmp.mkdir()
            write_json(tmp / META_FILE, public_meta(self.meta))
            save_background(tmp, self.meta)
        return Path(folder)

    def stats(self) -> dict:
        return {"count": self.count, "collection": self.collection, "uri": self.meta["milvus"]["uri"]}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
