"""``rdcd-bench`` (torch-free device latency bench) and merging its JSON into gate reports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TEST_SIZE, onnx_export_dir

from rdcd.fsutil import sha256
from rdcd.validate.bench import main as bench_main
from rdcd.validate.cli import main as validate_main

pytest.importorskip("onnxruntime")

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(student_run, tmp_path_factory) -> Path:
    return onnx_export_dir(student_run, tmp_path_factory.mktemp("bench-exports"))


def dynamic_size_model(path: Path) -> Path:
    """A real descriptor model with any input size (uint8 NHWC -> mean colour, L2-normalised)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
         helper.make_node("LpNormalization", ["m"], ["descriptor"], axis=1, p=2)],
        "mean_colour",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "h", "w", 3])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


NO_TORCH = textwrap.dedent("""
    import json, sys
    import rdcd.validate.bench as bench
    import rdcd.validate.runtimes
    after_import = sorted(m for m in ("torch", "onnxruntime", "onnx", "openvino", "coremltools", "tensorrt",
                                      "matplotlib", "PIL") if m in sys.modules)
    rc = bench.main(sys.argv[1:])
    print(json.dumps({"rc": rc, "after_import": after_import, "torch": "torch" in sys.modules}))
""")


@pytest.fixture(scope="module")
def ort_bench(exports, tmp_path_factory) -> tuple[Path, dict]:
    """rdcd-bench on onnxruntime, run in a fresh interpreter that must never import torch."""
    out = tmp_path_factory.mktemp("bench") / "ort.json"
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "--model", str(exports / "model.onnx"), "--threads", "1",
                           "--warmup", "3", "--iters", "25", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_imports_no_torch(ort_bench, exports):
    out, proc = ort_bench
    assert proc == {"rc": 0, "after_import": [], "torch": False}  # nothing heavy at import, no torch ever
    rec = json.loads(out.read_text())
    assert rec["schema"] == "rdcd-bench/1"
    assert rec["model"]["sha256"] == sha256(exports / "model.onnx") and rec["model"]["artifact"] == "onnx-fp32"
    assert rec["runtime"]["runtime"] == "onnxruntime" and rec["runtime"]["version"]
    assert rec["runtime"]["threads"] == 1 and rec["settings"]["threads"] == 1
    assert rec["settings"]["size"] == TEST_SIZE and rec["settings"]["size_from"] == "manifest.json"
    assert rec["settings"]["batch"] == 1 and rec["settings"]["output_dim"] == 128
    lat = rec["latency_ms"]
    assert lat["n"] == 25 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert rec["throughput_ips"] > 0 and rec["gpu_compute_ms"] is None
    assert rec["device"]["cpu_count"] >= 1 and rec["device"]["system"]
    assert rec["device_label"].endswith(f"onnxruntime {rec['runtime']['version']}")


def test_runtimes_import_no_torch(exports):
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from rdcd.validate.device import device_info
        from rdcd.validate.runtimes import load_runner
        r = load_runner(sys.argv[1], threads=1)
        d = r(np.zeros((2, int(sys.argv[2]), int(sys.argv[2]), 3), np.uint8))
        assert d.shape == (2, 128), d.shape
        device_info()
        assert "torch" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(exports / "model.onnx"), str(TEST_SIZE)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_bench_real_images_batches_and_size(exports, tiny_bench, tmp_path, capsys):
    out = tmp_path / "imgs.json"
    assert bench_main(["--model", str(exports / "model.onnx"), "--images", str(tiny_bench / "queries"),
                       "--batch", "3", "--warmup", "1", "--iters", "4", "--threads", "1", "--json", str(out)]) == 0
    assert "img/s" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["settings"]["batch"] == 3 and "images from" in rec["settings"]["input"]
    assert rec["device_label"].endswith("(batch 3)")
    assert rec["per_image_ms_p50"] == pytest.approx(rec["latency_ms"]["p50"] / 3, rel=1e-3)

    dyn = dynamic_size_model(tmp_path / "mean.onnx")
    out2 = tmp_path / "dyn.json"
    assert bench_main(["--model", str(dyn), "--size", "40", "--iters", "3", "--json", str(out2)]) == 0
    rec2 = json.loads(out2.read_text())
    assert rec2["settings"]["size"] == 40 and rec2["settings"]["size_from"] == "--size"
    assert rec2["settings"]["output_dim"] == 3 and rec2["model"]["artifact"] is None


def onnx_export_dir_with_size(exports: Path, folder: Path, size: int) -> Path:
    """A copy of ``exports`` whose manifest says the ONNX model takes ``size`` px; returns the model's path."""
    import shutil

    from rdcd.manifest import Input, Manifest

    shutil.copytree(exports, folder)
    m = Manifest.load(folder)
    m.get("onnx-fp32").input = Input.square(size)
    m.save()
    return folder / "model.onnx"


