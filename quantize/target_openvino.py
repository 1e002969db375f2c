"""``openvino-int8``: NNCF's OpenVINO quantization of the FP32 OpenVINO model (or of the ONNX model), with
the float nodes and the fallback layers of the ONNX quantizer kept float; µAP measured in OpenVINO."""

from __future__ import annotations

import logging
import shutil

from rdcd.fsutil import atomic_path
from rdcd.quantize.accuracy import accuracy_block
from rdcd.quantize.context import Context, default_recipe, fp_artifact

log = logging.getLogger("rdcd.quantize.api")


def openvino_int8(ctx: Context):
    """``openvino-int8`` (``openvino-int8/model.xml``), judged against the FP32 OpenVINO model's own µAP."""
    from rdcd.quantize.openvino_ptq import OVERFLOW_FIX, OpenVINOQuantizer, count_fake_quantize
    from rdcd.quantize.sensitivity import fallback_loop
    from rdcd.validate.runtimes import OpenVINORunner

    fp32_onnx, q = ctx.fp32_onnx, ctx.quantizer
    ov_art = fp_artifact(ctx.manifest, "openvino", ("fp32",))
    source = ctx.manifest.resolve(ov_art) if ov_art else fp32_onnx
    ovq = OpenVINOQuantizer(source, ctx.calib.images)
    method = "minmax" if (ctx.chosen_method or "minmax") != "percentile" else "percentile"
    fp32_uap = ctx.fp32_uap
    if ctx.bench is not None:
        fp32_uap = ctx.uap(OpenVINORunner(source, threads=ctx.threads), key="openvino-fp32")
    ranking = ctx.rank(default_recipe()) if ctx.bench is not None else []

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
    art["checks"] = {"unit_norm": unit_norm}  # sha256, size (model.xml + model.bin), content_sha256: Manifest.upsert
    if ctx.bench is not None:
        art["accuracy"] = accuracy_block(ctx.bench, fp32_uap, res.chosen.micro_ap, "openvino", False,
                                         threads=ctx.threads, **ctx.interval("openvino-fp32", res.chosen.path))
    if res.chosen.excluded:
        art["fallback_layers"] = list(res.chosen.excluded)
    return art, {"fallback": res.report(), "fp32_micro_ap": fp32_uap}
