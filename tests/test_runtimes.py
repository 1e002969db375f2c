"""The validate layer after issue 12: one onnxruntime runner (also the QDQ "reference" session rdcd-quantize
uses), one uint8 -> float conversion, one reading of a manifest's input size, the gate in pieces that keep
their old import paths, and no torch in any of the torch-free modules. Real models, real sessions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rdcd.errors import RdcdError
from rdcd.preprocess import PreprocessSpec, to_float_nchw

REPO = Path(__file__).resolve().parents[1]
SIZE = 24


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A small uint8 NHWC descriptor CNN (FP32) and its static QDQ INT8 version (onnxruntime's quantizer)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w2")
    scale = numpy_helper.from_array(np.asarray(1 / 255, np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "scale"], ["s"]),
         helper.make_node("Transpose", ["s"], ["x"], perm=[0, 3, 1, 2]),
         helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
         helper.make_node("Flatten", ["g"], ["v"]),
         helper.make_node("LpNormalization", ["v"], ["descriptor"], axis=1, p=2)],
        "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 16])],
        initializer=[w1, w2, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    fp32, qdq = folder / "tiny.onnx", folder / "tiny.int8.onnx"
    onnx.save(model, str(fp32))

    class Calib(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)}
                                 for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(qdq), Calib(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv"])
    return fp32, qdq


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_models(tmp_path_factory.mktemp("tiny-models"))


def test_one_onnxruntime_runner_also_runs_qdq_as_reference(models):
    """OnnxRuntimeRunner (the one onnxruntime runner; rdcd-quantize's former OrtEmbedder) in both modes: the
    optimised session (integer kernels) and the reference one (float semantics, TensorRT's prediction)."""
    from rdcd.validate.runtimes import OnnxRuntimeRunner, load_runner

    import onnx

    fp32, qdq = models
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(qdq)).graph.node}
    batch = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    for path in (fp32, qdq):
        for reference in (False, True):
            out = OnnxRuntimeRunner(path, threads=1, reference=reference)(batch)
            assert out.dtype == np.float32 and out.shape == (3, 16) and np.isfinite(out).all()
    # the gate's default (optimised) session is unchanged: load_runner gives the same numbers
    np.testing.assert_array_equal(load_runner(qdq, threads=1)(batch), OnnxRuntimeRunner(qdq, threads=1)(batch))
    # the reference session really is another session: integer kernels vs float QDQ semantics differ a little
    ref = OnnxRuntimeRunner(qdq, threads=1, reference=True)
    assert ref.reference and ref.describe()["runtime"] == "onnxruntime"
    assert np.abs(ref(batch) - OnnxRuntimeRunner(fp32, threads=1)(batch)).max() < 0.2


def test_runner_refuses_float_inputs_and_missing_files(tmp_path, models):
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    with pytest.raises(RdcdError, match="not found"):
        OnnxRuntimeRunner(tmp_path / "absent.onnx")
    runner = OnnxRuntimeRunner(models[0], threads=1)
    with pytest.raises(RdcdError, match="uint8 NHWC"):
        runner(np.zeros((1, SIZE, SIZE), np.uint8))


def test_one_uint8_to_float_conversion():
    torch = pytest.importorskip("torch")
    batch = np.random.default_rng(2).integers(0, 256, (2, 17, 19, 3), dtype=np.uint8)
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0  # what the torch embedders do
    x = to_float_nchw(batch)
    assert x.dtype == np.float32 and x.shape == (2, 3, 17, 19) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, t.numpy())
    spec = PreprocessSpec(size=17)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    np.testing.assert_array_equal(spec.normalize(batch), ((t - mean) / std).numpy())
    np.testing.assert_array_equal(to_float_nchw(batch, spec.mean, spec.std), spec.normalize(batch))


def _manifest(pre: dict, inp: dict):
    from rdcd.manifest import Manifest

    row = {"name": "a", "target": "onnx", "precision": "fp32", "path": "m.onnx", "runtime": "onnxruntime",
           "input": inp, "output": {"dim": 8}, "produced_by": {}, "status": "ok"}
    return Manifest.from_dict(".", {"preprocess": pre, "artifacts": [row]}, "m.json")


@pytest.mark.parametrize("pre, inp, size", [
    ({"size": 96}, {"size": [64, 64]}, 64),
    ({"size": 96}, {"size": 80}, 80),  # older manifests wrote one number
    ({"size": 96}, {}, 96),
    ({}, {}, None),
])
def test_manifest_input_size(pre, inp, size):
    m = _manifest(pre, inp)
    assert m.input_size(m.get("a")) == size and m.input_size() == pre.get("size")


@pytest.mark.parametrize("pre, inp, says", [
    ({"size": "big"}, {}, "preprocess size"),
    ({}, {"size": ["x", "x"]}, "input size must be"),
    ({}, {"size": "x"}, "input size must be"),
    ({}, [96], "input must be an object"),
])
def test_manifest_input_size_malformed_is_one_clear_error(pre, inp, says):
    with pytest.raises(RdcdError, match=rf"malformed \S*\.json: .*{says}"):
        m = _manifest(pre, inp)
        m.input_size(m.get("a"))


def test_measure_latency_has_no_gpu_hook(models):
    from rdcd.validate.bench import measure_latency
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(models[0], threads=1)
    m = measure_latency(runner, np.zeros((1, SIZE, SIZE, 3), np.uint8), warmup=1, iters=3)
    assert set(m) == {"latency_ms", "throughput_ips"} and m["latency_ms"]["n"] == 3


def test_runner_modules_import_without_torch():
    """The runners, the gate's pieces and the bench import, and none of them pulls in torch."""
    code = textwrap.dedent("""
        import sys
        from rdcd.validate.runtimes import CoreMLRunner, OnnxRuntimeRunner, OpenVINORunner, TensorRTRunner, load_runner
        from rdcd.validate.cuda import cuda_devices
        from rdcd.validate.device import device_info
        from rdcd.validate.int8_gate import build_parser, gate_main, merge_main
        from rdcd.validate.gate_reference import FAILED, NOT_CHECKABLE, OK, SIMULATED
        from rdcd.manifest import QUANTIZED
        from rdcd.validate.gate_rows import evaluate_manifest
        import rdcd.validate.bench, rdcd.validate.cuda, rdcd.validate.device, rdcd.validate.gate_rows
        import rdcd.validate.gate_reference, rdcd.validate.evaluate, rdcd.validate.models, rdcd.preprocess
        from rdcd.validate.bench import measure_latency
        from rdcd.validate.artifact_input import artifact_input, pick_row
        import rdcd.validate.index_inputs, rdcd.validate.index_cli
        from rdcd.manifest import Artifact, Manifest
        from rdcd.targets import REGISTRY, for_file
        assert for_file(".onnx").function("runner") is OnnxRuntimeRunner
        assert QUANTIZED == ("int8", "w8a8", "w8") and (OK, NOT_CHECKABLE, FAILED) == ("ok", "not_checkable", "failed")
        n, why = cuda_devices()
        assert isinstance(n, int) and (n or why)
        assert device_info()["cpu_count"] >= 1
        assert not hasattr(rdcd.validate.evaluate, "evaluate_embedder")
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
