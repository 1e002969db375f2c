#!/usr/bin/env python
"""Scale benchmark of ``rdcd-index``: 1M references per model, real descriptors plus planted copies.

For each ``--model NAME=SPEC`` (an exported artifact, or ``teacher`` for the offline SSCD ONNX) the
reference set is, in this order:

* the benchmark's references (``--bench``, DISC2021 layout: its queries are the planted edited copies,
  its ground truth the planted pairs, scored by micro-AP),
* every image of ``--extra`` folders not used by the benchmark (its ``sources.csv``), as real distractors,
* synthetic descriptors up to ``--n``, drawn from the real reference descriptors of that model
  (``synthetic_like``): by default a Gaussian mixture - their k-means centroids (``--clusters`` 256) plus the
  shared within-cluster covariance; ``--clusters 1``: one Gaussian with their mean and covariance - then
  L2-normalised.

Each index (fp32 / int8 / binary / IVF-PQ, exhaustive and IVF as ``rdcd-index`` builds them through
:class:`rdcd.validate.index.FaissStore`) is built in a fresh process (build seconds, peak RSS), saved, and
searched in another fresh process that loads it as ``rdcd-index search`` does (RSS of the interpreter,
of the loaded index, peak), timing single queries (p50/p99) and batches of 64 (p50/p99 per query),
IVF at several ``nprobe``; recall@10 is the overlap with exact fp32 search on the same 1M references,
``pair_recall_vs_exact`` the share of the true pairs in exact search's top-10 that the index also
returns, ``micro_ap`` scores the top-10 of every benchmark query. Descriptors are cached under ``--work``::

    .venv/bin/python scripts/index-scale.py --bench runs/demo/bench \\
        --extra ../shared/data/train-pool --extra ../shared/data/train-photos \\
        --model teacher=teacher --model s128=runs/demo/export/model.onnx --model s64=runs/scale/export64/model.onnx \\
        --n 1000000 --threads 2 --work runs/scale --out runs/scale/index-scale-1m.json
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402 - run from a checkout too

#: (codes, ivf) per index; ``None``: exhaustive, ``"ivf"``: nlist = 4 sqrt(N) as ``--ivf auto``
CONFIGS = (("fp32", None), ("fp32", "ivf"), ("int8", None), ("int8", "ivf"), ("binary", None), ("binary", "ivf"),
           ("pq", "ivf"))
NPROBES = (16, 32, 64, 128, 256, 512, 1024)


def rss_mb() -> dict:
    """VmRSS and VmHWM (peak) of this process, MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


# ------------------------------------------------------------------------------------------ descriptors
def benchmark_sources(bench: Path) -> set[str]:
    with open(bench / "sources.csv", newline="", encoding="utf-8") as fh:
        return {str(Path(r["source"]).resolve()) for r in csv.DictReader(fh) if r.get("source")}


