"""The library API, chained as a user would script it: export a tiny trained student (rdcd.export), quantize
it with accuracy control (rdcd.quantize.quantize), gate it (rdcd.validate.gate) - real models, real runtimes."""

from __future__ import annotations

import json
import math

import pytest

from rdcd.errors import RdcdError

pytest.importorskip("onnxruntime")
pytest.importorskip("faiss")


def test_export_quantize_gate_chain(student_run, tiny_bench, skimage_dir, tmp_path):
    from rdcd.export import Options, export
    from rdcd.manifest import Manifest
    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize
    from rdcd.validate import GateConfig, gate

    out = tmp_path / "export"
    result = export(student_run, ["onnx"], out, Options(threads=1, command="test"))
    assert result.code == 0 and Manifest.load(out).get("onnx-fp32").status == "ok"

    result = quantize(out, skimage_dir, targets=["onnx"], recipe=QuantizeRecipe(method="minmax", calib_count=8),
                    accuracy=AccuracyControl(tiny_bench, max_drop=0.5, drop_type="relative", max_fallback_steps=1),
                    threads=1, codes=False, with_tensorrt=False)
    row = next(a for a in result.artifacts if a.name == "onnx-int8")
    acc = row.accuracy
    # a relative budget is a share of the FP32 µAP, recorded in µAP points on the row
    assert acc.max_drop == pytest.approx(0.5 * acc.fp32_micro_ap, abs=1e-6)
    assert not acc.over() and math.isfinite(acc.micro_ap)
    assert Manifest.load(out).get("onnx-int8") == row  # what quantize returned is what the manifest holds

    report = gate(tiny_bench, out, GateConfig(max_drop=0.5, drop_type="relative", threads=1, latency_iters=2,
                                              warmup=1, report=str(tmp_path / "report")))
    rows = {r["name"]: r for r in report["artifacts"]}
    assert report["gate"]["passed"] and set(rows) == {"onnx-fp32", "onnx-int8"}
    # the gate measures the same INT8 µAP the quantize stage recorded (same runtime, same benchmark)
    assert rows["onnx-int8"]["micro_ap"] == pytest.approx(acc.micro_ap, abs=1e-6)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["gate"]["passed"]

    # bad settings are bad input (exit 2), refused before any evaluation
    with pytest.raises(RdcdError, match="max-drop"):
        gate(tiny_bench, out, GateConfig(max_drop=-0.1, threads=1))
    with pytest.raises(RdcdError, match="drop_type"):
        quantize(out, skimage_dir, accuracy=AccuracyControl(tiny_bench, drop_type="percent"))
