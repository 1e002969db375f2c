"""The INT8 targets quantized from the FP32 ONNX model by :class:`rdcd.quantize.onnx_ptq.OnnxQuantizer`:
``onnx-int8`` (``model.int8.onnx``, ONNX Runtime CPU; the best of the calibration candidates, then the
fallback loop) and ``tensorrt-int8`` (its QDQ source ``tensorrt/model-int8.onnx``, the build script's INT8
lines and, where TensorRT and a GPU exist, the engine). Each takes a :class:`~rdcd.quantize.context.Context`
and returns (manifest row(s), report section)."""

from __future__ import annotations

import logging
import shutil

from rdcd.artifact import layout_path
from rdcd.errors import MissingDependency, RuntimeUnavailable
from rdcd.fsutil import atomic_path
from rdcd.quantize.accuracy import accuracy_block
from rdcd.quantize.context import SENSITIVITY_IMAGES, TRT_PREDICTION, Context, r6

log = logging.getLogger("rdcd.quantize.api")


def recipe_candidates(methods, engines, reduce_range: str):
    """(engine, method, reduce_range) in the order tried: 7-bit weights only on the stem first (full
    precision elsewhere), then on every layer (no u8s8 saturation anywhere on AVX2 CPUs without VNNI)."""
    rrs = ("first", "all") if reduce_range == "auto" else (reduce_range,)
    out = []
    for eng in engines:
        for m in methods:
            if eng == "nncf" and m == "entropy":
                continue
            for rr in (rrs if eng == "ort" else ("none",)):
                out.append((eng, m, rr))
    return out


def onnx_int8(ctx: Context):
    """``onnx-int8``: the first calibration candidate within the budget (else the best), then the fallback loop."""
    from rdcd.quantize.onnx_ptq import Recipe
    from rdcd.quantize.qdq_graph import check_qdq
    from rdcd.quantize.sensitivity import fallback_loop
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    methods, engines, reduce_range = ctx.methods, ctx.engines, ctx.recipe.reduce_range
    q = ctx.quantizer
    candidates = []
    best = None  # (drop, recipe, path)
    for eng, m, rr in recipe_candidates(methods, engines, reduce_range):
        recipe = Recipe(engine=eng, method=m, activations="asymmetric", reduce_range=rr)
        path = q.quantize(ctx.work / f"onnx-{eng}-{m}-{rr}.onnx", recipe)
        uap = ctx.uap(OnnxRuntimeRunner(path, ctx.threads), key=path)
        drop = (ctx.fp32_uap - uap) if ctx.bench is not None else 0.0
        candidates.append({"engine": eng, "method": m, "reduce_range": rr, "micro_ap": r6(uap), "drop": r6(drop)})
        log.info("onnx-int8 candidate %s/%s/7-bit weights: %s -> µAP %.4f (drop %+.4f)", eng, m, rr, uap, drop)
        if best is None or drop < best[0] - 1e-9:
            best = (drop, recipe, path)
        if ctx.bench is None or drop <= ctx.max_drop:
            break
    _, recipe, step0 = best
    ctx.chosen_method = recipe.method
    ranking = ctx.rank(recipe, step0) if ctx.bench is not None else []

    def build(excluded, i):
        if i == 0:
            return step0
        return q.quantize(ctx.work / f"onnx-step{i}.onnx", recipe, excluded)

    res = fallback_loop(build, lambda p: ctx.uap(OnnxRuntimeRunner(p, ctx.threads), key=p), ranking, ctx.fp32_uap or 0.0,
                        ctx.max_drop, ctx.max_steps, enabled=ctx.fallback, label="onnx-int8")
    unit_norm = ctx.unit_norm(OnnxRuntimeRunner(res.chosen.path, ctx.threads), "onnx-int8")  # before replacing the file
    rel = layout_path("onnx", "int8")
    out = ctx.manifest.dir / rel
    with atomic_path(out) as tmp:
        shutil.copyfile(res.chosen.path, tmp)
    art = ctx.base("onnx", "int8", ctx.onnx_art.name)
    art.produced_by = ctx.produced_by(f"{'onnxruntime.quantization' if recipe.engine == 'ort' else 'nncf'} static PTQ (QDQ)",
                                      {**recipe.to_dict(), "format": "QDQ", "candidates": candidates,
                                       "float_nodes": q.float_nodes})
    art.qdq = check_qdq(out)
    art.checks = {"unit_norm": unit_norm}
    if ctx.bench is not None:
        art.accuracy = accuracy_block(ctx.bench, ctx.fp32_uap, res.chosen.micro_ap, "onnxruntime", False,
                                      threads=ctx.threads, **ctx.interval("onnx-fp32", res.chosen.path))
    if res.chosen.excluded:
        art.fallback_layers = list(res.chosen.excluded)
    return art, {"candidates": candidates, "recipe": recipe.to_dict(), "fallback": res.report()}


