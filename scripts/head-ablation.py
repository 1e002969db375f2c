#!/usr/bin/env python
"""Head-stage ablation on a feature cache (docs/reports/distill.md): train the same random heads with
different losses / data and score each on one or more benchmarks, in seconds per setting.

    .venv/bin/python scripts/head-ablation.py --cache runs/cache --size 160 \\
        --benchmark runs/demo/bench --benchmark runs/bench-photos [--keys pool|photos|all] \\
        '{"mode": "rdcd"}' '{"mode": "contrastive"}' '{"mode": "rdcd", "hn_weight": 5}'

Each JSON argument holds rdcd.distill.heads.HeadConfig fields. The benchmark images go through the frozen
backbone once (cached next to the feature cache), then through each trained pair of heads: exactly what
the exported student computes.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rdcd.benchmark import load_benchmark
from rdcd.distill.heads import HeadConfig, HeadTrainer
from rdcd.model import StudentConfig, build_student
from rdcd.preprocess import to_float_nchw
from rdcd.validate.evaluate import Descriptors, evaluate_descriptors
from rdcd.validate.extract import extract


def _cache_arrays(cache: str, size: int, keys_from: str, pool_dir: str):
    def meta(d):
        return json.loads(Path(d, "index.json").read_text())

    bdir = next(d for d in glob.glob(f"{cache}/backbone-*") if meta(d)["fingerprint"]["input_size"] == size)
    views = meta(bdir)["views"]
    tdir = next(d for d in glob.glob(f"{cache}/teacher-*") if meta(d)["views"] == views)
    ti, bi = meta(tdir)["rows"], meta(bdir)["rows"]
    keys = [k for k in bi if k in ti]
    if keys_from != "all":
        pool = set(os.listdir(pool_dir))
        keys = [k for k in keys if (k.split(":")[0] in pool) == (keys_from == "pool")]
    T = np.load(f"{tdir}/feats.npy")[[ti[k] for k in keys]]
    G = np.load(f"{bdir}/feats.npy")[[bi[k] for k in keys]]
    return G, T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--size", type=int, required=True, help="student input size of the cached backbone features")
    p.add_argument("--benchmark", action="append", required=True)
    p.add_argument("--keys", choices=("all", "pool", "photos"), default="all",
                   help="train on every cached image, or only those of --pool-dir, or only the others")
    p.add_argument("--pool-dir", default="../shared/data/train-pool")
    p.add_argument("settings", nargs="+", help="JSON objects of HeadConfig fields")
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    st = build_student(StudentConfig(dim=128, input_size=a.size), pretrained=True).eval()
    spec = st.config.preprocess()

    def gem(batch):
        with torch.no_grad():
            x = to_float_nchw(torch.from_numpy(np.ascontiguousarray(batch)))
            return st.pooled(x).numpy()

    benches = []
    for b in a.benchmark:
        bench = load_benchmark(b)
        cached = Path(a.cache) / f"bench-gem-{Path(b).name}-{a.size}.npz"
        if cached.exists():
            z = np.load(cached)
            gq, gr = z["q"], z["r"]
        else:
            gq, _ = extract(gem, bench.queries.paths, spec, 32, "queries")
            gr, _ = extract(gem, bench.references.paths, spec, 32, "references")
            np.savez(cached, q=gq, r=gr)
        benches.append((Path(b).name, bench, gq, gr))

    def score(student) -> dict:
        out = {}
        with torch.no_grad():
            def desc(g):
                return F.normalize(student.projector(student.fc(torch.from_numpy(g).float())), dim=1).numpy()

            for name, bench, gq, gr in benches:
                d = Descriptors(bench.queries.ids, desc(gq), bench.references.ids, desc(gr), None)
                out[name] = round(evaluate_descriptors(bench, d).row()["micro_ap"], 4)
        return out

    G, T = _cache_arrays(a.cache, a.size, a.keys, a.pool_dir)
    print(json.dumps({"setting": "untrained", "images": len(G), "views": G.shape[1], **score(st)}), flush=True)
    for setting in a.settings:
        kw = json.loads(setting)
        s2 = copy.deepcopy(st)
        t0 = time.time()
        HeadTrainer(s2, G, T, HeadConfig(**kw)).run(log_every=10 ** 9)
        print(json.dumps({"setting": kw, **score(s2), "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
