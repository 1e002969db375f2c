"""``rdcd-export``: turn a trained student (or a teacher, for comparison) into deployable models.

    rdcd-export --checkpoint runs/rdcd-lite0-128 --target all --out exports/lite0-128

Writes ONNX, Core ML, OpenVINO and TensorRT artifacts (see :mod:`rdcd.export.api` for the layout)
described in ``OUT/manifest.json``, checks each one that can run here against the PyTorch model on
real photos, and prints a summary: ✅ exported+checked, ❎ exported but not checkable here,
❌ failed. Exit 0 when every artifact is ✅ or ❎, 1 when a check or an export failed, 2 on bad
usage or input.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from rdcd.cli import ArgumentParser, parse_targets, positive_int, run, setup_logging, writable_dir
from rdcd.manifest import TARGETS
from rdcd.errors import RdcdError

log = logging.getLogger("rdcd.export")

EPILOG = """targets: onnx (uint8 NHWC 'image' -> 'descriptor', dynamic batch), coreml (mlprogram .mlpackage,
iOS 16+, FP16), openvino (IR, fp32 + fp16 weights), tensorrt (trtexec build script + ONNX inputs;
engines only where an NVIDIA GPU and TensorRT are present), all (default).
exit status: 0 all artifacts exported (checked or not checkable here), 1 a check or export failed,
2 bad usage or input."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="rdcd-export", description="Export an RDCD student (or a teacher) to ONNX, Core ML, "
                       "OpenVINO and TensorRT, check parity on real images, and describe it all in manifest.json.",
                       epilog=EPILOG, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="RUN",
                     help="training run directory or its model.safetensors (default: the newest run under ./runs)")
    src.add_argument("--teacher", metavar="SPEC",
                     help="export a teacher instead: a TorchScript file (Meta's sscd_disc_mixup.torchscript.pt), "
                          "timm:<name>, or sscd-onnx (recorded by reference only: its licence forbids repackaging)")
    p.add_argument("--target", action="append", metavar="T",
                   help="onnx, coreml, openvino, tensorrt or all; repeat it or give a comma list (default: all)")
    p.add_argument("--list-targets", action="store_true",
                   help="print each target's runtime, precisions and whether it can be exported and run here, then exit")
    p.add_argument("--out", metavar="DIR", help="export directory (default: exports/<run name>)")
    p.add_argument("--size", type=positive_int, metavar="PX", help="input size override (default: the run's input size; "
                   "teachers: 288 for SSCD, 224 for timm:<name>)")
    from rdcd.export.api import Options
    from rdcd.export.coreml import PRECISIONS as COREML_PRECISIONS
    from rdcd.quantize.api import QuantizeRecipe

    d = Options()  # the defaults, in one place
    p.add_argument("--precision", choices=COREML_PRECISIONS, default=d.coreml_precision,
                   help=f"Core ML compute precision (default {d.coreml_precision})")
    p.add_argument("--trt-max-batch", type=positive_int, default=d.batch, metavar="N",
                   help=f"TensorRT engine profile: batch 1..N, optimised for N (default {d.batch})")
    hidden = __import__("argparse").SUPPRESS  # old spellings, still accepted
    p.add_argument("--batch", dest="trt_max_batch", type=positive_int, default=hidden, help=hidden)
    p.add_argument("--parity-images", metavar="DIR", help="images for the parity checks (default: the photos "
                   "scikit-image ships); at most 32, by name")
    p.add_argument("--whiten-on", metavar="DIR",
                   help="fold a PCA-whitening fitted on these unlabelled images (e.g. your reference collection) into "
                        "the exported projector; the folder's hash goes into the manifest (students only)")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 through the quantize stage "
                   "(rdcd.quantize.quantize)")
    p.add_argument("--calib-dir", metavar="DIR", dest="calib", help="calibration images for --int8 (required with it)")
    p.add_argument("--calib", dest="calib", default=hidden, help=hidden)
    p.add_argument("--calib-count", type=positive_int, default=None, metavar="N",
                   help=f"calibration images for --int8 (default: rdcd-quantize's, {QuantizeRecipe().calib_count})")
    p.add_argument("--threads", type=positive_int, default=d.threads, metavar="N",
                   help=f"CPU threads for the parity runs (default {d.threads})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _validate(args, parser) -> None:
    if args.size is not None and not 32 <= args.size <= 2048:
        parser.error(f"--size must be between 32 and 2048, not {args.size}")
    if args.trt_max_batch > 4096:
        parser.error(f"--trt-max-batch must be between 1 and 4096, not {args.trt_max_batch}")
    if args.calib_count and not args.int8:
        parser.error("--calib-count only applies with --int8")
    if args.calib and not args.int8:
        parser.error("--calib-dir only applies with --int8")
    if args.int8 and not args.calib:
        parser.error("--int8 needs --calib-dir DIR (calibration images for the quantize stage)")
    if args.calib and not Path(args.calib).is_dir():
        raise RdcdError(f"calibration folder not found: {args.calib}")


def summary_table(result, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from rdcd.artifact import STATUS_ICON

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: wide enough for the reasons
            console = Console(width=200)
    m = result.manifest
    src = m.source
    table = Table(title=f"rdcd-export → {m.dir}/manifest.json  ({src.kind} {src.checkpoint or ''}, "
                        f"{src.dim or '?'}-d, {m.preprocess.get('size', '?')} px)",
                  show_lines=False)
    for col in ("", "artifact", "status", "parity min / mean cos", "size", "path", "reason / notes"):
        table.add_column(col, overflow="fold")
    names = result.names + [a.name for a in m.artifacts if a.name not in result.names]
    for name in names:
        art = m.get(name)
        if art is None:
            continue
        table.add_row(STATUS_ICON.get(art.status, "?"), name + ("" if name in result.names else " (earlier run)"),
                      _status(art), _parity(art), _size(m, art), art.path, art.reason or "")
    console.print(table)
    for note in result.notes:
        console.print(note)
    console.print(f"{len(result.names)} artifact(s) in {result.seconds:.1f} s; exit {result.code}")


def _status(art) -> str:
    from rdcd.export.api import STATUS_TEXT

    if art.reference_only and art.status == "ok":
        return "referenced (not copied), ran"
    return STATUS_TEXT.get(art.status, art.status)


def _parity(art) -> str:
    """min / mean cosine, or the check that stands in for it where the artifact cannot run here."""
    par, checks = art.parity, art.checks or {}
    if par:
        return f"{par['min_cos']:.6f} / {par['mean_cos']:.6f} (n={par['images']})"
    if art.target == "coreml" and checks.get("converted_torch"):
        return f"— (converted torch program: {checks['converted_torch']['min_cos']:.6f})"
    if art.target == "tensorrt" and checks.get("engine_input_fp16_onnx"):
        return f"— (FP16 ONNX input: {checks['engine_input_fp16_onnx']['min_cos']:.6f})"
    return "—"


def _size(manifest, art) -> str:
    from rdcd.fsutil import size_bytes

    p = manifest.resolve(art)
    size = art.size_bytes or (size_bytes(p) if p.exists() else None)
    return "—" if not size else f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def list_targets(console=None) -> None:
    """The table of :data:`rdcd.targets.REGISTRY` as this machine sees it."""
    from rich.console import Console
    from rich.table import Table

    from rdcd.targets import REGISTRY

    table = Table(title="rdcd-export targets (on this machine)")
    for col in ("target", "runtime", "precisions", "files", "export here", "run here"):
        table.add_column(col, overflow="fold")
    for target in REGISTRY.values():
        d = target.describe()
        table.add_row(d["target"], d["runtime"], ", ".join(d["precisions"]), ", ".join(d["files"]), d["export"], d["run"])
    (console or Console(width=160)).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_targets:
        list_targets()
        return 0
    setup_logging(args.verbose)
    # our progress at INFO; converters (onnxscript, onnx_ir, coremltools, float16) only when they warn
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("rdcd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _validate(args, parser)

    from rdcd.export import api, parity
    from rdcd.export import source as S

    targets = parse_targets(args.target, default=TARGETS)
    if args.out:  # an --out that cannot be written fails before the model is loaded
        writable_dir(args.out, "--out", clean=True)
    # everything that can be wrong with the input fails here, before any slow work
    paths = parity.image_paths(args.parity_images)
    if args.teacher and args.whiten_on:
        raise RdcdError("--whiten-on applies to a student checkpoint, not to --teacher")
    if args.teacher:
        src = S.teacher_source(args.teacher, size=args.size)
        default_out = Path("exports") / ("teacher-" + Path(args.teacher.replace(":", "-")).stem)
    else:
        ckpt = args.checkpoint or S.find_latest_run()
        if not args.checkpoint:
            log.info("no --checkpoint: using the newest run, %s", ckpt)
        src = S.student_source(ckpt, size=args.size, whiten_on=args.whiten_on)
        default_out = Path("exports") / src.name
    out = Path(args.out) if args.out else writable_dir(default_out, "--out", clean=True)  # --out: checked above
    command = "rdcd-export " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    opts = api.Options(coreml_precision=args.precision, batch=args.trt_max_batch, parity_paths=paths, int8=args.int8,
                       calib=Path(args.calib) if args.calib else None, calib_count=args.calib_count,
                       threads=args.threads, command=command)
    result = api.export(src, targets, out, opts)
    summary_table(result)
    return result.code


if __name__ == "__main__":
    sys.exit(main())
