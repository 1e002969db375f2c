"""``openvino-int8``: NNCF's OpenVINO quantization of the FP32 OpenVINO model (or of the ONNX model), with
the float nodes and the fallback layers of the ONNX quantizer kept float; µAP measured in OpenVINO."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rdcd.artifact import layout_path
from rdcd.fsutil import atomic_path
from rdcd.quantize.accuracy import accuracy_block
from rdcd.quantize.context import Context, default_recipe

log = logging.getLogger("rdcd.quantize.api")


def openvino_int8(ctx: Context):
    """``openvino-int8`` (``openvino/model-int8.xml`` + ``.bin``), judged against the FP32 OpenVINO model's own µAP."""
    from rdcd.quantize.openvino_ptq import OVERFLOW_FIX, OpenVINOQuantizer, count_fake_quantize
    from rdcd.quantize.sensitivity import fallback_loop
    from rdcd.validate.runtimes import OpenVINORunner

    fp32_onnx, q = ctx.fp32_onnx, ctx.quantizer
    ov_art = ctx.manifest.find("openvino", ("fp32",))
    source = ctx.manifest.resolve(ov_art) if ov_art else fp32_onnx
    ovq = OpenVINOQuantizer(source, ctx.calib.images)
    method = "minmax" if (ctx.chosen_method or "minmax") != "percentile" else "percentile"
    rel = layout_path("openvino", "int8")
    xml = ctx.manifest.dir / rel
    fp32_uap = ctx.fp32_uap
    if ctx.bench is not None:
        fp32_uap = ctx.uap(OpenVINORunner(source, threads=ctx.threads), key="openvino-fp32")
    ranking = ctx.rank(default_recipe()) if ctx.bench is not None else []

    def build(excluded, i):
        out = ctx.work / f"ov-step{i}" / xml.name
        return ovq.quantize(out, q.float_nodes + q.node_names(excluded), method)

    res = fallback_loop(build, lambda p: ctx.uap(OpenVINORunner(p, threads=ctx.threads), key=p), ranking,
                        fp32_uap or 0.0, ctx.max_drop, ctx.max_steps, enabled=ctx.fallback, label="openvino-int8")
    unit_norm = ctx.unit_norm(OpenVINORunner(res.chosen.path, threads=ctx.threads), "openvino-int8")
    for src in (res.chosen.path.with_suffix(".bin"), res.chosen.path):  # the .bin first: OpenVINO reads it beside the .xml
        with atomic_path(xml.with_suffix(src.suffix)) as tmp:
            shutil.copyfile(src, tmp)
    art = ctx.base("openvino", "int8", ov_art.name if ov_art else ctx.onnx_art.name)
    art.produced_by = ctx.produced_by("nncf.quantize (OpenVINO)", {"preset": "mixed", "method": method,
                                                                   "overflow_fix": OVERFLOW_FIX,
                                                                   "source": str(source.relative_to(ctx.manifest.dir))
                                                                   if source.is_relative_to(ctx.manifest.dir) else str(source),
                                                                   "ignored_onnx_nodes": q.float_nodes})
    art.weights_file = str(Path(rel).with_suffix(".bin"))  # as the FP32/FP16 rows record theirs
    art.fake_quantize_ops = count_fake_quantize(xml)
    art.checks = {"unit_norm": unit_norm}  # sha256, size (.xml + .bin), content_sha256: Manifest.upsert
    if ctx.bench is not None:
        art.accuracy = accuracy_block(ctx.bench, fp32_uap, res.chosen.micro_ap, "openvino", False,
                                      threads=ctx.threads, **ctx.interval("openvino-fp32", res.chosen.path))
    if res.chosen.excluded:
        art.fallback_layers = list(res.chosen.excluded)
    return art, {"fallback": res.report(), "fp32_micro_ap": fp32_uap}
