"""rdcd-export's failures (one target failing, parity, bad input: exit 1 / 2 with one line) and ``--int8``,
which runs the real quantize stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fake_trtexec

from rdcd.export.cli import main
from rdcd.manifest import Manifest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _photos(skimage_dir: Path, n: int) -> list[Path]:
    from rdcd.validate.demo import SKIMAGE_PHOTOS

    return [skimage_dir / p for p in SKIMAGE_PHOTOS if (skimage_dir / p).is_file()][:n]


# ------------------------------------------------------------------------------ failures
def test_one_failing_target_does_not_stop_the_others(tiny_teacher, tmp_path):
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "openvino").write_text("a file where the OpenVINO folder should go")
    code = main(["--teacher", str(tiny_teacher), "--target", "openvino,onnx,tensorrt", "--size", "64",
                 "--out", str(out)])
    assert code == 1
    man = Manifest.load(out)
    assert man.get("onnx-fp32").status == "ok"
    assert man.get("openvino-fp32").status == man.get("openvino-fp16").status == "failed"
    assert man.get("openvino-fp32").reason
    assert man.get("tensorrt-fp16").status in ("ok", "not_checkable")
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
    assert art.status == "failed" and "parity" in art.reason and art.parity["min_cos"] < 0.999


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


def test_int8_quantizes_once_without_tensorrt(tiny_teacher, tmp_path, skimage_dir):
    from rdcd.export import Options, export
    from rdcd.export.source import teacher_source

    result = export(teacher_source(str(tiny_teacher), size=64), ["onnx"], tmp_path / "o",
                    Options(int8=True, calib=_calib(tmp_path, skimage_dir), calib_count=4, threads=1))
    assert result.code == 0
    assert [n for n in result.notes if n.startswith("int8:")] == ["int8: rdcd.quantize.quantize ran for onnx"]
    assert result.manifest.get("onnx-int8").status == "ok"


def test_int8_runs_the_quantize_stage(tiny_teacher, tmp_path, skimage_dir):
    """--int8 runs rdcd.quantize (the real one) on the targets exported here: its onnx-int8 and tensorrt-int8
    rows, and the one build script with the INT8 engine's line."""
    calib = _calib(tmp_path, skimage_dir)
    out = tmp_path / "int8"
    assert main(["--teacher", str(tiny_teacher), "--target", "onnx,tensorrt,coreml", "--size", "64", "--int8",
                 "--calib-dir", str(calib), "--calib-count", "4", "--out", str(out)]) == 0
    man = Manifest.load(out)
    names = [a.name for a in man.artifacts]
    assert "coreml-w8a8" not in names and "coreml-w8" not in names  # Core ML INT8 needs a student checkpoint
    onnx = man.get("onnx-int8")
    assert onnx.status == "ok" and onnx.produced_by.tool.startswith("onnxruntime.quantization")
    assert onnx.qdq["quantize_linear"] > 0 and (out / onnx.path).is_file()
    row = man.get("tensorrt-int8")  # the engine is built on the device: its QDQ source is here
    assert row.path == "tensorrt/model-int8.engine" and row.status == "not_checkable"
    assert (out / row.qdq_source).is_file() and row.engine_built is False
    int8_line = ("trtexec --onnx=model-int8.onnx --saveEngine=model-int8.engine --int8 --fp16 "
                 "--minShapes=image:1x64x64x3 --optShapes=image:8x64x64x3 --maxShapes=image:8x64x64x3")
    assert int8_line in _script_calls(tmp_path, out / "tensorrt" / "build_engine.sh")
    assert any("--stronglyTyped" in c for c in _script_calls(tmp_path, out / "tensorrt" / "build_engine.sh", "110000"))
