"""The INT8 accuracy gate: ``rdcd-validate [gate] --benchmark B --exports DIR [--max-drop 0.005]``.

Every artifact of an export directory (its ``manifest.json``) is run on a DISC-layout benchmark with
its own runtime: µAP, R@P90 and acc@1 (ISC2021 rules), Δ µAP against its FP32 reference
(``"reference"`` in the manifest), file size, and latency p50/p90/p99 + throughput at batch 1. Each
row ends ✅ (checked), ❎ (not checkable here, with the reason: never a pass) or ❌ (failed, with the
reason). Exit codes:

* 1 when an INT8-class artifact (precision int8 / w8a8 / w8) loses more µAP than ``--max-drop``
  (default 0.005, the project's one budget; absolute, or relative with ``--drop-type relative``), when
  an artifact fails to run, when a ``--require TARGET`` has no checked artifact, or when the manifest
  has no INT8-class artifact at all ("nothing to gate", unless ``--allow-empty``);
* 2 on bad usage or input (no manifest, malformed manifest, missing benchmark, bad bench JSON);
* 0 otherwise.

Core ML cannot run off macOS: when the quantize stage recorded W8A8/W8 µAP *simulated in PyTorch*
(``"accuracy"`` block with ``simulated: true``) on the same benchmark (ground-truth sha256), the row
shows those numbers labelled "simulated in PyTorch" and is still ❎ (the runtime itself was not
checked); a simulated drop over the gate is ❌. Keys read from that block: ``simulated``, ``micro_ap``,
``fp32_micro_ap``, ``ground_truth_sha256``, ``benchmark`` (path), ``runtime``, optionally ``recall_at_p90`` and ``acc_at_1``. ``--bench-json`` merges ``rdcd-bench`` results from
devices (a Jetson, a Mac) as extra latency columns; ``rdcd-validate merge`` does the same for an
existing ``report.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from rdcd import cli
from rdcd.errors import GateFailed, RdcdError
from rdcd.manifest import DROP_TYPES, MAX_DROP, TARGETS, Manifest
from rdcd.validate.gate_rows import evaluate_manifest


# ----------------------------------------------------------------------------------------- arguments
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="rdcd-validate gate",
        description="Evaluate every artifact of an export directory on a DISC-layout benchmark (µAP, R@P90, "
                    "Δ vs FP32, size, latency) and fail (exit 1) when an INT8 artifact loses too much µAP.")
    p.add_argument("--benchmark", required=True, help="DISC-layout benchmark folder (references/, queries/, ground_truth.csv)")
    p.add_argument("--exports", required=True, help="export directory with manifest.json (rdcd-export / rdcd-quantize)")
    d = GateConfig()  # the defaults, in one place
    p.add_argument("--max-drop", type=float, default=d.max_drop,
                   help=f"largest allowed µAP drop of an INT8 artifact (default {d.max_drop})")
    p.add_argument("--drop-type", choices=DROP_TYPES, default=d.drop_type,
                   help=f"absolute: fp32 - int8 µAP; relative: (fp32 - int8) / fp32 (default {d.drop_type})")
    p.add_argument("--require", action="append", default=[], choices=TARGETS, metavar="TARGET",
                   help=f"a target ({', '.join(TARGETS)}) that must be checked here: not checkable = failure (repeatable)")
    p.add_argument("--allow-empty", action="store_true",
                   help="exit 0 when the manifest has no INT8 artifact (default: 'nothing to gate', exit 1)")
    p.add_argument("--report", default=None, metavar="OUT",
                   help="write OUT/report.md, OUT/report.json, OUT/pr_curve.png, OUT/latency.png")
    p.add_argument("--bench-json", action="append", default=[], metavar="FILE",
                   help="rdcd-bench results from a device, merged as a latency column (repeatable)")
    p.add_argument("--k", type=cli.positive_int, default=d.k, help=f"neighbours per query (ISC2021: {d.k})")
    p.add_argument("--whiten", action="store_true", help="PCA-whitening fitted on the benchmark's training/")
    p.add_argument("--score-norm", default=None, help="e.g. 1.0[0,2]: SSCD score normalisation on training/")
    p.add_argument("--batch-size", type=cli.positive_int, default=d.batch_size, help="batch size for descriptor extraction")
    p.add_argument("--threads", type=cli.positive_int, default=d.threads, help=f"CPU threads per runtime (default {d.threads})")
    p.add_argument("--latency-iters", type=cli.positive_int, default=d.latency_iters,
                   help=f"timed batch-1 calls per artifact (default {d.latency_iters})")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=d.warmup,
                   help=f"untimed calls before timing (default {d.warmup})")
    return p


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The gate's settings (``rdcd-validate gate``'s options): the INT8 µAP budget (``drop_type`` absolute: µAP
    points; relative: a share of the FP32 µAP), targets that must be checkable here, the ISC2021 ``k``,
    optional whitening / score normalisation on the benchmark's training/, extraction and latency settings,
    device bench JSONs to merge and the report folder."""

    max_drop: float = MAX_DROP
    drop_type: str = "absolute"
    require: tuple[str, ...] = ()
    allow_empty: bool = False
    k: int = 10
    whiten: bool = False
    score_norm: str | None = None
    batch_size: int = 32
    threads: int = 2
    latency_iters: int = 100
    warmup: int = 10
    bench_json: tuple[str, ...] = ()
    report: str | None = None


