"""TensorRT INT8 end to end, with TensorRT absent: a real tiny student through ``rdcd-export --target
onnx,tensorrt`` and ``rdcd-quantize --target tensorrt``: the ``tensorrt-int8`` manifest row (engine path,
its QDQ source), the one ``build_engine.sh``, and the gate (never ✅ for an engine that does not exist)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, fake_trtexec

from rdcd.export import tensorrt as T
from rdcd.fsutil import sha256
from rdcd.manifest import Artifact, Manifest, replace

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

if T.availability()[0]:  # pragma: no cover - a machine with TensorRT and a GPU builds the engines instead
    pytest.skip("TensorRT and a CUDA device are present: these tests cover the machine without them",
                allow_module_level=True)

BATCH = 4  # not the default (8): the INT8 engine must take the export's profile


@pytest.fixture(scope="module")
def exports(student_run, tiny_bench, tmp_path_factory) -> Path:
    from rdcd.export.cli import main as export_main
    from rdcd.quantize.cli import main as quantize_main

    root = tmp_path_factory.mktemp("trt")
    parity = root / "parity"
    parity.mkdir()
    for p in sorted((tiny_bench / "training").iterdir())[:4]:
        shutil.copy(p, parity / p.name)
    out = root / "exp"
    assert export_main(["--checkpoint", str(student_run), "--target", "onnx,tensorrt", "--batch", str(BATCH),
                        "--parity-images", str(parity), "--out", str(out)]) == 0
    (out / "tensorrt" / "build_engine_int8.sh").write_text("# the second script of older versions\n")
    assert quantize_main(["--exports", str(out), "--calib-dir", str(tiny_bench / "training"), "--calib-count", "8",
                          "--benchmark", str(tiny_bench), "--target", "tensorrt", "--method", "minmax",
                          "--no-fallback", "--no-codes", "--max-drop", "0.9"]) == 0
    return out


def _row(out: Path, name: str = "tensorrt-int8") -> Artifact:
    return Manifest.load(out).get(name)


def test_manifest_row_engine_and_qdq_source(exports, tiny_bench):
    from rdcd.quantize.qdq_graph import check_qdq
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    man = Manifest.load(exports)
    assert [a.name for a in man.artifacts if a.target == "tensorrt"] == ["tensorrt-fp16", "tensorrt-int8"]
    assert man.tensorrt == {"batch": BATCH} and T.profile_batch(man) == BATCH
    art = man.get("tensorrt-int8")
    # path is the engine, which is not there; its QDQ source is
    assert art.path == "tensorrt/model-int8.engine" and art.runtime == "tensorrt" and art.precision == "int8"
    assert not (exports / art.path).exists() and art.engine_built is False
    assert all(v is None for v in (art.sha256, art.size_bytes, art.engine_path, art.build))
    assert art.qdq_source == "tensorrt/model-int8.onnx"
    qdq = exports / art.qdq_source
    assert qdq.is_file() and art.qdq_sha256 == sha256(qdq)
    # never ok for an engine that does not exist: not checkable, with the reason
    assert art.status == "not_checkable"
    assert art.reason.startswith(T.NOT_BUILT) and "tensorrt/build_engine.sh" in art.reason
    assert "tensorrt is not installed" in art.reason
    # the QDQ model: valid ONNX, uint8 image in, symmetric int8 activations (zero point 0), per-channel weights
    model = onnx.load(str(qdq))
    onnx.checker.check_model(model)
    facts = check_qdq(qdq)
    assert facts == art.qdq
    assert facts["activation_zero_points"] == [0] and facts["activation_dtypes"] == ["int8"]
    assert facts["input_dtype"] == "UINT8" and facts["quantized_layers"] > 20 and facts["per_channel_weights"] > 20
    out = OnnxRuntimeRunner(qdq, threads=1, reference=True)(np.zeros((2, TEST_SIZE, TEST_SIZE, 3), np.uint8))
    assert out.shape == (2, 128) and np.isfinite(out).all()
    # the same batch profile as the FP16 engine
    opts, fp16 = art.produced_by.options, man.get("tensorrt-fp16").produced_by.options
    assert (opts["min_batch"], opts["opt_batch"], opts["max_batch"]) == (1, BATCH, BATCH)
    assert all(fp16[k] == opts[k] for k in ("min_batch", "opt_batch", "max_batch"))
    assert art.input.shape == [f"1..{BATCH}", TEST_SIZE, TEST_SIZE, 3]
    assert opts["calibration_cache"] is None and opts["activations"] == "symmetric"
    assert art.produced_by.command.startswith("rdcd-quantize ")
    # accuracy: the ONNX Runtime QDQ-reference prediction, marked as simulated
    acc = art.accuracy
    assert acc.simulated is True and "TensorRT INT8 prediction" in acc.runtime
    assert acc.prediction_micro_ap == acc.micro_ap and 0 <= acc.micro_ap <= 1
    assert acc.ground_truth_sha256 == sha256(tiny_bench / "ground_truth.csv")


def _script_calls(script: Path, tmp_path: Path, version: str) -> list[str]:
    log = tmp_path / f"calls-{version}.txt"
    env = fake_trtexec(tmp_path / f"bin-{version}", version, log)
    subprocess.run(["sh", str(script)], check=True, env=env, cwd=tmp_path, capture_output=True)
    return log.read_text().splitlines()


def test_one_build_script_with_both_branches(exports, tmp_path):
    tdir = exports / "tensorrt"
    assert not list(exports.rglob("build_engine_int8.sh"))
    assert sorted(p.name for p in tdir.glob("*.sh")) == ["build_engine.sh"]
    script = tdir / "build_engine.sh"
    assert os.access(script, os.X_OK)
    man = Manifest.load(exports)
    fp16, int8 = man.get("tensorrt-fp16").produced_by, man.get("tensorrt-int8")
    shapes = " ".join(T.shape_args(TEST_SIZE, BATCH))
    # TensorRT 10 (weak typing): --fp16 on model.onnx, --int8 --fp16 on the QDQ model
    ten = _script_calls(script, tmp_path, "100300")
    assert ten == [fp16.command, int8.command]
    assert ten[1] == f"trtexec --onnx=model-int8.onnx --saveEngine=model-int8.engine --int8 --fp16 {shapes}"
    # TensorRT 11 (strongly typed): the precision comes from the graphs
    eleven = _script_calls(script, tmp_path, "110000")
    assert eleven == [fp16.options["command_strongly_typed"], int8.produced_by.options["command_strongly_typed"]]
    assert eleven[1] == f"trtexec --onnx=model-int8.onnx --saveEngine=model-int8.engine --stronglyTyped {shapes}"
    assert all(line.endswith(shapes) for line in ten + eleven)  # one batch range for FP16 and INT8
    # the INT8 line reads the row's QDQ source, relative to tensorrt/
    assert (exports / int8.qdq_source) == tdir / "model-int8.onnx"


def test_reexport_keeps_one_int8_row_and_script(exports, student_run, tmp_path):
    from rdcd.export.cli import main as export_main

    out = tmp_path / "exp"
    shutil.copytree(exports, out)
    before = _row(out)
    assert export_main(["--checkpoint", str(student_run), "--target", "tensorrt", "--batch", str(BATCH),
                        "--parity-images", str(exports.parent / "parity"), "--out", str(out)]) == 0
    man = Manifest.load(out)
    assert [a.name for a in man.artifacts if a.precision == "int8"] == ["tensorrt-int8"]
    assert man.get("tensorrt-int8") == before  # the quantize stage's row, untouched
    text = (out / "tensorrt" / "build_engine.sh").read_text()
    assert text.count("--onnx=model-int8.onnx") == 2 and text.count("--onnx=model.onnx") == 1


def _gate_args(*extra: str) -> argparse.Namespace:
    from rdcd.validate.int8_gate import build_parser

    return build_parser().parse_args(["--benchmark", "b", "--exports", "e", "--latency-iters", "5", "--warmup", "1",
                                      *extra])


def test_gate_never_passes_a_missing_engine(exports, tiny_bench, capsys):
    from rdcd.validate.cli import main as validate_main

    # the tiny benchmark's 28 pairs cannot resolve the default 0.005 budget: this test is about engines, not drops
    args = ["--benchmark", str(tiny_bench), "--exports", str(exports), "--latency-iters", "5", "--warmup", "1",
            "--max-drop", "0.01"]
    assert validate_main([*args, "--report", str(exports.parent / "report")]) == 0
    rows = {r["name"]: r for r in json.loads((exports.parent / "report" / "report.json").read_text())["artifacts"]}
    trt = rows["tensorrt-int8"]
    assert trt["status"] == "not_checkable" and trt["reason"].startswith(T.NOT_BUILT)
    assert trt["path"] == "tensorrt/model-int8.engine" and trt["sha256"] is None
    assert trt["simulated"] is True and trt["micro_ap"] == _row(exports).accuracy.micro_ap
    assert rows["onnx-fp32"]["status"] == "ok"
    capsys.readouterr()
    assert validate_main([*args, "--require", "tensorrt"]) == 1
    assert "required target tensorrt not checked" in capsys.readouterr().err


def test_gate_engine_rows_ok_claims_and_old_manifests(exports, tiny_bench, tmp_path, monkeypatch):
    """A row that claims ok for a missing engine fails; an old row (path = the QDQ model) is read as the QDQ
    source of an engine that was not built; an engine that exists is handed to TensorRT, never the .onnx."""
    import rdcd.validate.runtimes as rt
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.int8_gate import evaluate_manifest

    out = tmp_path / "exp"
    shutil.copytree(exports, out)
    man = Manifest.load(out)
    new = man.get("tensorrt-int8")
    claims_ok = replace(new, name="claims-ok", status="ok", reason=None)
    old = replace(new, name="old-format", path="tensorrt/model-int8.onnx", engine_path="tensorrt/model-int8.engine",
                  sha256=new.qdq_sha256, reason="engine not built here: no TensorRT/NVIDIA GPU on this machine",
                  qdq_source=None, qdq_sha256=None, engine_built=None)
    old_ok = replace(old, name="old-format-ok", status="ok")
    man.artifacts = [claims_ok, old, old_ok]
    calls = []
    real = rt.load_runner
    monkeypatch.setattr(rt, "load_runner", lambda path, **kw: calls.append((Path(path).name, kw)) or real(path, **kw))
    bench = load_benchmark(tiny_bench)  # 28 pairs: the 0.01 budget (not the default 0.005) keeps drops out of it
    rows = {r["name"]: r for r in evaluate_manifest(bench, man, _gate_args("--max-drop", "0.01"))["rows"]}
    assert rows["claims-ok"]["status"] == "failed"
    assert rows["claims-ok"]["reason"] == "TensorRT engine not found: tensorrt/model-int8.engine (the manifest says ok)"
    assert rows["old-format"]["status"] == "not_checkable" and rows["old-format"]["path"] == "tensorrt/model-int8.engine"
    assert rows["old-format"]["simulated"] and any("QDQ source" in n for n in rows["old-format"]["notes"])
    assert rows["old-format-ok"]["status"] == "failed" and "engine not found" in rows["old-format-ok"]["reason"]
    assert calls == []  # nothing was handed to a runner: no engine exists
    # an engine built on the device and copied back: the gate hands the engine (not the QDQ model) to TensorRT
    (out / "tensorrt" / "model-int8.engine").write_bytes(b"not a real engine")
    rows = {r["name"]: r for r in evaluate_manifest(bench, man, _gate_args("--max-drop", "0.01"))["rows"]}
    assert calls and all(name == "model-int8.engine" and kw["runtime"] == "tensorrt" for name, kw in calls)
    for name in ("claims-ok", "old-format", "old-format-ok"):
        assert rows[name]["status"] == "not_checkable" and "not checkable here" in rows[name]["reason"], rows[name]
