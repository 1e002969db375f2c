"""The INT8 gate (``rdcd-validate [gate]``) on a real export directory: FP32 ONNX from the student
fixture, a good INT8 QDQ model and a deliberately broken one (both from onnxruntime's static
quantization on the tiny benchmark's training images), TensorRT / Core ML rows that cannot run here."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, make_exports, row, student_onnx

from rdcd.fsutil import sha256
from rdcd.validate.cli import main as validate_main

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def _quantize(src: Path, dst: Path, images: np.ndarray, exclude: list[str]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": im[None]} for im in images])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=exclude)
    return dst


@pytest.fixture(scope="module")
def models(student_run, tiny_bench, tmp_path_factory) -> dict[str, Path]:
    """FP32, good INT8 and broken INT8 ONNX models of the same student."""
    import onnx

    from rdcd.benchmark import load_benchmark
    from rdcd.preprocess import PreprocessSpec

    src = student_onnx(student_run)
    folder = tmp_path_factory.mktemp("int8")
    nodes = onnx.load(str(src)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    # Good: calibrated on real photos (the benchmark's training/ split), stem conv, head conv and the
    # projection kept in float (the sensitive ends of EfficientNet-Lite with an untrained head).
    calib = PreprocessSpec(size=TEST_SIZE).load_batch(load_benchmark(tiny_bench).training.paths)
    keep_float = [n.name for n in nodes if n.op_type == "Gemm"] + convs[:1] + convs[-1:]
    good = _quantize(src, folder / "model.int8.onnx", calib, keep_float)
    # Broken: "calibrated" on four flat grey frames, everything quantized: activation ranges are far too
    # narrow for real images, so most activations clip.
    broken = _quantize(src, folder / "broken.int8.onnx", np.full((4, TEST_SIZE, TEST_SIZE, 3), 128, np.uint8), [])
    return {"fp32": src, "int8": good, "broken": broken}


@pytest.fixture(scope="module")
def openvino_ir(models, tmp_path_factory) -> tuple[Path, Path]:
    """The FP32 model as OpenVINO IR (.xml + .bin), through OpenVINO's own converter."""
    ov = pytest.importorskip("openvino")
    xml = tmp_path_factory.mktemp("ir") / "model.xml"
    ov.save_model(ov.convert_model(str(models["fp32"])), str(xml), compress_to_fp16=False)
    return xml, xml.with_suffix(".bin")


FP32 = row("onnx-fp32", "onnx", "fp32", "model.onnx", "onnxruntime")
FAST = ["--latency-iters", "10", "--warmup", "2"]


def gate(*args: str) -> int:
    return validate_main([*args, *FAST])


def load(report: Path) -> tuple[dict, dict]:
    data = json.loads((report / "report.json").read_text())
    return data, {r["name"]: r for r in data["artifacts"]}