def describe_all(name: str, spec: str, bench: Path, extra: list[str], work: Path, threads: int) -> Path:
    """``work/desc-NAME.npz``: benchmark references and queries, extra real references (cached)."""
    out = work / f"desc-{name}.npz"
    if out.is_file():
        return out
    from rdcd.benchmark import load_benchmark
    from rdcd.imageio import list_images
    from rdcd.validate.extract import extract
    from rdcd.validate.models import resolve_model

    b = load_benchmark(bench)
    used = benchmark_sources(bench)
    extras = [p for d in extra for p in list_images(d) if str(Path(p).resolve()) not in used]
    emb, pspec, label = resolve_model(spec, threads=threads)
    arrays = {}
    for part, split in (("refs", b.references), ("queries", b.queries), ("extra", None)):
        paths, names = (split.paths, split.ids) if split else (extras, [Path(x).stem for x in extras])
        t = time.perf_counter()
        vecs, kept = extract(emb, paths, pspec, batch_size=32, description=f"{name} {part}", skip_bad=True)
        arrays[part] = vecs.astype(np.float32)
        arrays[f"{part}_ids"] = np.asarray([names[i] for i in kept])
        print(f"{name} {part}: {len(kept)} images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    arrays["gt"] = np.asarray(b.gt_pairs, dtype=str)
    np.savez(out, label=label, **arrays)
    return out


def synthetic_like(real: np.ndarray, n: int, clusters: int = 1, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors drawn like ``real``: ``clusters`` = 1, the Gaussian with its mean and full covariance;
    K > 1, a Gaussian mixture - a k-means centroid of ``real`` (picked as often as its cluster is populated)
    plus a residual from the within-cluster covariance shared by all clusters - which keeps the clusters real
    collections have (same subjects, sources, near-duplicates). Normalised like descriptors; 100k per chunk."""
    import faiss

    rng = np.random.default_rng(seed)
    d = real.shape[1]
    if clusters > 1:
        km = faiss.Kmeans(d, clusters, niter=20, seed=seed, spherical=True)
        km.train(np.ascontiguousarray(real, np.float32))
        _, assign = km.index.search(np.ascontiguousarray(real, np.float32), 1)
        centres, assign = km.centroids, assign[:, 0]
        weights = np.bincount(assign, minlength=clusters) / len(real)
        resid = real - centres[assign]
    else:
        centres, weights, resid = real.mean(axis=0, keepdims=True), np.ones(1), real - real.mean(axis=0)
    cov = resid.T @ resid / max(1, len(real) - len(centres)) + 1e-6 * np.eye(d)
    chol = np.linalg.cholesky(cov).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 100_000):
        k = min(100_000, n - i)
        x = rng.standard_normal((k, d)).astype(np.float32) @ chol.T + centres[rng.choice(len(centres), k, p=weights)]
        out[i:i + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# ------------------------------------------------------------------------------------------ children
def child_build(meta: dict, refs_path: str, ids_path: str, folder: str, threads: int) -> dict:
    import faiss

    from rdcd.validate.index import FaissStore

    faiss.omp_set_num_threads(threads)
    refs = np.load(refs_path)
    ids = [str(i) for i in np.load(ids_path)]
    t = time.perf_counter()
    store = FaissStore.create(meta, refs)
    store.add(ids, refs)
    build_s = time.perf_counter() - t
    store.save(folder)
    return {"build_s": round(build_s, 1), "build_peak_rss_mb": rss_mb()["VmHWM"],
            "index": store.meta["faiss"]["index"], "nprobe_default": (meta.get("ivf") or {}).get("nprobe")}


def child_search(folder: str, queries_path: str, threads: int, nprobes: list[int | None]) -> dict:
    import faiss

    from rdcd.validate.index import open_store

    faiss.omp_set_num_threads(threads)
    queries = np.load(queries_path)
    before = rss_mb()["VmRSS"]
    store = open_store(folder)
    loaded = rss_mb()["VmRSS"]
    out = {"rss_base_mb": before, "rss_loaded_mb": loaded, "index_resident_mb": round(loaded - before, 1), "runs": []}
    for nprobe in nprobes:
        store.search(queries[:64], 10, nprobe)  # warm-up
        single = []
        for i in range(min(200, len(queries))):
            t = time.perf_counter()
            store.search(queries[i:i + 1], 10, nprobe)
            single.append((time.perf_counter() - t) * 1e3)
        batch, hits = [], []
        for i in range(0, len(queries), 64):
            t = time.perf_counter()
            hits += store.search(queries[i:i + 64], 10, nprobe)
            batch.append((time.perf_counter() - t) * 1e3 / len(queries[i:i + 64]))
        out["runs"].append({"nprobe": nprobe, "b1_p50_ms": round(float(np.percentile(single, 50)), 3),
                            "b1_p99_ms": round(float(np.percentile(single, 99)), 3),
                            "b64_p50_ms_per_q": round(float(np.percentile(batch, 50)), 3),
                            "b64_p99_ms_per_q": round(float(np.percentile(batch, 99)), 3), "hits": hits})
    out["peak_rss_mb"] = rss_mb()["VmHWM"]
    return out


def in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# ------------------------------------------------------------------------------------------ scoring
def micro_ap(hits, query_ids, gt) -> float:
    from rdcd.validate.metrics import Predictions, evaluate

    rows = [(q, r, s) for q, row in zip(query_ids, hits) for r, s in row]
    return round(evaluate(Predictions.from_rows(rows), [tuple(p) for p in gt]).micro_ap, 4)


def exact_top10(queries: np.ndarray, refs: np.ndarray, ids) -> list[list[tuple[str, float]]]:
    """Exact float top-10 of every query, as (reference id, score) like an index's hits."""
    from rdcd.validate.search import knn

    sims, idx = knn(queries, refs, 10)
    return [[(str(ids[j]), float(s)) for s, j in zip(sr, ir)] for sr, ir in zip(sims, idx)]


def recall10(hits, exact) -> float:
    return round(float(np.mean([len({r for r, _ in h} & set(e)) / max(1, len(e)) for h, e in zip(hits, exact)])), 4)


def pair_recall(hits, exact, query_ids, gt) -> float:
    """Of the true pairs exact search ranks in its top-10, the share the index also returns."""
    true = {(q, r) for q, r in gt}
    want = [(q, r) for q, e in zip(query_ids, exact) for r in e if (q, r) in true]
    got = {(q, r) for q, h in zip(query_ids, hits) for r, _ in h}
    return round(sum(p in got for p in want) / max(1, len(want)), 4)


def run_model(name: str, desc: Path, n: int, threads: int, tmp: Path, configs, clusters: int) -> list[dict]:
    from rdcd.validate.index import default_nlist, ivf_plan, new_meta, pq_subquantizers

    d = np.load(desc)
    real = np.concatenate([d["refs"], d["extra"]])
    ids = np.concatenate([d["refs_ids"], np.asarray([f"X{i:07d}" for i in range(len(d["extra"]))])])
    synth = synthetic_like(real, max(0, n - len(real)), clusters)
    refs = np.concatenate([real, synth])
    ids = np.concatenate([ids, np.asarray([f"S{i:07d}" for i in range(len(synth))])])
    dim, queries, qids, gt = refs.shape[1], d["queries"], list(d["queries_ids"]), d["gt"]
    np.save(tmp / "refs.npy", refs), np.save(tmp / "ids.npy", ids), np.save(tmp / "queries.npy", queries)
    t = time.perf_counter()
    exact_hits = exact_top10(queries, refs, ids)
    exact_s = time.perf_counter() - t
    exact = [[r for r, _ in h] for h in exact_hits]
    base = {"model": name, "label": str(d["label"]), "dim": dim, "n": len(refs), "real_refs": len(real),
            "synthetic": "gaussian" if clusters <= 1 else f"mixture{clusters}",
            "bench_refs": len(d["refs"]), "queries": len(queries), "true_pairs": len(gt),
            "micro_ap_exact_1m": micro_ap(exact_hits, qids, gt),
            "micro_ap_bench_only": micro_ap(exact_top10(queries, d["refs"], d["refs_ids"]), qids, gt),
            "micro_ap_real_only": micro_ap(exact_top10(queries, real, ids[:len(real)]), qids, gt),
            "exact_numpy_faiss_s": round(exact_s, 1)}
    print(json.dumps(base), file=sys.stderr)
    del refs, synth, real
    rows = []
    for codes, ivf in configs:
        plan = ivf_plan(n, codes, str(default_nlist(n)) if ivf else "off")
        meta = new_meta({"sha256": f"scale-{name}", "name": name}, dim, {}, codes, "stem", plan,
                        pq_subquantizers(dim) if codes == "pq" else None)
        folder = tmp / f"{name}-{codes}-{ivf or 'flat'}"
        built = in_child(child_build, meta, str(tmp / "refs.npy"), str(tmp / "ids.npy"), str(folder), threads)
        disk = sum(f.stat().st_size for f in folder.iterdir())
        nprobes = [p for p in NPROBES if p <= plan["nlist"]] if plan else [None]
        res = in_child(child_search, str(folder), str(tmp / "queries.npy"), threads, nprobes)
        shutil.rmtree(folder, ignore_errors=True)
        for r in res["runs"]:
            row = {**base, "codes": codes, **built, "bytes_per_ref": meta["bytes_per_reference"],
                   "disk_mb": round(disk / 2**20, 1), **{k: v for k, v in res.items() if k != "runs"},
                   **{k: v for k, v in r.items() if k != "hits"},
                   "recall10_vs_exact": recall10(r["hits"], exact),
                   "pair_recall_vs_exact": pair_recall(r["hits"], exact, qids, gt), "micro_ap": micro_ap(r["hits"], qids, gt)}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "index", "nprobe", "disk_mb", "index_resident_mb",
                                                  "build_s", "b1_p50_ms", "b64_p50_ms_per_q", "recall10_vs_exact",
                                                  "pair_recall_vs_exact", "micro_ap")}), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="DISC2021-layout benchmark: planted copies and their pairs")
    p.add_argument("--extra", action="append", default=[], help="folders of real distractor reference images")
    p.add_argument("--model", action="append", required=True, help="NAME=SPEC (artifact path, or 'teacher')")
    p.add_argument("--n", type=int, default=1_000_000, help="references per model")
    p.add_argument("--codes", default=",".join(f"{c}:{i or 'flat'}" for c, i in CONFIGS),
                   help="codes:flat|ivf list (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clusters", type=int, default=256,
                   help="synthetic references: Gaussian mixture of K clusters fitted to the real ones (1: one Gaussian)")
    p.add_argument("--work", required=True, help="folder for the descriptor caches")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import faiss

    configs = [(c, None if i == "flat" else i) for c, i in (s.split(":") for s in a.codes.split(","))]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    record = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    for spec in a.model:
        name, _, model = spec.partition("=")
        desc = describe_all(name, model, Path(a.bench), a.extra, work, a.threads)
        tmp = work / f"tmp-{name}"
        tmp.mkdir(exist_ok=True)
        try:
            rows = run_model(name, desc, a.n, a.threads, tmp, configs, a.clusters)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        label = "gaussian" if a.clusters <= 1 else f"mixture{a.clusters}"
        record["rows"] = [r for r in record["rows"] if (r["model"], r.get("synthetic")) != (name, label)] + rows
        record.update(tool="scripts/index-scale.py", n=a.n, threads=a.threads, faiss=faiss.__version__,
                      host={"machine": platform.machine(), "cpus": os.cpu_count()},
                      synthetic="gaussian: one Gaussian with the real references' mean and covariance; mixtureK: "
                                "k-means centroids of the real references plus the shared within-cluster "
                                "covariance; L2-normalised")
        out.write_text(json.dumps(record, indent=1) + "\n")  # after each model: a long run keeps what it measured
    cols = ["model", "synthetic", "index", "nprobe", "bytes_per_ref", "disk_mb", "index_resident_mb", "peak_rss_mb", "build_s",
            "b1_p50_ms", "b1_p99_ms", "b64_p50_ms_per_q", "b64_p99_ms_per_q", "recall10_vs_exact", "pair_recall_vs_exact", "micro_ap"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in record["rows"]:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