def gate(benchmark: str | os.PathLike, exports: str | os.PathLike, config: GateConfig | None = None) -> dict:
    """Evaluate every artifact of the export folder ``exports`` on ``benchmark``; print the table, write the
    report (``config.report``) and return it. Raises :class:`GateFailed` (exit 1) when an INT8 artifact loses
    more µAP than allowed (or a required target is not checkable), :class:`RdcdError` on bad input."""
    from rdcd.benchmark import load_benchmark
    from rdcd.manifest import now
    from rdcd.validate import report as rep
    from rdcd.validate.device import device_info, load_average
    from rdcd.validate.gate_checks import check_gate_inputs

    cfg = config or GateConfig()
    manifest = Manifest.load(exports)  # the one manifest check (rdcd.manifest.validate)
    if not manifest.artifacts:
        raise RdcdError(f"{manifest.path} lists no artifacts: nothing to validate")
    bench = load_benchmark(benchmark)
    devices = check_gate_inputs(cfg, manifest)  # before minutes of evaluation: outputs, bench JSONs, INT8 rows
    t0 = time.perf_counter()
    result = evaluate_manifest(bench, manifest, cfg)
    report = {
        "schema": rep.SCHEMA, "tool": "rdcd-validate gate", "created": now(),
        "benchmark": {"path": str(bench.root), "ground_truth": str(bench.gt_path), "ground_truth_sha256": result["gt_sha256"],
                      **bench.summary()},
        "exports": {"path": str(manifest.dir), "source": manifest.source.to_dict(),
                    "rdcd_version": manifest.rdcd_version},
        "settings": {"max_drop": cfg.max_drop, "drop_type": cfg.drop_type, "require": list(cfg.require), "k": cfg.k,
                     "whiten": cfg.whiten, "score_norm": cfg.score_norm, "threads": cfg.threads,
                     "latency_iters": cfg.latency_iters, "warmup": cfg.warmup, "batch_size": cfg.batch_size},
        "host": {**device_info(), "load_avg_1m_at_start": load_average()},
        "gate": {"passed": result["passed"], "failures": result["failures"], "counts": result["counts"],
                 "int8_artifacts": result["int8_artifacts"], "int8_checked": result["int8_checked"]},
        "artifacts": result["rows"], "devices": [],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for d in devices:
        rep.merge_device(report, d)
    rep.print_table(report)
    if cfg.report:
        written = rep.write_report(report, cfg.report)
        print(f"report: {', '.join(str(p) for p in written)}")
    if not report["gate"]["passed"]:
        raise GateFailed("gate failed: " + "; ".join(report["gate"]["failures"]))
    return report


# -------------------------------------------------------------------------------------------- mains
def gate_main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(GateConfig)}
    cfg = GateConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(a).items() if k in fields})
    gate(a.benchmark, a.exports, cfg)
    return 0


def merge_main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="rdcd-validate merge",
                           description="Merge rdcd-bench JSON files from devices into an existing gate report "
                                       "(device latency columns) and re-render report.md and latency.png.")
    p.add_argument("--report", required=True, metavar="OUT", help="report folder (with report.json) or report.json")
    p.add_argument("--bench-json", action="append", required=True, metavar="FILE", help="rdcd-bench result (repeatable)")
    a = p.parse_args(argv)
    from rdcd.validate import report as rep

    out, report = rep.load_report(a.report)
    rep.require_plotting()
    cli.writable_dir(out, "--report", clean=True)
    devices = [rep.load_bench_json(f) for f in a.bench_json]
    for d in devices:
        rep.merge_device(report, d)
    rep.print_table(report)
    written = rep.write_report(report, out)
    print(f"merged {len(devices)} bench file(s); report: {', '.join(str(p) for p in written)}")
    return 0