# ------------------------------------------------------------------------------------- pass / fail
def test_gate_passes_on_good_int8(models, openvino_ir, tiny_bench, tmp_path, capsys):
    xml, bin_ = openvino_ir
    exports = make_exports(tmp_path / "exports", [
        FP32,
        row("onnx-int8", "onnx", "int8", "model.int8.onnx", "onnxruntime", reference="onnx-fp32"),
        row("openvino-fp32", "openvino", "fp32", "model.xml", "openvino", reference="onnx-fp32"),
        # an engine built from the QDQ file (its reference: the QDQ artifact), not built here
        row("tensorrt-int8", "tensorrt", "int8", "model-int8.engine", "tensorrt", reference="onnx-int8",
            qdq_source="model.int8.onnx", status="not_checkable", reason="not built: no NVIDIA GPU/TensorRT here"),
    ], {"model.onnx": models["fp32"], "model.int8.onnx": models["int8"], "model.xml": xml, "model.bin": bin_})
    report = tmp_path / "report"
    assert gate("--benchmark", str(tiny_bench), "--exports", str(exports), "--max-drop", "0.01",
                "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert "onnx-int8" in out and "PASSED" in out

    data, rows = load(report)
    assert data["gate"]["passed"] is True
    fp32, int8 = rows["onnx-fp32"], rows["onnx-int8"]
    assert fp32["status"] == int8["status"] == "ok"
    assert 0 < fp32["micro_ap"] <= 1 and 0 <= int8["micro_ap"] <= 1
    assert int8["gated"] and int8["reference_micro_ap"] == pytest.approx(fp32["micro_ap"])
    assert int8["drop"] == pytest.approx(fp32["micro_ap"] - int8["micro_ap"]) and int8["drop"] <= 0.01
    assert int8["size_bytes"] < fp32["size_bytes"]
    for r in (fp32, int8):
        lat = r["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["throughput_ips"] > 0
        assert r["curve"]["recall"] and len(r["curve"]["recall"]) == len(r["curve"]["precision"])
    ov = rows["openvino-fp32"]
    assert ov["status"] == "ok" and ov["runtime"] == "openvino"
    assert ov["size_bytes"] == xml.stat().st_size + bin_.stat().st_size  # the IR is both files
    assert ov["micro_ap"] == pytest.approx(fp32["micro_ap"], abs=0.02)  # same graph, another runtime
    trt = rows["tensorrt-int8"]
    assert trt["status"] == "not_checkable" and trt["reason"] == "not built: no NVIDIA GPU/TensorRT here"
    assert trt["reference"] == "onnx-fp32"  # followed through the QDQ artifact to the float one
    assert data["gate"]["counts"] == {"ok": 3, "not_checkable": 1, "failed": 0}

    for name in ("pr_curve.png", "latency.png"):
        assert (report / name).read_bytes()[:8] == PNG and (report / name).stat().st_size > 5000
    md = (report / "report.md").read_text()
    assert "PASSED" in md and "| ✅ | onnx-int8 |" in md and "| ❎ | tensorrt-int8 |" in md
    assert "![precision-recall](pr_curve.png)" in md and "![latency p50](latency.png)" in md


def test_gate_fails_on_broken_int8(models, tiny_bench, tmp_path, capsys):
    exports = make_exports(tmp_path / "exports", [
        FP32, row("onnx-int8", "onnx", "int8", "broken.int8.onnx", "onnxruntime", reference="onnx-fp32"),
    ], {"model.onnx": models["fp32"], "broken.int8.onnx": models["broken"]})
    report = tmp_path / "report"
    assert gate("--benchmark", str(tiny_bench), "--exports", str(exports), "--report", str(report)) == 1
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()  # a progress line per evaluated artifact, then the verdict
    assert "gate failed: onnx-int8: µAP drop" in err[-1] and "Traceback" not in cap.err
    assert "❌" in cap.out and "FAILED" in cap.out
    data, rows = load(report)  # the report is written before the exit
    assert data["gate"]["passed"] is False
    bad = rows["onnx-int8"]
    assert bad["status"] == "failed" and bad["drop"] > 0.05, bad
    assert "FAILED" in (report / "report.md").read_text()

    # the threshold is what decides: a relative gate loose enough lets the same model through
    drop_rel = bad["drop"] / bad["reference_micro_ap"]
    loose = f"{min(0.99, drop_rel + 0.05):.3f}"
    assert gate("--benchmark", str(tiny_bench), "--exports", str(exports), "--drop-type", "relative",
                "--max-drop", loose) == 0
    assert "PASSED" in capsys.readouterr().out


# ------------------------------------------------------------------------- not checkable / required
def _tiny_mlpackage(path: Path) -> Path | None:
    """A real (tiny) Core ML image model: mean colour, L2-normalised."""
    try:
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
    except ImportError:
        return None

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, TEST_SIZE, TEST_SIZE))], opset_version=ct.target.iOS16)
    def prog(image):
        y = mb.reduce_mean(x=image, axes=[2, 3], keep_dims=False)
        return mb.real_div(x=y, y=mb.reduce_l2_norm(x=y, axes=[1], keep_dims=True), name="descriptor")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       inputs=[ct.ImageType(name="image", shape=(1, 3, TEST_SIZE, TEST_SIZE),
                                            color_layout=ct.colorlayout.RGB)])
    model.save(str(path))
    return path


