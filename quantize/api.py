"""``rdcd.quantize.quantize``: add INT8 artifacts to an export directory and its ``manifest.json``::

    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize

    quantize("runs/demo/export", "calib_images/", targets=["onnx", "openvino"], recipe=QuantizeRecipe(calib_count=300),
             accuracy=AccuracyControl("runs/demo/bench", max_drop=0.005))

For each requested target, the model is quantized with calibration images, its µAP is measured on the
benchmark against its own FP32 reference, and, while the drop exceeds ``max_drop``, the most sensitive layers
(per-layer SQNR) are kept in float and the model re-quantized (:mod:`rdcd.quantize.sensitivity`).

Artifacts (paths relative to the export directory):

=================  =========  =========  =======================================  ==========================
name               target     precision  path                                     µAP measured with
=================  =========  =========  =======================================  ==========================
onnx-int8          onnx       int8       model.int8.onnx                          onnxruntime (CPU)
tensorrt-int8      tensorrt   int8       tensorrt/model-int8.engine (the engine;  TensorRT, where it was built
                                         its QDQ source: ``qdq_source`` =         here; else not_checkable and
                                         tensorrt/model-int8.onnx)                onnxruntime QDQ reference
                                                                                  semantics (TRT prediction)
openvino-int8      openvino   int8       openvino/model-int8.xml (+ .bin)         OpenVINO (CPU)
coreml-w8a8        coreml     w8a8       coreml/model-w8a8.mlpackage (its         PyTorch simulation off macOS
                                         simulation: ``simulation.path`` =
                                         coreml/model-w8a8.simulation)
coreml-w8          coreml     w8         coreml/model-w8.mlpackage                PyTorch simulation off macOS
=================  =========  =========  =======================================  ==========================

The paths are :data:`rdcd.artifact.LAYOUT`'s. Re-quantizing a folder of an older version removes the files it
wrote where these now go (``openvino-int8/``, ``model.w8a8.mlpackage``, ``model.w8.mlpackage``,
``model.w8a8.simulation``) once the manifest names the new ones.

The INT8 engine is built here (``rdcd.export.tensorrt.build``, the export's batch profile) only where TensorRT
and a CUDA device are present; elsewhere its file is absent and ``tensorrt/build_engine.sh`` (rewritten through
``rdcd.export.tensorrt.write_script`` with the INT8 lines) builds it on the device. Also written:
``index_codes.json`` (int8 / binary codecs for the reference index) and ``quantize_report.json``
(calibration, candidates, per-layer SQNR, fallback steps, codes, latency).

Each target is one function of a :class:`~rdcd.quantize.context.Context` (:mod:`~rdcd.quantize.target_onnx`,
:mod:`~rdcd.quantize.target_openvino`, :mod:`~rdcd.quantize.target_coreml`), registered with the target's export
and runner in :data:`rdcd.targets.REGISTRY` and run in its order (ONNX first).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

from rdcd import __version__, cli
from rdcd.cli import is_disk_full
from rdcd.errors import GateFailed, RdcdError
from rdcd.fsutil import write_json
from rdcd.manifest import DROP_TYPES, MAX_DROP, TARGETS, Artifact, Manifest, layout_path
from rdcd.quantize.accuracy import BenchImages
from rdcd.quantize.calib import DEFAULT_CALIB_COUNT, load_calibration
from rdcd.quantize.context import Context, remove_old_layout
from rdcd.quantize.preflight import check_onnx, check_options, prepare_export_dir, work_dir
from rdcd.targets import REGISTRY

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("onnx", "coreml", "openvino")
REPORT = "quantize_report.json"
CODES = "index_codes.json"


@dataclasses.dataclass(frozen=True)
class QuantizeRecipe:
    """How to quantize: calibration ``method`` (``auto`` tries minmax, percentile, entropy in turn and keeps the
    first within the budget), ``engine`` (``auto`` = ONNX Runtime's quantizer; ``nncf``), 7-bit weights
    (``reduce_range``: auto = the stem first, then all layers), the GeM/L2 tail kept float, calibration images."""

    method: str = "auto"
    engine: str = "auto"
    reduce_range: str = "auto"
    keep_tail_float: bool = True
    calib_count: int = DEFAULT_CALIB_COUNT


@dataclasses.dataclass(frozen=True)
class AccuracyControl:
    """NNCF's ``quantize_with_accuracy_control`` for copy detection: every INT8 candidate's µAP is measured on
    ``benchmark`` (DISC2021 layout) against its FP32 reference, and while the drop exceeds ``max_drop``
    (``drop_type`` absolute: µAP points; relative: a share of the FP32 µAP) the most sensitive layers are kept
    float, at most ``max_fallback_steps`` times."""

    benchmark: str | os.PathLike
    max_drop: float = MAX_DROP
    drop_type: str = "absolute"
    max_fallback_steps: int = 8
    fallback: bool = True


@dataclasses.dataclass
class QuantizeResult:
    """What :func:`quantize` wrote: the INT8 rows (as the manifest now holds them) and the report (also
    ``quantize_report.json``: calibration, per-target fallback steps, sensitivity, index codes, latency)."""

    artifacts: list[Artifact]
    report: dict


def _checkpoint(manifest: Manifest, checkpoint) -> Path | None:
    if checkpoint:
        return Path(checkpoint)
    ck = manifest.source.checkpoint
    if manifest.source.kind == "student" and ck:
        for cand in (Path(ck), manifest.dir / ck):
            if cand.exists():
                return cand
    return None


def _coreml_student(manifest: Manifest, ck: Path, onnx_art: Artifact):
    """The PyTorch student Core ML W8A8 quantizes: the run's, with the export's whitening folded in again."""
    from rdcd.export.source import load_run_student

    student = load_run_student(ck)
    whitening = manifest.source.whitening
    if whitening is not None:  # rdcd-export --whiten-on: fold the same whitening into the student
        from rdcd.export.source import folder_sha256
        from rdcd.imageio import list_images
        from rdcd.model import fold_whitening

        folder = Path(str(whitening.get("folder", "")))
        images = list_images(folder) if folder.is_dir() else []
        if not images or folder_sha256(images) != whitening.get("folder_sha256"):
            raise RdcdError(f"the export was whitened on {folder}, which is gone or has changed since: Core ML "
                            "W8A8 cannot rebuild the same model (re-export, or leave out --target coreml)")
        fold_whitening(student, images, student.config.preprocess(), whitening.get("shrinkage", 0.1))
    dim = onnx_art.output.dim
    if dim and int(dim) != student.config.dim:
        raise RdcdError(f"checkpoint {ck} gives {student.config.dim}-d descriptors, the export {dim}-d")
    return student


def quantize(exports: str | os.PathLike, calib: str | os.PathLike, *, targets: Sequence[str] | None = None,
             recipe: QuantizeRecipe | None = None, accuracy: AccuracyControl | None = None,
             checkpoint: str | os.PathLike | None = None, threads: int = 2, codes: bool = True,
             latency_iters: int = 0, command: str | None = None, raise_on_drop: bool = True,
             with_tensorrt: bool = True) -> QuantizeResult:
    """Quantize the export folder ``exports`` with calibration images from ``calib``; return the
    :class:`~rdcd.artifact.Artifact` rows written to its manifest and the report (:class:`QuantizeResult`).

    ``targets``: ``onnx`` (the ONNX Runtime CPU model; with ``with_tensorrt`` also the TensorRT QDQ input),
    ``tensorrt``, ``openvino``, ``coreml`` (W8A8 and W8; needs the student checkpoint). Default: onnx,
    coreml, openvino, leaving Core ML out (with a warning) when no checkpoint is known. Without ``accuracy``
    nothing is measured and nothing falls back. Raises :class:`GateFailed` (after saving everything) when an
    artifact's µAP drop still exceeds the budget after fallback, and :class:`RdcdError` on bad input.
    """
    recipe = recipe or QuantizeRecipe()
    if calib is None or str(calib) == "":
        raise RdcdError("INT8 calibration needs a folder of real images: pass --calib-dir")
    explicit = targets is not None
    if explicit and not targets:
        raise RdcdError("no target to quantize: name one or more of " + ", ".join(TARGETS))
    targets = tuple(cli.parse_targets(targets, DEFAULT_TARGETS))  # rdcd-export's spelling rules: lists, "all"
    check_options(recipe.method, recipe.reduce_range, recipe.engine, accuracy.max_drop if accuracy else MAX_DROP)
    if accuracy is not None and accuracy.drop_type not in DROP_TYPES:
        raise RdcdError(f"drop_type must be {' or '.join(DROP_TYPES)}, not {accuracy.drop_type!r}")
    manifest = Manifest.load(exports)  # the one manifest loader: malformed manifests are RdcdErrors
    prepare_export_dir(manifest.dir)  # writable; temporaries of killed runs removed
    onnx_art = manifest.find("onnx")
    if onnx_art is None:
        raise RdcdError(f"no FP32 ONNX artifact in {manifest.path}: run rdcd-export --target onnx first")
    if onnx_art.output.dim is None or (onnx_art.input.side is None and manifest.input_size() is None):
        raise RdcdError(f"malformed {manifest.path}: {onnx_art.name} records no output dim or input size")
    fp32_onnx = check_onnx(manifest.resolve(onnx_art), onnx_art.sha256)  # not a damaged file
    from rdcd.validate.artifact_input import artifact_input

    spec = artifact_input(fp32_onnx, manifest=manifest, row=onnx_art).spec
    ck = _checkpoint(manifest, checkpoint)
    if "coreml" in targets and ck is None and not explicit:
        log.warning("no checkpoint known: skipping Core ML W8A8/W8 (pass checkpoint= / --checkpoint RUN)")
        targets = tuple(t for t in targets if t != "coreml")
    if "coreml" in targets and ck is None:
        raise RdcdError("Core ML W8A8 quantizes the PyTorch student: pass --checkpoint RUN "
                        "(the manifest names no checkpoint that exists here)")
    student = _coreml_student(manifest, ck, onnx_art) if "coreml" in targets else None

    bench = None
    exclude_names: set[str] = set()
    if accuracy is not None:
        from rdcd.validate.demo import used_sources

        bench = BenchImages.load(accuracy.benchmark, spec, with_training=True)
        exclude_names = used_sources(accuracy.benchmark)
    else:
        log.warning("no --benchmark: INT8 accuracy is not measured and the fallback loop is off")
    calib_set = load_calibration(calib, spec, recipe.calib_count, exclude_names)
    log.info("%s", calib_set.summary())  # the one line rdcd-quantize shows about it

    ctx = Context(manifest, spec, bench, calib_set, accuracy, recipe, threads, command, onnx_art, fp32_onnx, student, ck)
    report: dict = {"rdcd_version": __version__, "calibration": calib_set.describe(), "max_drop": ctx.max_drop,
                    "benchmark": bench.info() if bench else None, "targets": {}}
    artifacts: list[Artifact] = []
    done: list[str] = []  # the targets that ran
    errors: list[tuple[str, Exception]] = []
    with work_dir(manifest.dir) as work:
        ctx.work = work
        from rdcd.quantize.onnx_ptq import OnnxQuantizer

        quantizer = OnnxQuantizer(fp32_onnx, calib_set.images, recipe.keep_tail_float, ctx.work / "onnx")
        ctx.quantizer = quantizer
        fp32_desc = None
        if bench is not None:
            from rdcd.validate.runtimes import OnnxRuntimeRunner

            fp32_desc = bench.describe(OnnxRuntimeRunner(fp32_onnx, threads), with_training=True)
            fp32_res = bench.evaluate(fp32_desc)
            ctx.fp32_uap = float(fp32_res.metrics.micro_ap)
            ctx.predictions["onnx-fp32"] = fp32_res.predictions
            log.info("FP32 ONNX µAP %.4f", ctx.fp32_uap)
            if accuracy.drop_type == "relative":  # NNCF's DropType.RELATIVE: a share of the FP32 µAP
                ctx.max_drop = accuracy.max_drop * ctx.fp32_uap
                report["max_drop"] = ctx.max_drop
                log.info("relative max_drop %g of µAP %.4f: %.4f µAP points", accuracy.max_drop, ctx.fp32_uap, ctx.max_drop)
        # ONNX first: its chosen calibration method seeds TensorRT's; TensorRT's QDQ input comes with onnx
        run = [t for t in REGISTRY if t in targets or (t == "tensorrt" and "onnx" in targets and with_tensorrt)]
        jobs = [(t, lambda t=t: REGISTRY[t].function("quantize")(ctx)) for t in run]  # each: (rows, report section)
        for target, job in jobs:  # one target failing must not lose the others' work
            try:
                arts, rep = job()
            except Exception as exc:
                if os.environ.get("RDCD_DEBUG") or is_disk_full(exc):
                    raise
                log.error("%s failed: %s%s", target, "" if isinstance(exc, RdcdError) else f"{type(exc).__name__}: ",
                          str(exc).splitlines()[0] if str(exc) else "")
                errors.append((target, exc))
                report["targets"][target] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            artifacts.extend(arts if isinstance(arts, list) else [arts])
            report["targets"][target] = rep
            done.append(target)
        if ctx.sensitivity is not None:
            report["sensitivity"] = ctx.sensitivity
        if codes and fp32_desc is not None:
            from rdcd.quantize.codes import evaluate_codes, save_codecs

            report["codes"] = evaluate_codes(bench.bench, fp32_desc, ctx.fp32_uap)
            save_codecs(manifest.dir / CODES, fp32_desc)
            report["codes_file"] = CODES
        if latency_iters and "onnx" in targets and "error" not in report["targets"].get("onnx", {"error": 1}):
            from rdcd.quantize.latency import compare
            from rdcd.validate.runtimes import OnnxRuntimeRunner

            int8 = manifest.dir / layout_path("onnx", "int8")
            report["latency"] = {"threads": threads, **compare(
                {"fp32": OnnxRuntimeRunner(fp32_onnx, threads), "int8": OnnxRuntimeRunner(int8, threads)},
                spec.size, iters=latency_iters)}
        quantizer.close()
    for art in artifacts:
        if art.accuracy is not None:
            art.accuracy.max_drop = round(ctx.max_drop, 6)  # the budget it was judged against
        manifest.upsert(art)
    manifest.save()
    for target in done:
        remove_old_layout(manifest, target)
    write_json(manifest.dir / REPORT, report)
    if errors:
        target, exc = errors[0]
        if len(errors) == 1 and isinstance(exc, RdcdError):
            raise type(exc)(f"{target}: {exc}") if type(exc) is RdcdError else exc
        raise RdcdError("quantization failed for " + "; ".join(
            f"{t}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for t, e in errors)
                        + (f" (the other targets were saved to {manifest.path})" if artifacts else ""))
    broken = [a for a in artifacts if a.status == "failed"]  # a TensorRT engine that did not build or run
    if broken:
        raise GateFailed("; ".join(f"{a.name} failed: {a.reason}" for a in broken) + f" (saved to {manifest.path})")
    failed = [a for a in artifacts if a.accuracy is not None and a.accuracy.drop > ctx.max_drop]
    if failed and raise_on_drop:
        raise GateFailed("µAP drop above --max-drop " f"{ctx.max_drop:g} after fallback: " + ", ".join(
            f"{a.name} {a.accuracy.drop:+.4f}" for a in failed) + f" (details in {manifest.dir / REPORT})")
    return QuantizeResult(artifacts, report)
