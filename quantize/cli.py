"""``rdcd-quantize``: INT8 artifacts for an export directory, calibrated on real images, judged by µAP.

::

    rdcd-quantize --exports DIR --calib-dir IMAGES [--calib-count 300] [--benchmark BENCH] [--max-drop 0.005]
                  [--method auto|minmax|entropy|percentile] [--engine auto|ort|nncf]
                  [--target onnx,tensorrt,coreml,openvino] [--checkpoint RUN]

Exit codes: 0 every INT8 artifact within --max-drop (or no benchmark given), 1 a drop still exceeds it after
the fallback loop (artifacts are written all the same), 2 bad usage or input.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from rdcd import cli
from rdcd.errors import GateFailed
from rdcd.manifest import DROP_TYPES, TARGETS, Accuracy

LIBRARY_LOG = "quantize-libraries.log"


def build_parser() -> cli.ArgumentParser:
    from rdcd.quantize.api import AccuracyControl, QuantizeRecipe
    from rdcd.quantize.preflight import ENGINE_CHOICES, METHOD_CHOICES, REDUCE_RANGES, drop_fraction

    recipe, acc = QuantizeRecipe(), AccuracyControl(benchmark="")  # the defaults, in one place

    p = cli.ArgumentParser(prog="rdcd-quantize", description=(
        "Add INT8 artifacts (ONNX QDQ for ONNX Runtime and TensorRT, Core ML W8A8/W8, OpenVINO INT8) to an "
        "export directory, calibrated on real images; measure each one's µAP drop on a benchmark and keep the "
        "most sensitive layers in float until the drop is within --max-drop."))
    p.add_argument("--exports", required=True, help="export directory with manifest.json and the FP32 model.onnx")
    p.add_argument("--calib-dir", required=True, help="folder of calibration images (real images, not the benchmark's)")
    p.add_argument("--calib-count", type=cli.positive_int, default=recipe.calib_count,
                   help=f"calibration images to use; fewer readable images is an error (default {recipe.calib_count})")
    p.add_argument("--benchmark", default=None,
                   help="DISC-layout benchmark for µAP; its source images are left out of calibration. "
                        "Without it accuracy is not measured and the fallback loop is off")
    p.add_argument("--max-drop", type=drop_fraction, default=acc.max_drop,
                   help=f"largest allowed µAP drop (default {acc.max_drop}; see --drop-type)")
    p.add_argument("--drop-type", default=acc.drop_type, choices=DROP_TYPES,
                   help=f"--max-drop in µAP points (absolute) or as a share of the FP32 µAP (relative); default "
                        f"{acc.drop_type}")
    p.add_argument("--method", default=recipe.method, choices=METHOD_CHOICES,
                   help="activation calibration; auto tries minmax, then percentile and entropy if the drop is too large")
    p.add_argument("--engine", default=recipe.engine, choices=ENGINE_CHOICES,
                   help="ONNX quantizer; auto = ONNX Runtime (NNCF's QDQ graphs do not fuse into ORT's integer "
                        "kernels: 3-4x slower than FP32 here)")
    p.add_argument("--target", action="append", default=None,
                   help=f"repeatable or comma list of {', '.join(TARGETS)}, all (default: onnx (which brings the "
                        "TensorRT QDQ input too), openvino, and coreml when a checkpoint is known)")
    p.add_argument("--no-tensorrt", action="store_true",
                   help="with --target onnx, skip the TensorRT QDQ input (symmetric int8 activations)")
    p.add_argument("--checkpoint", default=None,
                   help="the student run (needed for Core ML W8A8 and its simulation; default: the manifest's source)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads for evaluation runs (default 2)")
    p.add_argument("--no-fallback", action="store_true", help="do not keep sensitive layers in float")
    p.add_argument("--max-fallback-steps", type=cli.nonnegative_int, default=acc.max_fallback_steps,
                   help="re-quantizations the fallback loop may try per target (1, 2, 4, ... layers in float)")
    p.add_argument("--quantize-tail", action="store_true",
                   help="also quantize the GeM pooling / L2-normalisation tail (kept float by default)")
    p.add_argument("--reduce-range", default=recipe.reduce_range, choices=REDUCE_RANGES,
                   help="7-bit weights in the ONNX Runtime model (ORT's u8s8 kernels saturate on AVX2 CPUs without "
                        "VNNI): on the first conv only, on all layers, none; auto tries first, then all")
    p.add_argument("--no-codes", action="store_true", help="skip the int8/binary descriptor code evaluation")
    p.add_argument("--latency", type=cli.nonnegative_int, default=0, metavar="ITERS",
                   help="also time FP32 vs INT8 ONNX at batch 1 (ITERS runs x 3 rounds)")
    p.add_argument("--library-log", metavar="FILE",
                   help=f"where NNCF's, ONNX Runtime's and Core ML Tools' own logs go (default: EXPORTS/{LIBRARY_LOG}; "
                        "with -v they are printed instead)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging(a.verbose)
    targets = cli.parse_targets(a.target)
    if a.library_log:
        cli.writable_file(a.library_log, "--library-log")
    from rdcd.logs import keep_library_logs, library_log_path
    from rdcd.quantize.api import AccuracyControl, QuantizeRecipe, quantize

    library_log = library_log_path()  # rdcd-demo routes every stage's library logs to one file
    if not a.verbose and (a.library_log or (library_log is None and Path(a.exports).is_dir())):
        # NNCF / ONNX Runtime / Core ML Tools logs in a file; rdcd's own warnings stay on the console
        library_log = keep_library_logs(a.library_log or Path(a.exports) / LIBRARY_LOG)

    command = "rdcd-quantize " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    recipe = QuantizeRecipe(method=a.method, engine=a.engine, reduce_range=a.reduce_range,
                            keep_tail_float=not a.quantize_tail, calib_count=a.calib_count)
    accuracy = AccuracyControl(a.benchmark, a.max_drop, a.drop_type, a.max_fallback_steps,
                               fallback=not a.no_fallback) if a.benchmark else None
    result = quantize(a.exports, a.calib_dir, targets=targets, recipe=recipe, accuracy=accuracy, checkpoint=a.checkpoint,
                    threads=a.threads, codes=not a.no_codes, latency_iters=a.latency, command=command,
                    raise_on_drop=False, with_tensorrt=not a.no_tensorrt)
    arts = result.artifacts
    print_summary(result, a.exports, a.max_drop)  # the calibration summary is logged once by quantize()
    if library_log is not None:
        print(f"library logs (NNCF, ONNX Runtime, Core ML Tools, warnings): {library_log}")
    failed = [x for x in arts if x.accuracy is not None and x.accuracy.over(a.max_drop)]
    if failed:
        raise GateFailed(f"µAP drop above --max-drop {a.max_drop} ({a.drop_type}) after fallback: "
                         + ", ".join(f"{x.name} {x.accuracy.drop:+.4f}" for x in failed))
    return 0


def _drop_text(acc: Accuracy) -> str:
    ci = acc.drop_ci95
    return f"{acc.drop:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def print_summary(result, export_dir, max_drop: float) -> None:
    """The INT8 rows of a :class:`~rdcd.quantize.api.QuantizeResult` as a table, with its index codes and latency."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"INT8 artifacts in {export_dir}", show_lines=False)
    for col in ("artifact", "path", "µAP FP32", "µAP INT8", "drop [95% CI]", "measured with", "float layers", "status"):
        t.add_column(col)
    for x in result.artifacts:
        acc = x.accuracy
        ok = acc is None or not acc.over(max_drop)
        mark = ("✅" if x.status == "ok" else "❎") if ok else "❌"
        t.add_row(x.name, x.path, f"{acc.fp32_micro_ap:.4f}" if acc else "-",
                  f"{acc.micro_ap:.4f}" if acc else "-", _drop_text(acc) if acc else "-",
                  ((acc.runtime or "")[:40] + (" (sim)" if acc.simulated else "")) if acc else "not measured",
                  str(len(x.fallback_layers or [])), f"{mark} {x.status}")
    console = Console(width=160)
    console.print(t)
    data = result.report
    if data.get("codes"):
        ct = Table(title="Reference-index codes")
        for col in ("code", "bytes/image", "codes of 1M images (MB)", "µAP", "drop"):
            ct.add_column(col)
        for r in data["codes"]:
            ct.add_row(r["code"], str(r["bytes_per_image"]), str(r["index_1m_mb"]), f"{r['micro_ap']:.4f}",
                       f"{r['drop']:+.4f}")
        console.print(ct)
    if data.get("latency"):
        lat = data["latency"]
        console.print(f"latency (batch 1, {lat['threads']} threads, p50 best/median of rounds): "
                      f"FP32 {lat['fp32']['p50_ms_best']}/{lat['fp32']['p50_ms_median']} ms, "
                      f"INT8 {lat['int8']['p50_ms_best']}/{lat['int8']['p50_ms_median']} ms")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
