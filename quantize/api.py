"""``quantize_export``: add INT8 artifacts to an export directory and its ``manifest.json``.

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
openvino-int8      openvino   int8       openvino-int8/model.xml                  OpenVINO (CPU)
coreml-w8a8        coreml     w8a8       model.w8a8.mlpackage                     PyTorch simulation off macOS
coreml-w8          coreml     w8         model.w8.mlpackage                       PyTorch simulation off macOS
=================  =========  =========  =======================================  ==========================

The INT8 engine is built here (``rdcd.export.tensorrt.build``, the export's batch profile) only where TensorRT
and a CUDA device are present; elsewhere its file is absent and ``tensorrt/build_engine.sh`` (rewritten through
``rdcd.export.tensorrt.write_script`` with the INT8 lines) builds it on the device. Also written:
``index_codes.json`` (int8 / binary codecs for the reference index) and ``quantize_report.json``
(calibration, candidates, per-layer SQNR, fallback steps, codes, latency).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from rdcd import __version__
from rdcd.errors import GateFailed, MissingDependency, RdcdError, RuntimeUnavailable
from rdcd.fsutil import atomic_path, write_json
from rdcd.manifest import MAX_DROP, Manifest
from rdcd.preprocess import PreprocessSpec
from rdcd.quantize.accuracy import BenchImages, accuracy_block, check_unit_norm
from rdcd.quantize.calib import DEFAULT_CALIB_COUNT, load_calibration
from rdcd.cli import is_disk_full
from rdcd.quantize.preflight import check_onnx, check_options, prepare_export_dir, work_dir

log = logging.getLogger(__name__)

TARGETS = ("onnx", "tensorrt", "coreml", "openvino")
DEFAULT_TARGETS = ("onnx", "coreml", "openvino")
AUTO_METHODS = ("minmax", "percentile", "entropy")
SENSITIVITY_IMAGES = 16
REPORT = "quantize_report.json"
CODES = "index_codes.json"
TRT_PREDICTION = "onnxruntime (QDQ reference semantics, graph optimisations off): the TensorRT INT8 prediction"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"rdcd": __version__}
    for pkg in ("onnx", "onnxruntime", "nncf", "openvino", "coremltools", "torch", "faiss-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _fp_artifact(manifest: Manifest, target: str, precisions=("fp32",)) -> dict | None:
    for prec in precisions:
        for art in manifest.artifacts:
            if art["target"] == target and art["precision"] == prec and art.get("status") != "failed" \
                    and manifest.resolve(art).exists():
                return art
    return None


def _spec(manifest: Manifest, onnx_art: dict) -> PreprocessSpec:
    if manifest.data.get("preprocess"):
        return PreprocessSpec.from_dict(manifest.data["preprocess"])
    from rdcd.validate.models import artifact_spec

    return artifact_spec(manifest.resolve(onnx_art))


def _checkpoint(manifest: Manifest, checkpoint) -> Path | None:
    if checkpoint:
        return Path(checkpoint)
    src = manifest.data.get("source") or {}
    ck = src.get("checkpoint")
    if src.get("kind", "student") == "student" and ck:
        for cand in (Path(ck), manifest.dir / ck):
            if cand.exists():
                return cand
    return None


def quantize_export(export_dir: str | os.PathLike, calib_dir: str | os.PathLike,
                    calib_count: int = DEFAULT_CALIB_COUNT, benchmark: str | os.PathLike | None = None,
                    max_drop: float = MAX_DROP, targets: Sequence[str] | None = None, method: str = "auto",
                    engine: str = "auto", checkpoint: str | os.PathLike | None = None, threads: int = 2,
                    fallback: bool = True, max_fallback_steps: int = 8, keep_tail_float: bool = True,
                    reduce_range: str = "auto", codes: bool = True, latency_iters: int = 0,
                    command: str | None = None, raise_on_drop: bool = True, with_tensorrt: bool = True) -> list[dict]:
    """Quantize the export in ``export_dir`` for ``targets``; return the artifact dicts written to its manifest.

    ``targets``: ``onnx`` (the ONNX Runtime CPU model; with ``with_tensorrt`` also the TensorRT QDQ input),
    ``tensorrt``, ``openvino``, ``coreml`` (W8A8 and W8; needs the student checkpoint). Default: onnx,
    coreml, openvino, leaving Core ML out (with a warning) when no checkpoint is known.
    Raises :class:`GateFailed` (after saving everything) when an artifact's µAP drop still exceeds
    ``max_drop`` after fallback, and :class:`RdcdError` on bad input.
    """
    from rdcd.quantize.onnx_ptq import METHODS

    if calib_dir is None or str(calib_dir) == "":
        raise RdcdError("INT8 calibration needs a folder of real images: pass --calib-dir")
    explicit = targets is not None
    targets = tuple(dict.fromkeys(targets if explicit else DEFAULT_TARGETS))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise RdcdError(f"unknown target(s) {', '.join(bad) or '(none)'}: choose from {', '.join(TARGETS)}")
    check_options(method, reduce_range, engine, max_drop, METHODS)
    manifest = Manifest.load(export_dir)  # the one manifest loader: malformed manifests are RdcdErrors
    prepare_export_dir(manifest.dir)  # writable; temporaries of killed runs removed
    onnx_art = _fp_artifact(manifest, "onnx")
    if onnx_art is None:
        raise RdcdError(f"no FP32 ONNX artifact in {manifest.path}: run rdcd-export --target onnx first")
    fp32_onnx = check_onnx(manifest.resolve(onnx_art), onnx_art.get("sha256"))  # not a damaged file
    spec = _spec(manifest, onnx_art)
    ck = _checkpoint(manifest, checkpoint)
    if "coreml" in targets and ck is None and not explicit:
        log.warning("no checkpoint known: skipping Core ML W8A8/W8 (pass checkpoint= / --checkpoint RUN)")
        targets = tuple(t for t in targets if t != "coreml")
    if "coreml" in targets and ck is None:
        raise RdcdError("Core ML W8A8 quantizes the PyTorch student: pass --checkpoint RUN "
                        "(the manifest names no checkpoint that exists here)")
    student = None
    if "coreml" in targets:
        from rdcd.export.source import load_run_student

        student = load_run_student(ck)
        whitening = (manifest.data.get("source") or {}).get("model", {}).get("whitening")
        if isinstance(whitening, dict):  # rdcd-export --whiten-on: fold the same whitening into the student
            from rdcd.export.source import folder_sha256
            from rdcd.imageio import list_images
            from rdcd.model import fold_whitening

            folder = Path(str(whitening.get("folder", "")))
            images = list_images(folder) if folder.is_dir() else []
            if not images or folder_sha256(images) != whitening.get("folder_sha256"):
                raise RdcdError(f"the export was whitened on {folder}, which is gone or has changed since: Core ML "
                                "W8A8 cannot rebuild the same model (re-export, or leave out --target coreml)")
            fold_whitening(student, images, student.config.preprocess(), whitening.get("shrinkage", 0.1))
        dim = (onnx_art.get("output") or {}).get("dim")
        if dim and int(dim) != student.config.dim:
            raise RdcdError(f"checkpoint {ck} gives {student.config.dim}-d descriptors, the export {dim}-d")

    bench = None
    exclude_names: set[str] = set()
    if benchmark is not None:
        from rdcd.validate.demo import used_sources

        bench = BenchImages.load(benchmark, spec, with_training=True)
        exclude_names = used_sources(benchmark)
    else:
        log.warning("no --benchmark: INT8 accuracy is not measured and the fallback loop is off")
    calib = load_calibration(calib_dir, spec, calib_count, exclude_names)
    log.info("%s", calib.summary())

    ctx = _Context(manifest, spec, bench, calib, max_drop, threads, fallback and bench is not None,
                   max_fallback_steps, command, onnx_art)
    report: dict = {"rdcd_version": __version__, "calibration": calib.describe(), "max_drop": max_drop,
                    "benchmark": bench.info() if bench else None, "targets": {}}
    artifacts: list[dict] = []
    errors: list[tuple[str, Exception]] = []
    with work_dir(manifest.dir) as work:
        ctx.work = work
        from rdcd.quantize.onnx_ptq import OnnxQuantizer

        quantizer = OnnxQuantizer(fp32_onnx, calib.images, keep_tail_float, ctx.work / "onnx")
        ctx.quantizer = quantizer
        fp32_desc = None
        if bench is not None:
            from rdcd.validate.runtimes import OnnxRuntimeRunner

            fp32_desc = bench.describe(OnnxRuntimeRunner(fp32_onnx, threads), with_training=True)
            fp32_res = bench.evaluate(fp32_desc)
            ctx.fp32_uap = float(fp32_res.metrics.micro_ap)
            ctx.predictions["onnx-fp32"] = fp32_res.predictions
            log.info("FP32 ONNX µAP %.4f", ctx.fp32_uap)
        # ---------------------------------------------------------------- ONNX Runtime / TensorRT
        methods = AUTO_METHODS if method == "auto" else (method,)
        # NNCF's QDQ graphs leave Conv -> Clip -> QuantizeLinear, which ONNX Runtime cannot fuse into integer
        # kernels (measured 3-4x slower than FP32 on this CPU): auto uses ONNX Runtime's quantizer
        engines = ("ort",) if engine == "auto" else (engine,)
        jobs = []
        if "onnx" in targets:
            jobs.append(("onnx", lambda: _onnx_target(ctx, methods, engines, reduce_range)))
        if "tensorrt" in targets or ("onnx" in targets and with_tensorrt):
            jobs.append(("tensorrt", lambda: _tensorrt_target(ctx, ctx.chosen_method or methods[0])))
        if "openvino" in targets:
            jobs.append(("openvino", lambda: _openvino_target(ctx, fp32_onnx)))
        if "coreml" in targets:
            jobs.append(("coreml", lambda: _coreml_targets(ctx, student, ck)))
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

            report["latency"] = {"threads": threads, **compare(
                {"fp32": OnnxRuntimeRunner(fp32_onnx, threads), "int8": OnnxRuntimeRunner(manifest.dir / "model.int8.onnx", threads)},
                spec.size, iters=latency_iters)}
        quantizer.close()
    for art in artifacts:
        manifest.upsert(art)
    manifest.save()
    write_json(manifest.dir / REPORT, report)
    if errors:
        target, exc = errors[0]
        if len(errors) == 1 and isinstance(exc, RdcdError):
            raise type(exc)(f"{target}: {exc}") if type(exc) is RdcdError else exc
        raise RdcdError("quantization failed for " + "; ".join(
            f"{t}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for t, e in errors)
                        + (f" (the other targets were saved to {manifest.path})" if artifacts else ""))
    broken = [a for a in artifacts if a["status"] == "failed"]  # a TensorRT engine that did not build or run
    if broken:
        raise GateFailed("; ".join(f"{a['name']} failed: {a['reason']}" for a in broken) + f" (saved to {manifest.path})")
    failed = [a for a in artifacts if a.get("accuracy") and a["accuracy"]["drop"] > max_drop]
    if failed and raise_on_drop:
        raise GateFailed("µAP drop above --max-drop " f"{max_drop} after fallback: " + ", ".join(
            f"{a['name']} {a['accuracy']['drop']:+.4f}" for a in failed) + f" (details in {manifest.dir / REPORT})")
    return artifacts


class _Context:
    def __init__(self, manifest, spec, bench, calib, max_drop, threads, fallback, max_steps, command, onnx_art):
        self.manifest, self.spec, self.bench, self.calib = manifest, spec, bench, calib
        self.max_drop, self.threads, self.fallback, self.max_steps = max_drop, threads, fallback, max_steps
        self.command, self.onnx_art = command, onnx_art
        self.fp32_uap: float | None = None
        self.quantizer = None
        self.work: Path = Path(".")
        self.ranking: list[str] | None = None
        self.sensitivity: list[dict] | None = None
        self.chosen_method: str | None = None
        self.predictions: dict = {}  # key -> Predictions, for the paired bootstrap of each drop

    def uap(self, embedder, key=None) -> float:
        """µAP of ``embedder`` on the benchmark; its predictions are kept under ``key``."""
        if self.bench is None:
            return float("nan")
        res = self.bench.evaluate(self.bench.describe(embedder))
        if key is not None:
            self.predictions[key] = res.predictions
        return float(res.metrics.micro_ap)

    def unit_norm(self, embedder, label: str) -> dict:
        """The L2-norm contract on calibration images: an error when the tail is kept float (a quantizer
        there is a bug), a warning with ``--quantize-tail`` (the user asked for a quantized tail)."""
        try:
            return check_unit_norm(embedder, self.calib.images, label)
        except RdcdError as exc:
            if self.quantizer is not None and self.quantizer.keep_tail_float:
                raise
            log.warning("%s (--quantize-tail)", exc)
            return {"error": str(exc)}

    def interval(self, reference_key, key) -> dict:
        """``drop_ci95`` for an accuracy block: the paired bootstrap 95 % interval of the drop over queries."""
        from rdcd.validate.bootstrap import paired_drop_interval

        if reference_key not in self.predictions or key not in self.predictions:
            return {}
        b = self.bench.bench
        iv = paired_drop_interval(self.predictions[reference_key], self.predictions[key], b.gt_pairs, b.queries.ids)
        return {"drop_ci95": [round(iv.low, 6), round(iv.high, 6)]}

    def produced_by(self, tool: str, options: dict) -> dict:
        return {"tool": tool, "versions": _versions(), "options": options,
                "command": self.command or "rdcd.quantize.api.quantize_export"}

    def base(self, name, target, precision, path, runtime, reference, status="ok", reason=None) -> dict:
        art = {"name": name, "target": target, "precision": precision, "path": path, "runtime": runtime,
               "input": dict(self.onnx_art["input"]), "output": dict(self.onnx_art["output"]),
               "reference": reference, "status": status, "calibration": self.calib.describe()}
        if reason:
            art["reason"] = reason
        return art

    def rank(self, recipe, step0_path: Path | None = None) -> list[str]:
        """Layers worst first, by local SQNR of an ONNX Runtime QDQ model (computed once, shared by targets)."""
        if self.ranking is not None:
            return self.ranking
        from rdcd.quantize.sensitivity import layer_sensitivity

        q = self.quantizer
        if step0_path is None or recipe.engine != "ort":
            from rdcd.quantize.onnx_ptq import Recipe

            step0_path = q.quantize(self.work / "sensitivity.onnx", Recipe(engine="ort", method=recipe.method))
        rows = layer_sensitivity(q.pre_path, step0_path, self.calib.images[:SENSITIVITY_IMAGES], q.units)
        self.sensitivity = rows
        self.ranking = [r["layer"] for r in rows]
        log.info("sensitivity: worst layers %s", ", ".join(f"{r['layer']} ({r['sqnr_db']} dB)" for r in rows[:5]))
        return self.ranking


def _candidates(methods, engines, reduce_range: str):
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


def _onnx_target(ctx: _Context, methods, engines, reduce_range: str):
    from rdcd.quantize.onnx_ptq import Recipe, check_qdq
    from rdcd.validate.runtimes import OnnxRuntimeRunner
    from rdcd.quantize.sensitivity import fallback_loop

    q = ctx.quantizer
    candidates = []
    best = None  # (drop, recipe, path)
    for eng, m, rr in _candidates(methods, engines, reduce_range):
        recipe = Recipe(engine=eng, method=m, activations="asymmetric", reduce_range=rr)
        path = q.quantize(ctx.work / f"onnx-{eng}-{m}-{rr}.onnx", recipe)
        uap = ctx.uap(OnnxRuntimeRunner(path, ctx.threads), key=path)
        drop = (ctx.fp32_uap - uap) if ctx.bench is not None else 0.0
        candidates.append({"engine": eng, "method": m, "reduce_range": rr, "micro_ap": _r(uap), "drop": _r(drop)})
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
    out = ctx.manifest.dir / "model.int8.onnx"
    with atomic_path(out) as tmp:
        shutil.copyfile(res.chosen.path, tmp)
    fp32_name = ctx.onnx_art["name"]
    art = ctx.base("onnx-int8", "onnx", "int8", out.name, "onnxruntime", fp32_name)
    art["produced_by"] = ctx.produced_by(f"{'onnxruntime.quantization' if recipe.engine == 'ort' else 'nncf'} static PTQ (QDQ)",
                                         {**recipe.to_dict(), "format": "QDQ", "candidates": candidates,
                                          "float_nodes": q.float_nodes})
    art["qdq"] = check_qdq(out)
    art["checks"] = {"unit_norm": unit_norm}
    if ctx.bench is not None:
        art["accuracy"] = accuracy_block(ctx.bench, ctx.fp32_uap, res.chosen.micro_ap, "onnxruntime", False,
                                         threads=ctx.threads, **ctx.interval("onnx-fp32", res.chosen.path))
    if res.chosen.excluded:
        art["fallback_layers"] = list(res.chosen.excluded)
    return art, {"candidates": candidates, "recipe": recipe.to_dict(), "fallback": res.report()}


def _tensorrt_target(ctx: _Context, method: str):
    """``tensorrt-int8``: the QDQ model TensorRT builds from (``qdq_source``), the one build script with its INT8
    lines, and the engine (``path``), built and run here only where TensorRT and a CUDA device are present."""
    from rdcd.export import tensorrt as T
    from rdcd.fsutil import sha256
    from rdcd.quantize.onnx_ptq import Recipe, check_qdq
    from rdcd.validate.runtimes import OnnxRuntimeRunner
    from rdcd.quantize.sensitivity import fallback_loop

    q = ctx.quantizer
    recipe = Recipe.tensorrt(method=method)
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
    label = (ctx.manifest.data.get("source") or {}).get("label") or "this model"
    T.write_script(tdir, label, size, batch, int(ctx.onnx_art["output"]["dim"]), int8=True,
                   fp16=(tdir / T.ONNX).is_file() and (tdir / T.ONNX_FP16).is_file())
    options, cmd = T.build_options("int8", size, batch)
    art = ctx.base("tensorrt-int8", "tensorrt", "int8", f"{T.DIRNAME}/{T.ENGINES['int8']}", "tensorrt",
                   ctx.onnx_art["name"])
    art["input"]["shape"] = [f"1..{batch}", size, size, 3]
    art["produced_by"] = ctx.produced_by("onnxruntime.quantization static PTQ (QDQ, TensorRT explicit quantization)",
                                         {**recipe.to_dict(), "format": "QDQ", "float_nodes": q.float_nodes, **options,
                                          "calibration_cache": None})
    art.update(qdq_source=f"{T.DIRNAME}/{T.ONNX_INT8}", qdq_sha256=sha256(qdq), qdq=check_qdq(qdq), command=cmd,
               checks={"unit_norm": ctx.unit_norm(OnnxRuntimeRunner(qdq, ctx.threads, reference=True),
                                                  "tensorrt-int8 (QDQ reference)")},
               engine_built=False)
    trt_ref = _fp_artifact(ctx.manifest, "tensorrt", ("fp32", "fp16"))
    if trt_ref is not None:
        art["tensorrt_reference"] = trt_ref["name"]
    uap, runtime, simulated, key = res.chosen.micro_ap, TRT_PREDICTION, True, res.chosen.path
    ok, why = T.availability()
    if not ok:
        art.update(status="not_checkable", reason=f"{T.NOT_BUILT} ({why}); build it on the device with "
                                                  f"{T.DIRNAME}/{T.SCRIPT} (from {art['qdq_source']})")
    else:  # pragma: no cover - needs TensorRT and an NVIDIA GPU: never executed in this workplace
        try:
            from rdcd.export.parity import parity
            from rdcd.validate.runtimes import TensorRTRunner

            art["build"] = T.build(tdir, "int8", size, batch)
            art["engine_built"] = True
            runner, images = TensorRTRunner(engine), ctx.calib.images[:SENSITIVITY_IMAGES]
            art["parity"] = parity(OnnxRuntimeRunner(qdq, ctx.threads, reference=True)(images), runner(images),
                                   "onnxruntime QDQ reference", f"tensorrt {runner.version}")
            if ctx.bench is not None:
                uap, runtime, simulated, key = ctx.uap(runner, key="tensorrt"), f"tensorrt {runner.version}", False, "tensorrt"
        except (MissingDependency, RuntimeUnavailable) as exc:
            art.update(status="not_checkable", reason=f"engine built, not run here: {str(exc).splitlines()[0]}")
        except Exception as exc:
            art.update(status="failed", reason=f"TensorRT INT8 engine: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    if ctx.bench is not None:
        art["accuracy"] = accuracy_block(
            ctx.bench, ctx.fp32_uap, uap, runtime, simulated, prediction_micro_ap=round(res.chosen.micro_ap, 6),
            note="TensorRT builds its INT8 engine from the QDQ model (qdq_source); the prediction is its µAP in "
                 "ONNX Runtime on CPU", **ctx.interval("onnx-fp32", key))
    if res.chosen.excluded:
        art["fallback_layers"] = list(res.chosen.excluded)
    return art, {"recipe": recipe.to_dict(), "fallback": res.report(), "command": cmd, "batch": batch}


def _openvino_target(ctx: _Context, fp32_onnx: Path):
    from rdcd.quantize.openvino_ptq import OVERFLOW_FIX, OpenVINOQuantizer, count_fake_quantize
    from rdcd.quantize.sensitivity import fallback_loop
    from rdcd.validate.runtimes import OpenVINORunner

    q = ctx.quantizer
    ov_art = _fp_artifact(ctx.manifest, "openvino", ("fp32",))
    source = ctx.manifest.resolve(ov_art) if ov_art else fp32_onnx
    ovq = OpenVINOQuantizer(source, ctx.calib.images)
    method = "minmax" if (ctx.chosen_method or "minmax") != "percentile" else "percentile"
    fp32_uap = ctx.fp32_uap
    if ctx.bench is not None:
        fp32_uap = ctx.uap(OpenVINORunner(source, threads=ctx.threads), key="openvino-fp32")
    ranking = ctx.rank(_default_recipe()) if ctx.bench is not None else []

    def build(excluded, i):
        out = ctx.work / f"ov-step{i}" / "model.xml"
        return ovq.quantize(out, q.float_nodes + q.node_names(excluded), method)

    res = fallback_loop(build, lambda p: ctx.uap(OpenVINORunner(p, threads=ctx.threads), key=p), ranking,
                        fp32_uap or 0.0, ctx.max_drop, ctx.max_steps, enabled=ctx.fallback, label="openvino-int8")
    out_dir = ctx.manifest.dir / "openvino-int8"
    unit_norm = ctx.unit_norm(OpenVINORunner(res.chosen.path, threads=ctx.threads), "openvino-int8")
    with atomic_path(out_dir, suffix="") as tmp:
        shutil.copytree(res.chosen.path.parent, tmp)
    rel = "openvino-int8/model.xml"
    art = ctx.base("openvino-int8", "openvino", "int8", rel, "openvino",
                   ov_art["name"] if ov_art else ctx.onnx_art["name"])
    art["produced_by"] = ctx.produced_by("nncf.quantize (OpenVINO)", {"preset": "mixed", "method": method,
                                                                      "overflow_fix": OVERFLOW_FIX,
                                                                      "source": str(source.relative_to(ctx.manifest.dir))
                                                                      if source.is_relative_to(ctx.manifest.dir) else str(source),
                                                                      "ignored_onnx_nodes": q.float_nodes})
    art["fake_quantize_ops"] = count_fake_quantize(ctx.manifest.dir / rel)
    art["checks"] = {"unit_norm": unit_norm}
    from rdcd.fsutil import size_bytes

    art["size_bytes"] = size_bytes(out_dir)  # model.xml + model.bin
    if ctx.bench is not None:
        art["accuracy"] = accuracy_block(ctx.bench, fp32_uap, res.chosen.micro_ap, "openvino", False,
                                         threads=ctx.threads, **ctx.interval("openvino-fp32", res.chosen.path))
    if res.chosen.excluded:
        art["fallback_layers"] = list(res.chosen.excluded)
    return art, {"fallback": res.report(), "fp32_micro_ap": fp32_uap}


def _default_recipe():
    from rdcd.quantize.onnx_ptq import Recipe

    return Recipe()


def _coreml_targets(ctx: _Context, student, checkpoint: Path):
    from rdcd.quantize.coreml_ptq import (ACTIVATION_SCHEME, W8A8, SimEmbedder, coreml_available, make_static,
                                          mlpackage_facts, w8_from_mlmodel, w8_from_torch, w8_simulation)
    from rdcd.quantize.sensitivity import fallback_loop

    size = ctx.spec.size
    static, layer_paths = make_static(student, size)
    fp32_uap = ctx.uap(SimEmbedder(static), key="pytorch-fp32") if ctx.bench is not None else None
    ranking = [l for l in ctx.rank(_default_recipe()) if l in layer_paths] if ctx.bench is not None else []
    sims: dict[int, W8A8] = {}

    def build(excluded, i):
        sims[i] = W8A8(static, size, [layer_paths[l] for l in excluded]).calibrate(ctx.calib.images)
        return None

    steps_seen = []

    def measure_w8a8(_):
        i = len(steps_seen)
        steps_seen.append(i)
        return ctx.uap(sims[i].embedder(), key=("w8a8", i))

    res = fallback_loop(build, measure_w8a8, ranking, fp32_uap or 0.0, ctx.max_drop, ctx.max_steps, probe=2,
                        enabled=ctx.fallback, label="coreml-w8a8")
    chosen_i = res.chosen.call
    sim = sims[chosen_i]
    unit_norm = ctx.unit_norm(sim.embedder(), "coreml-w8a8 (simulated)")
    meta = {"rdcd.precision": "w8a8", "rdcd.input_size": str(size), "rdcd.dim": str(student.config.dim),
            "rdcd.preprocess": ctx.spec.to_dict()}
    pkg = ctx.manifest.dir / "model.w8a8.mlpackage"
    sim.convert(pkg, meta)
    sim_dir = ctx.manifest.dir / "model.w8a8.simulation"
    sim.save_simulation(sim_dir, {"checkpoint": str(checkpoint)})
    on_mac = coreml_available()
    fp_ml = _fp_artifact(ctx.manifest, "coreml", ("fp32", "fp16"))
    ref_name = fp_ml["name"] if fp_ml else ctx.onnx_art["name"]
    status, reason = ("ok", None) if on_mac else ("not_checkable", "Core ML prediction needs macOS: µAP simulated "
                                                  "in PyTorch (coremltools.optimize.torch)")
    arts = []
    w8a8 = ctx.base("coreml-w8a8", "coreml", "w8a8", pkg.name, "coreml", ref_name, status, reason)
    w8a8["produced_by"] = ctx.produced_by("coremltools.optimize.torch LinearQuantizer -> ct.convert (iOS17 mlprogram)",
                                          {"scheme": ACTIVATION_SCHEME, "observer": "min_max", "weights": "int8 per channel",
                                           "activations": "8-bit", "minimum_deployment_target": "iOS17",
                                           "checkpoint": str(checkpoint)})
    w8a8["mlpackage"] = mlpackage_facts(pkg)
    w8a8["checks"] = {"unit_norm": unit_norm}
    w8a8["simulation"] = {"path": sim_dir.name, "load": "rdcd.quantize.coreml_ptq.load_w8a8_simulation(student, path)"}
    if ctx.bench is not None:
        uap, runtime, simulated = res.chosen.micro_ap, "simulated in PyTorch (coremltools.optimize.torch)", True
        if on_mac:
            uap, runtime, simulated = _real_coreml_uap(ctx, pkg, "coreml-w8a8"), "coreml", False
        w8a8["accuracy"] = accuracy_block(ctx.bench, fp32_uap, uap, runtime, simulated,
                                          fp32_runtime="pytorch", simulated_micro_ap=round(res.chosen.micro_ap, 6),
                                          **ctx.interval("pytorch-fp32", "coreml-w8a8" if on_mac else ("w8a8", chosen_i)))
    if res.chosen.excluded:
        w8a8["fallback_layers"] = list(res.chosen.excluded)
    arts.append(w8a8)

    # weight-only W8
    w8_model = w8_simulation(static)
    w8_uap = ctx.uap(SimEmbedder(w8_model), key="w8") if ctx.bench is not None else None
    pkg8 = ctx.manifest.dir / "model.w8.mlpackage"
    source = "converted from the checkpoint"
    if fp_ml is not None:
        try:
            w8_from_mlmodel(ctx.manifest.resolve(fp_ml), pkg8)
            source = fp_ml["path"]
        except RdcdError as exc:
            log.warning("W8 from %s failed (%s): converting the checkpoint instead", fp_ml["path"], exc)
            fp_ml = None
    if fp_ml is None:
        w8_from_torch(static, size, pkg8, {**meta, "rdcd.precision": "w8"})
    w8 = ctx.base("coreml-w8", "coreml", "w8", pkg8.name, "coreml", ref_name, status, reason)
    w8["produced_by"] = ctx.produced_by("coremltools.optimize.coreml.linear_quantize_weights",
                                        {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel",
                                         "source": source})
    w8["mlpackage"] = mlpackage_facts(pkg8)
    if ctx.bench is not None:
        uap, runtime, simulated = w8_uap, "simulated in PyTorch (coremltools.optimize.torch PostTrainingQuantizer)", True
        if on_mac:
            uap, runtime, simulated = _real_coreml_uap(ctx, pkg8, "coreml-w8"), "coreml", False
        w8["accuracy"] = accuracy_block(ctx.bench, fp32_uap, uap, runtime, simulated, fp32_runtime="pytorch",
                                        simulated_micro_ap=round(w8_uap, 6),
                                        **ctx.interval("pytorch-fp32", "coreml-w8" if on_mac else "w8"))
    arts.append(w8)
    return arts, {"fp32_micro_ap_pytorch": fp32_uap, "w8a8_fallback": res.report(), "w8_micro_ap": w8_uap}


def _real_coreml_uap(ctx: _Context, pkg: Path, key: str) -> float:
    from rdcd.validate.runtimes import CoreMLRunner

    try:
        return ctx.uap(CoreMLRunner(pkg), key=key)
    except RuntimeUnavailable as exc:  # pragma: no cover - macOS only
        raise RdcdError(str(exc)) from None


def _r(v):
    return None if v is None else round(float(v), 6)