def test_bench_bad_usage(exports, tmp_path, capsys):
    def fails(*args):
        assert bench_main([*args, "--json", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    model = str(exports / "model.onnx")
    assert "model not found" in fails("--model", str(tmp_path / "none.onnx"))
    for flag, value in (("--batch", "0"), ("--batch-size", "0"), ("--iters", "0"), ("--warmup", "-1"),
                        ("--threads", "0"), ("--size", "8")):  # checked at parse time (cli types): exit 2, one line
        with pytest.raises(SystemExit) as e:
            bench_main(["--model", model, flag, value, "--json", str(tmp_path / "x.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}: '{value}': must be" in err
    assert "tensorrt" in fails("--model", model, "--runtime", "tensorrt").lower()
    assert "image folder not found" in fails("--model", model, "--images", str(tmp_path / "nope"))
    dyn = dynamic_size_model(tmp_path / "mean.onnx")
    assert "cannot tell the input size" in fails("--model", str(dyn))
    # a manifest row whose input size contradicts the model file: one line, not the runtime's shape error
    wrong = onnx_export_dir_with_size(exports, tmp_path / "wrong", 48)
    assert f"takes {TEST_SIZE} x {TEST_SIZE} inputs, but its manifest.json says 48" in fails("--model", str(wrong))
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit) as e:
        bench_main(["--model", model])  # no --json
    assert e.value.code == 2


def test_merge_bench_json_into_report(exports, tiny_bench, ort_bench, tmp_path, capsys):
    ort_json, _ = ort_bench
    ort = json.loads(ort_json.read_text())
    report = tmp_path / "report"
    # the gate merges device results directly ...
    assert validate_main(["--benchmark", str(tiny_bench), "--exports", str(exports), "--report", str(report),
                          "--bench-json", str(ort_json), "--allow-empty", "--latency-iters", "5", "--warmup", "1"]) == 0
    assert ort["device_label"] in capsys.readouterr().out
    data = json.loads((report / "report.json").read_text())
    cell = data["artifacts"][0]["devices"][ort["device_label"]]
    assert cell["p50_ms"] == ort["latency_ms"]["p50"] and cell["matched_by"] == "sha256"
    png_before = (report / "latency.png").read_bytes()

    # ... and `merge` adds more to an existing report (here: the same model benched on OpenVINO)
    pytest.importorskip("openvino")
    ov_json = tmp_path / "ov.json"
    assert bench_main(["--model", str(exports / "model.onnx"), "--runtime", "openvino", "--iters", "5",
                       "--threads", "1", "--json", str(ov_json)]) == 0
    ov = json.loads(ov_json.read_text())
    assert validate_main(["merge", "--report", str(report), "--bench-json", str(ov_json)]) == 0
    out = capsys.readouterr().out
    assert "merged 1 bench file" in out
    data = json.loads((report / "report.json").read_text())
    assert [d["label"] for d in data["devices"]] == [ort["device_label"], ov["device_label"]]
    devices = data["artifacts"][0]["devices"]
    assert devices[ov["device_label"]]["p50_ms"] == ov["latency_ms"]["p50"]
    md = (report / "report.md").read_text()
    assert f"p50 ms · {ov['device_label']}" in md and "## Devices" in md and "ov.json" in md
    png = (report / "latency.png").read_bytes()
    assert png[:8] == PNG and png != png_before
    assert data["gate"]["passed"] is True  # merging never changes the verdict

    # a result for a model that is not in the report, and a report that does not exist: exit 2
    dyn_json = tmp_path / "dyn.json"
    assert bench_main(["--model", str(dynamic_size_model(tmp_path / "mean.onnx")), "--size", "32", "--iters", "2",
                       "--json", str(dyn_json)]) == 0
    capsys.readouterr()
    assert validate_main(["merge", "--report", str(report), "--bench-json", str(dyn_json)]) == 2
    assert "matches no artifact" in capsys.readouterr().err
    assert validate_main(["merge", "--report", str(tmp_path / "none"), "--bench-json", str(ov_json)]) == 2
    assert "no gate report" in capsys.readouterr().err


def test_device_results_find_their_artifact():
    """How a bench JSON from a device finds its row: sha256, the manifest name rdcd-bench recorded, the file
    name, the file stem (an engine built on the Jetson from the QDQ model); the bench's runtime breaks ties."""
    from rdcd.validate.report import match_rows

    rows = [{"name": "onnx-fp32", "path": "model.onnx", "runtime": "onnxruntime", "sha256": "a" * 64},
            {"name": "onnx-int8", "path": "model-int8.onnx", "runtime": "onnxruntime", "sha256": "b" * 64},
            {"name": "tensorrt-int8", "path": "tensorrt/model-int8.engine", "runtime": "tensorrt", "sha256": None}]

    def rec(name, sha, runtime, artifact=None):
        return {"model": {"name": name, "sha256": sha, "artifact": artifact}, "runtime": {"runtime": runtime}}

    def names(r):
        hits, how = match_rows(rows, r)
        return [h["name"] for h in hits], how

    assert names(rec("anything.onnx", "b" * 64, "onnxruntime")) == (["onnx-int8"], "sha256")
    assert names(rec("built-on-device.engine", "c" * 64, "tensorrt", "tensorrt-int8")) == (["tensorrt-int8"], "artifact name")
    assert names(rec("model-int8.engine", "c" * 64, "tensorrt")) == (["tensorrt-int8"], "file name")
    assert names(rec("model-int8.plan", "c" * 64, "tensorrt")) == (["tensorrt-int8"], "file stem")
    assert names(rec("model-int8.xml", "c" * 64, "openvino")) == (["onnx-int8"], "file stem")  # no same-runtime row
    with pytest.raises(Exception, match="matches no artifact"):
        match_rows(rows, rec("other.engine", "c" * 64, "tensorrt"))
