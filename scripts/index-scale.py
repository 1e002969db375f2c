#!/usr/bin/env python
"""Scale benchmark of the ``rdcd-index`` backends on synthetic descriptors (no model, no images).

References are N unit vectors with the anisotropy of real descriptors (a low-rank part plus noise);
queries are edited copies of Q references (the reference plus noise, cosine about ``--copy-cos``) and
as many distractors (fresh vectors). For each code type, exhaustive and IVF (nlist = 4 sqrt N, the
index's default nprobe), through :class:`rdcd.validate.index.FaissStore` - what ``rdcd-index`` runs -
it measures: build seconds (training + adding), index size on disk, batched search throughput and
single-query latency (p50/p99), the share of copies whose reference is ranked first (``copy_top1``)
and the overlap of the top-10 with exact float search (``recall10_vs_exact``). ``--milvus`` adds Milvus
Lite (fp32 and int8; insert rate and search latency). Writes JSON and prints a Markdown table::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/index-scale.py --n 50000 --out runs/index-scale-50k.json
    .venv/bin/python scripts/index-scale.py --n 1000000 --threads 8 --milvus --out runs/index-scale-1m.json

Synthetic vectors are not photos: they bound speed and memory well, recall only roughly (real
descriptors cluster more, which helps IVF and PQ).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 - run from a checkout too


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, d: int, q: int, copy_cos: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d // 4, d)).astype(np.float32)

    def draw(m):
        out = np.empty((m, d), np.float32)
        for i in range(0, m, 100_000):
            k = min(100_000, m - i)
            out[i: i + k] = unit(rng.standard_normal((k, d // 4)).astype(np.float32) @ basis
                                 + 1.5 * rng.standard_normal((k, d)).astype(np.float32))
        return out

    refs = draw(n)
    src = rng.choice(n, size=q, replace=False)
    sigma = math.tan(math.acos(copy_cos)) / math.sqrt(d)  # noise norm tan(angle): cosine ~ copy_cos
    copies = unit(refs[src] + sigma * rng.standard_normal((q, d)).astype(np.float32))
    return refs, copies, draw(q), src


def timed_search(store, queries: np.ndarray, k: int, single: int) -> dict:
    t0 = time.perf_counter()
    hits = store.search(queries, k)
    batch_s = time.perf_counter() - t0
    lat = []
    for i in range(min(single, len(queries))):
        t = time.perf_counter()
        store.search(queries[i: i + 1], k)
        lat.append((time.perf_counter() - t) * 1e3)
    return {"hits": hits, "batch_qps": round(len(queries) / batch_s, 1),
            "single_ms_p50": round(float(np.percentile(lat, 50)), 3), "single_ms_p99": round(float(np.percentile(lat, 99)), 3)}


def quality(hits, exact_hits, n_copies: int, src) -> dict:
    top1 = np.mean([bool(h) and h[0][0] == f"R{s:07d}" for h, s in zip(hits[:n_copies], src)])
    overlap = np.mean([len({r for r, _ in h} & {r for r, _ in e}) / max(1, len(e)) for h, e in zip(hits, exact_hits)])
    return {"copy_top1": round(float(top1), 4), "recall10_vs_exact": round(float(overlap), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="references")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000, help="copies (and as many distractors)")
    p.add_argument("--copy-cos", type=float, default=0.85)
    p.add_argument("--codes", default="fp32,int8,binary,pq")
    p.add_argument("--no-ivf", action="store_true", help="exhaustive indexes only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--single", type=int, default=200, help="single-query searches timed")
    p.add_argument("--milvus", action="store_true", help="also Milvus Lite (fp32, int8)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import faiss

    from rdcd.validate.index import FaissStore, ivf_plan, new_meta, pq_subquantizers
    from rdcd.validate.search import knn

    faiss.omp_set_num_threads(a.threads)
    t0 = time.perf_counter()
    refs, copies, distractors, src = synthetic(a.n, a.dim, a.queries, a.copy_cos)
    queries = np.concatenate([copies, distractors])
    ids = [f"R{i:07d}" for i in range(a.n)]
    print(f"data: {a.n} x {a.dim} references, {len(queries)} queries in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sims, idx = knn(queries, refs, 10)
    exact = [[(ids[j], float(s)) for s, j in zip(sr, ir)] for sr, ir in zip(sims, idx)]
    nlist = max(1, min(int(round(4 * math.sqrt(a.n))), a.n // 39, 65_536))
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="index-scale-"))
    try:
        for codes in a.codes.split(","):
            variants = ["off"] if a.no_ivf else ([str(nlist)] if codes == "pq" else ["off", str(nlist)])
            for ivf in variants:
                plan = ivf_plan(a.n, codes, ivf)
                meta = new_meta({"sha256": "synthetic", "name": "synthetic"}, a.dim, {}, codes, "stem", plan,
                                pq_subquantizers(a.dim) if codes == "pq" else None)
                t = time.perf_counter()
                store = FaissStore.create(meta, refs)
                store.add(ids, refs)
                build_s = time.perf_counter() - t
                folder = tmp / f"{codes}-{ivf}"
                t = time.perf_counter()
                store.save(folder)
                save_s = time.perf_counter() - t
                size = sum(f.stat().st_size for f in folder.iterdir())
                s = timed_search(store, queries, 10, a.single)
                row = {"backend": "faiss", "codes": codes, "index": meta["faiss"]["index"], "nprobe": (plan or {}).get("nprobe"),
                       "build_s": round(build_s, 2), "save_s": round(save_s, 2), "disk_mb": round(size / 2**20, 1),
                       "bytes_per_ref": meta["bytes_per_reference"], **{k: v for k, v in s.items() if k != "hits"},
                       **quality(s["hits"], exact, a.queries, src)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
                del store
        if a.milvus:
            from rdcd.validate.index_milvus import MilvusStore

            for codes in ("fp32", "int8"):
                meta = new_meta({"sha256": "synthetic", "name": "synthetic"}, a.dim, {}, codes, "stem", None, None,
                                backend="milvus")
                t = time.perf_counter()
                store = MilvusStore.create(meta, str(tmp / f"{codes}.db"), f"scale_{codes}", refs)
                store.add(ids, refs)
                build_s = time.perf_counter() - t
                s = timed_search(store, queries, 10, min(a.single, 50))
                row = {"backend": "milvus-lite", "codes": codes, "index": meta["milvus"]["index_type"], "nprobe": None,
                       "build_s": round(build_s, 2), "insert_per_s": round(a.n / build_s, 1),
                       "disk_mb": round(sum(f.stat().st_size for f in (tmp / f"{codes}.db").rglob("*") if f.is_file()) / 2**20, 1),
                       "bytes_per_ref": meta["bytes_per_reference"], **{k: v for k, v in s.items() if k != "hits"},
                       **quality(s["hits"], exact, a.queries, src)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"tool": "scripts/index-scale.py", "n": a.n, "dim": a.dim, "queries": len(queries), "copies": a.queries,
              "copy_cos": a.copy_cos, "threads": a.threads, "faiss": faiss.__version__,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
              "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    cols = ["backend", "index", "bytes_per_ref", "disk_mb", "build_s", "batch_qps", "single_ms_p50", "copy_top1",
            "recall10_vs_exact"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
