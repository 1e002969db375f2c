"""``coreml-w8a8`` (coremltools.optimize.torch W8A8 of the PyTorch student, converted to an iOS17 mlprogram)
and ``coreml-w8`` (weight-only int8), in ``coreml/`` beside the float packages (:data:`rdcd.artifact.LAYOUT`), the
W8A8 simulation in :data:`~rdcd.artifact.COREML_SIMULATION`; µAP in Core ML on macOS, else simulated in PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

from rdcd.artifact import COREML_SIMULATION, layout_path
from rdcd.errors import RdcdError, RuntimeUnavailable
from rdcd.quantize.accuracy import accuracy_block
from rdcd.quantize.context import Context, default_recipe

log = logging.getLogger("rdcd.quantize.api")


def coreml_w8a8_w8(ctx: Context):
    """``coreml-w8a8`` (with its fallback loop, judged against the PyTorch FP32 student) and ``coreml-w8``."""
    from rdcd.quantize.coreml_ptq import (ACTIVATION_SCHEME, W8A8, SimEmbedder, coreml_available, make_static,
                                          mlpackage_facts, w8_from_mlmodel, w8_from_torch, w8_simulation)
    from rdcd.quantize.sensitivity import fallback_loop

    student, checkpoint = ctx.student, ctx.checkpoint
    size = ctx.spec.size
    static, layer_paths = make_static(student, size)
    fp32_uap = ctx.uap(SimEmbedder(static), key="pytorch-fp32") if ctx.bench is not None else None
    ranking = [l for l in ctx.rank(default_recipe()) if l in layer_paths] if ctx.bench is not None else []
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
    rel = layout_path("coreml", "w8a8")
    pkg = ctx.manifest.dir / rel
    sim.convert(pkg, meta)
    sim.save_simulation(ctx.manifest.dir / COREML_SIMULATION, {"checkpoint": str(checkpoint)})
    on_mac = coreml_available()
    fp_ml = ctx.manifest.find("coreml", ("fp32", "fp16"))
    ref_name = fp_ml.name if fp_ml else ctx.onnx_art.name
    status, reason = ("ok", None) if on_mac else ("not_checkable", "Core ML prediction needs macOS: µAP simulated "
                                                  "in PyTorch (coremltools.optimize.torch)")
    arts = []
    w8a8 = ctx.base("coreml", "w8a8", ref_name, status, reason)
    w8a8.produced_by = ctx.produced_by("coremltools.optimize.torch LinearQuantizer -> ct.convert (iOS17 mlprogram)",
                                       {"scheme": ACTIVATION_SCHEME, "observer": "min_max", "weights": "int8 per channel",
                                        "activations": "8-bit", "minimum_deployment_target": "iOS17",
                                        "checkpoint": str(checkpoint)})
    w8a8.mlpackage = mlpackage_facts(pkg)
    w8a8.checks = {"unit_norm": unit_norm}
    w8a8.simulation = {"path": COREML_SIMULATION, "load": "rdcd.quantize.coreml_ptq.load_w8a8_simulation(student, path)"}
    if ctx.bench is not None:
        uap, runtime, simulated = res.chosen.micro_ap, "simulated in PyTorch (coremltools.optimize.torch)", True
        if on_mac:
            uap, runtime, simulated = real_coreml_uap(ctx, pkg, "coreml-w8a8"), "coreml", False
        w8a8.accuracy = accuracy_block(ctx.bench, fp32_uap, uap, runtime, simulated,
                                       fp32_runtime="pytorch", simulated_micro_ap=round(res.chosen.micro_ap, 6),
                                       **ctx.interval("pytorch-fp32", "coreml-w8a8" if on_mac else ("w8a8", chosen_i)))
    if res.chosen.excluded:
        w8a8.fallback_layers = list(res.chosen.excluded)
    arts.append(w8a8)

    # weight-only W8
    w8_model = w8_simulation(static)
    w8_uap = ctx.uap(SimEmbedder(w8_model), key="w8") if ctx.bench is not None else None
    rel8 = layout_path("coreml", "w8")
    pkg8 = ctx.manifest.dir / rel8
    source = "converted from the checkpoint"
    if fp_ml is not None:
        try:
            w8_from_mlmodel(ctx.manifest.resolve(fp_ml), pkg8)
            source = fp_ml.path
        except RdcdError as exc:
            log.warning("W8 from %s failed (%s): converting the checkpoint instead", fp_ml.path, exc)
            fp_ml = None
    if fp_ml is None:
        w8_from_torch(static, size, pkg8, {**meta, "rdcd.precision": "w8"})
    w8 = ctx.base("coreml", "w8", ref_name, status, reason)
    w8.produced_by = ctx.produced_by("coremltools.optimize.coreml.linear_quantize_weights",
                                     {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel",
                                      "source": source})
    w8.mlpackage = mlpackage_facts(pkg8)
    if ctx.bench is not None:
        uap, runtime, simulated = w8_uap, "simulated in PyTorch (coremltools.optimize.torch PostTrainingQuantizer)", True
        if on_mac:
            uap, runtime, simulated = real_coreml_uap(ctx, pkg8, "coreml-w8"), "coreml", False
        w8.accuracy = accuracy_block(ctx.bench, fp32_uap, uap, runtime, simulated, fp32_runtime="pytorch",
                                     simulated_micro_ap=round(w8_uap, 6),
                                     **ctx.interval("pytorch-fp32", "coreml-w8" if on_mac else "w8"))
    arts.append(w8)
    return arts, {"fp32_micro_ap_pytorch": fp32_uap, "w8a8_fallback": res.report(), "w8_micro_ap": w8_uap}


def real_coreml_uap(ctx: Context, pkg: Path, key: str) -> float:
    from rdcd.validate.runtimes import CoreMLRunner

    try:
        return ctx.uap(CoreMLRunner(pkg), key=key)
    except RuntimeUnavailable as exc:  # pragma: no cover - macOS only
        raise RdcdError(str(exc)) from None