def tensorrt_int8(ctx: Context):
    """``tensorrt-int8``: the QDQ model TensorRT builds from (``qdq_source``), the one build script with its INT8
    lines, and the engine (``path``), built and run here only where TensorRT and a CUDA device are present."""
    from rdcd.export import tensorrt as T
    from rdcd.fsutil import sha256
    from rdcd.quantize.onnx_ptq import Recipe
    from rdcd.quantize.qdq_graph import check_qdq
    from rdcd.validate.runtimes import OnnxRuntimeRunner
    from rdcd.quantize.sensitivity import fallback_loop

    q = ctx.quantizer
    recipe = Recipe.tensorrt(method=ctx.chosen_method or ctx.methods[0])
    ranking = ctx.rank(recipe) if ctx.bench is not None else []

    def build(excluded, i):
        return q.quantize(ctx.work / f"trt-step{i}.onnx", recipe, excluded)

    res = fallback_loop(build, lambda p: ctx.uap(OnnxRuntimeRunner(p, ctx.threads, reference=True), key=p), ranking,
                        ctx.fp32_uap or 0.0, ctx.max_drop, ctx.max_steps, enabled=ctx.fallback, label="tensorrt-int8")
    tdir, size, batch = ctx.manifest.dir / T.DIRNAME, ctx.spec.size, T.profile_batch(ctx.manifest)
    qdq, engine = tdir / T.ONNX_INT8, tdir / T.ENGINES["int8"]
    with atomic_path(qdq) as tmp:
        shutil.copyfile(res.chosen.path, tmp)
    if engine.exists():
        log.warning("removing %s: it was built from the QDQ model just replaced", engine)
        engine.unlink()
    (tdir / "build_engine_int8.sh").unlink(missing_ok=True)  # older versions' second script: one builder now
    label = ctx.manifest.source.label or "this model"
    T.write_script(tdir, label, size, batch, int(ctx.onnx_art.output.dim), int8=True,
                   fp16=(tdir / T.ONNX).is_file() and (tdir / T.ONNX_FP16).is_file())
    options, cmd = T.build_options("int8", size, batch)
    art = ctx.base("tensorrt", "int8", ctx.onnx_art.name)
    art.input.shape = [f"1..{batch}", size, size, 3]
    art.produced_by = ctx.produced_by("onnxruntime.quantization static PTQ (QDQ, TensorRT explicit quantization)",
                                      {**recipe.to_dict(), "format": "QDQ", "float_nodes": q.float_nodes, **options,
                                       "calibration_cache": None})
    art.qdq_source, art.qdq_sha256, art.qdq, art.command = f"{T.DIRNAME}/{T.ONNX_INT8}", sha256(qdq), check_qdq(qdq), cmd
    art.checks = {"unit_norm": ctx.unit_norm(OnnxRuntimeRunner(qdq, ctx.threads, reference=True),
                                             "tensorrt-int8 (QDQ reference)")}
    art.engine_built = False
    trt_ref = ctx.manifest.find("tensorrt", ("fp32", "fp16"))
    if trt_ref is not None:
        art.tensorrt_reference = trt_ref.name
    uap, runtime, simulated, key = res.chosen.micro_ap, TRT_PREDICTION, True, res.chosen.path
    ok, why = T.availability()
    if not ok:
        art.mark("not_checkable", f"{T.NOT_BUILT} ({why}); build it on the device with "
                                  f"{T.DIRNAME}/{T.SCRIPT} (from {art.qdq_source})")
    else:  # pragma: no cover - needs TensorRT and an NVIDIA GPU: never executed in this workplace
        try:
            from rdcd.export.parity import parity
            from rdcd.validate.runtimes import TensorRTRunner

            art.build = T.build(tdir, "int8", size, batch)
            art.engine_built = True
            runner, images = TensorRTRunner(engine), ctx.calib.images[:SENSITIVITY_IMAGES]
            art.parity = parity(OnnxRuntimeRunner(qdq, ctx.threads, reference=True)(images), runner(images),
                                "onnxruntime QDQ reference", f"tensorrt {runner.version}")
            if ctx.bench is not None:
                uap, runtime, simulated, key = ctx.uap(runner, key="tensorrt"), f"tensorrt {runner.version}", False, "tensorrt"
        except (MissingDependency, RuntimeUnavailable) as exc:
            art.mark("not_checkable", f"engine built, not run here: {str(exc).splitlines()[0]}")
        except Exception as exc:
            art.mark("failed", f"TensorRT INT8 engine: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if ctx.bench is not None:
        art.accuracy = accuracy_block(
            ctx.bench, ctx.fp32_uap, uap, runtime, simulated, prediction_micro_ap=round(res.chosen.micro_ap, 6),
            note="TensorRT builds its INT8 engine from the QDQ model (qdq_source); the prediction is its µAP in "
                 "ONNX Runtime on CPU", **ctx.interval("onnx-fp32", key))
    if res.chosen.excluded:
        art.fallback_layers = list(res.chosen.excluded)
    return art, {"recipe": recipe.to_dict(), "fallback": res.report(), "command": cmd, "batch": batch}