def test_unrunnable_rows_are_not_checkable_and_require_fails(models, tiny_bench, tmp_path, capsys):
    rows = [FP32, row("tensorrt-fp16", "tensorrt", "fp16", "model-fp16.engine", "tensorrt", reference="onnx-fp32",
                      status="not_checkable", reason="not built: no NVIDIA GPU/TensorRT on this machine")]
    mlpackage = None
    if platform.system() != "Darwin":
        mlpackage = _tiny_mlpackage(tmp_path / "coreml.mlpackage")
    if mlpackage:
        rows.append(row("coreml-fp16", "coreml", "fp16", "coreml.mlpackage", "coreml", reference="onnx-fp32"))
    exports = make_exports(tmp_path / "exports", rows, {"model.onnx": models["fp32"]})
    if mlpackage:
        shutil.copytree(mlpackage, exports / "coreml.mlpackage")
    report = tmp_path / "report"
    args = ["--benchmark", str(tiny_bench), "--exports", str(exports), "--allow-empty"]
    # not checkable is not a failure by default, but it is listed as such, never as passing
    assert gate(*args, "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert "not checkable here" in out and "❎" in out
    data, by = load(report)
    assert by["tensorrt-fp16"]["status"] == "not_checkable" and "tensorrt" in by["tensorrt-fp16"]["reason"].lower()
    assert by["tensorrt-fp16"]["micro_ap"] is None and by["tensorrt-fp16"]["latency"] is None
    assert data["gate"]["counts"]["not_checkable"] == len(rows) - 1

    assert gate(*args, "--require", "tensorrt") == 1
    assert "required target tensorrt not checked" in capsys.readouterr().err
    assert gate(*args, "--require", "openvino") == 1  # required, but no artifact at all
    assert "required target openvino: no artifact" in capsys.readouterr().err
    if mlpackage:
        assert by["coreml-fp16"]["status"] == "not_checkable" and "macOS" in by["coreml-fp16"]["reason"]
        assert gate(*args, "--require", "coreml") == 1
        assert "required target coreml not checked" in capsys.readouterr().err


def test_simulated_core_ml_rows(tiny_bench, tmp_path, capsys):
    """Core ML W8A8/W8 µAP simulated in PyTorch by the quantize stage: shown (labelled) when measured on
    this benchmark, gated on its drop, ❎ either way (the runtime itself did not run)."""
    from rdcd.benchmark import load_benchmark

    gt = sha256(load_benchmark(tiny_bench).gt_path)

    def acc(micro_ap, gt_sha=gt):
        return {"benchmark": str(tiny_bench), "ground_truth_sha256": gt_sha, "fp32_micro_ap": 0.80,
                "micro_ap": micro_ap, "drop": 0.80 - micro_ap, "simulated": True,
                "runtime": "simulated in PyTorch (coremltools.optimize.torch)"}

    def coreml(name, precision, accuracy):
        return row(name, "coreml", precision, f"{name}.mlpackage", "coreml", status="not_checkable",
                   reason="Core ML prediction needs macOS", accuracy=accuracy)

    exports = make_exports(tmp_path / "ok", [coreml("coreml-w8a8", "w8a8", acc(0.796)),
                                             coreml("coreml-w8", "w8", acc(0.5, gt_sha="0" * 64))], {})
    report = tmp_path / "report"
    assert gate("--benchmark", str(tiny_bench), "--exports", str(exports), "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert "simulated in PyTorch" in out
    _, by = load(report)
    w8a8, w8 = by["coreml-w8a8"], by["coreml-w8"]
    assert w8a8["status"] == "not_checkable" and w8a8["simulated"] and w8a8["micro_ap"] == 0.796
    assert w8a8["drop"] == pytest.approx(0.004)
    assert w8["status"] == "not_checkable" and w8["micro_ap"] is None  # measured on another benchmark
    assert any("another benchmark" in n for n in w8["notes"])
    assert "0.7960 (sim.)" in (report / "report.md").read_text()

    bad = make_exports(tmp_path / "bad", [coreml("coreml-w8a8", "w8a8", acc(0.70))], {})
    assert gate("--benchmark", str(tiny_bench), "--exports", str(bad)) == 1
    assert "simulated µAP drop 0.1000 > max 0.005" in capsys.readouterr().err


def test_artifacts_that_fail_are_failures(models, tiny_bench, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx model")
    exports = make_exports(tmp_path / "exports", [
        row("onnx-int8", "onnx", "int8", "corrupt.onnx", "onnxruntime"),
        row("openvino-int8", "openvino", "int8", "missing.xml", "openvino"),
        row("coreml-fp16", "coreml", "fp16", "model.mlpackage", "coreml", status="failed",
            reason="conversion failed: unsupported op"),
        row("onnx-fp32", "onnx", "fp32", "model.onnx", "onnxruntime", input={"size": [48, 48]}),  # not its size
    ], {"corrupt.onnx": corrupt, "model.onnx": models["fp32"]})
    report = tmp_path / "report"
    assert gate("--benchmark", str(tiny_bench), "--exports", str(exports), "--report", str(report)) == 1
    capsys.readouterr()
    _, by = load(report)
    assert by["onnx-int8"]["status"] == "failed" and "cannot load" in by["onnx-int8"]["reason"]
    assert by["openvino-int8"]["status"] == "failed" and "file not found" in by["openvino-int8"]["reason"]
    assert by["coreml-fp16"]["status"] == "failed" and "unsupported op" in by["coreml-fp16"]["reason"]
    assert by["onnx-fp32"]["status"] == "failed" and "its manifest.json says 48" in by["onnx-fp32"]["reason"]


# ------------------------------------------------------------------------------------- bad usage
def _one_line_exit_2(capsys, *args: str) -> str:
    assert validate_main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_usage_exits_2(tiny_bench, tmp_path, capsys):
    b = ["--benchmark", str(tiny_bench)]
    # missing --exports: argparse's usage error through the real console script
    proc = subprocess.run([sys.executable, "-m", "rdcd.validate.cli", *b], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--exports" in proc.stderr and "Traceback" not in proc.stderr

    assert "export directory not found" in _one_line_exit_2(capsys, *b, "--exports", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no manifest.json" in _one_line_exit_2(capsys, *b, "--exports", str(empty))
    (empty / "manifest.json").write_text("{not json")
    assert "malformed" in _one_line_exit_2(capsys, *b, "--exports", str(empty))
    (empty / "manifest.json").write_text(json.dumps({"artifacts": [{"name": "x", "target": "onnx"}]}))
    assert "lacks" in _one_line_exit_2(capsys, *b, "--exports", str(empty))
    ex = make_exports(tmp_path / "ex", [row("a", "onnx", "fp32", "a.onnx", "onnxruntime")], {})
    data = json.loads((ex / "manifest.json").read_text())
    data["artifacts"][0]["precision"] = "int4"  # written by hand: Manifest.upsert refuses it
    (ex / "manifest.json").write_text(json.dumps(data))
    assert "precision 'int4'" in _one_line_exit_2(capsys, *b, "--exports", str(ex))
    data["artifacts"][0].update(precision="int8", reference="ghost")  # Manifest.save refuses a dangling reference
    (ex / "manifest.json").write_text(json.dumps(data))
    assert "reference 'ghost'" in _one_line_exit_2(capsys, *b, "--exports", str(ex))
    ex = make_exports(tmp_path / "ex3", [], {})
    assert "no artifacts" in _one_line_exit_2(capsys, *b, "--exports", str(ex))

    good = make_exports(tmp_path / "ex4", [row("a", "onnx", "fp32", "a.onnx", "onnxruntime")], {})
    assert "benchmark not found" in _one_line_exit_2(capsys, "--benchmark", str(tmp_path / "nb"), "--exports", str(good))
    assert "--max-drop" in _one_line_exit_2(capsys, *b, "--exports", str(good), "--max-drop", "-0.1")
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"hello": 1}))
    assert "not an rdcd-bench result" in _one_line_exit_2(capsys, *b, "--exports", str(good), "--bench-json", str(junk))
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"schema": "rdcd-bench/1", "latency_ms": {"p50": 1.0},
                                 "model": {"name": "other.onnx", "sha256": "0" * 64}}))
    assert "matches no artifact" in _one_line_exit_2(capsys, *b, "--exports", str(good), "--bench-json", str(stray))
    assert "unknown sub-command" in _one_line_exit_2(capsys, "gates", *b)
    with pytest.raises(SystemExit) as e:  # argparse: an unknown --require target
        validate_main([*b, "--exports", str(good), "--require", "tflite"])
    assert e.value.code == 2
