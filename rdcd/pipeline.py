"""``rdcd-demo``: the main job, end to end on a built-in default (small, CPU, minutes).

1. build the demo benchmark (held-out training-pool images when the pool is there, else scikit-image photos);
2. evaluate the baselines on it: the offline SSCD teacher, PDQ, and the untrained student;
3. print the µAP table and write it to ``runs/demo/summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from rdcd import cli

log = logging.getLogger("rdcd.demo")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POOL = REPO.parent / "shared" / "data" / "train-pool"


def _table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "dim", "µAP", "R@P90", "acc@1", "seconds"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], str(r["dim"]), f"{r['micro_ap']:.4f}", f"{r['recall_at_p90']:.4f}",
                  f"{r['acc_at_1']:.4f}", f"{r['seconds']:.1f}")
    Console(width=110).print(t)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(prog="rdcd-demo", description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    p.add_argument("--train-dir", default=str(DEFAULT_POOL), help="unlabeled training images (default: ../shared/data/train-pool)")
    p.add_argument("--holdout", type=int, default=600, help="images of the pool held out for the benchmark")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args(argv)
    cli.setup_logging()
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.demo import DemoConfig, build_demo
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.models import resolve_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pool = Path(a.train_dir)
    if pool.is_dir():
        bench_dir = build_demo(out / "bench", DemoConfig(source=str(pool), holdout=a.holdout))
    else:
        log.warning("training pool %s not found: using the scikit-image demo benchmark", pool)
        bench_dir = build_demo(out / "bench-skimage", DemoConfig(source="skimage"))
    bench = load_benchmark(bench_dir)
    log.info("benchmark %s: %s", bench_dir, bench.summary())
    rows = []
    for spec in ("teacher", "pdq", f"student:{a.backbone}:{a.dim}"):
        emb, pspec, label = resolve_model(spec, size=a.size if spec.startswith("student") else None)
        desc = describe(bench, emb, pspec, label=label)
        res = evaluate_descriptors(bench, desc)
        rows.append({"model": label, **res.row(), "seconds": desc.seconds})
    _table(rows, f"Copy detection on {bench_dir} ({bench.summary()['queries']} queries)")
    summary = {"benchmark": str(bench_dir), "benchmark_summary": bench.summary(), "baselines": rows,
               "wall_seconds": round(time.time() - t0, 1)}
    from rdcd.fsutil import write_json

    write_json(out / "summary.json", summary)
    print(f"summary written to {out / 'summary.json'} ({summary['wall_seconds']} s)")
    return 0
