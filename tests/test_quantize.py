"""rdcd.quantize: real (tiny) student, real ONNX Runtime / NNCF / OpenVINO / coremltools, real benchmark."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEST_SIZE

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_export(student_run, tmp_path_factory) -> Path:
    """An export directory as rdcd-export writes it: model.onnx (FP32, uint8 NHWC) + manifest.json."""
    from rdcd.export.onnx_export import export_onnx
    from rdcd.manifest import Artifact, Input, Manifest, Output, ProducedBy, Source
    from rdcd.model import load_student

    student = load_student(student_run)
    out = tmp_path_factory.mktemp("export") / "exp"
    export_onnx(student, out / "model.onnx", TEST_SIZE)
    m = Manifest(out)
    m.source = Source(kind="student", checkpoint=str(student_run), dim=128)
    m.preprocess = student.config.preprocess().to_dict()
    m.upsert(Artifact("onnx-fp32", "onnx", "fp32", "model.onnx", "onnxruntime", Input.square(TEST_SIZE),
                      Output(dim=128), ProducedBy("test")))
    m.save()
    return out


@pytest.fixture()
def export_dir(base_export, tmp_path) -> Path:
    dst = tmp_path / "exp"
    shutil.copytree(base_export, dst)
    return dst


@pytest.fixture(scope="module")
def calib_dir(tiny_bench) -> Path:
    """Real photos: the tiny benchmark's background images (18)."""
    return tiny_bench / "training"


@pytest.fixture(scope="module")
def calib_images(calib_dir) -> np.ndarray:
    from rdcd.preprocess import PreprocessSpec
    from rdcd.quantize.calib import load_calibration

    return load_calibration(calib_dir, PreprocessSpec(size=TEST_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3), 12).images


@pytest.fixture(scope="module")
def blank_calib_dir(tmp_path_factory) -> Path:
    """A deliberately crippled calibration set: black images (every activation range collapses)."""
    d = tmp_path_factory.mktemp("blank")
    for i in range(4):
        Image.new("RGB", (64, 64), (0, 0, 0)).save(d / f"blank{i}.png")
    return d


def _manifest(d: Path) -> dict:
    """``manifest.json`` as written (the on-disk format these tests check), with its ``rows`` by name."""
    data = json.loads((d / "manifest.json").read_text())
    return {**data, "rows": {a["name"]: a for a in data["artifacts"]}}


# -------------------------------------------------------------------------------------- calibration
def test_calibration_refuses_empty_dir_and_too_few(tmp_path, calib_dir):
    from rdcd.errors import RdcdError
    from rdcd.preprocess import PreprocessSpec
    from rdcd.quantize.calib import load_calibration

    spec = PreprocessSpec(size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RdcdError, match="no readable calibration images"):
        load_calibration(empty, spec, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    (bad / "zero.png").write_bytes(b"")
    with pytest.raises(RdcdError, match="no readable calibration images"):
        load_calibration(bad, spec, 1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(calib_dir.iterdir())[:3]:
        shutil.copy(p, mixed / p.name)
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(RdcdError, match=r"only 3 readable calibration images .*asked for 5.*1 unreadable"):
        load_calibration(mixed, spec, 5)
    cs = load_calibration(mixed, spec, 3)  # the corrupt file is skipped, not fatal
    assert cs.images.shape == (3, 32, 32, 3) and cs.images.dtype == np.uint8 and len(cs.skipped) == 1
    # benchmark images are left out: excluding all of them leaves nothing
    with pytest.raises(RdcdError, match="4 used by the benchmark"):
        load_calibration(mixed, spec, 1, exclude_names=[p.name for p in mixed.iterdir()])


def test_cli_bad_inputs_exit_2(export_dir, tmp_path, calib_dir, capsys):
    from rdcd.quantize.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--exports", str(export_dir), "--calib-dir", str(empty), "--target", "onnx"]) == 2
    assert "no readable calibration images" in capsys.readouterr().err
    assert main(["--exports", str(export_dir), "--calib-dir", str(calib_dir), "--calib-count", "500",
                 "--target", "onnx"]) == 2
    assert "only 18 readable calibration images" in capsys.readouterr().err
    assert main(["--exports", str(tmp_path / "nope"), "--calib-dir", str(calib_dir)]) == 2
    assert "export directory not found" in capsys.readouterr().err
    assert main(["--exports", str(export_dir), "--calib-dir", str(calib_dir), "--target", "jetson"]) == 2
    assert "unknown target 'jetson'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit 2
        main(["--exports", str(export_dir), "--calib-dir", str(calib_dir), "--method", "magic"])
    assert exc.value.code == 2
    (export_dir / "manifest.json").write_text("{not json")
    assert main(["--exports", str(export_dir), "--calib-dir", str(calib_dir)]) == 2
    assert "malformed" in capsys.readouterr().err
    assert not (export_dir / "model.int8.onnx").exists()


# ------------------------------------------------------------------------------------------- ONNX
def test_onnx_qdq_models_are_valid_and_run(base_export, calib_images, tmp_path):
    from rdcd.quantize.onnx_ptq import OnnxQuantizer, Recipe
    from rdcd.quantize.qdq_graph import check_qdq
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    with OnnxQuantizer(base_export / "model.onnx", calib_images) as q:
        assert q.float_nodes and all(n in q.float_nodes for n in q.float_nodes[:2])
        assert "backbone.conv_stem" in q.units and "projector" in q.units
        cpu = q.quantize(tmp_path / "cpu.onnx", Recipe())
        trt = q.quantize(tmp_path / "trt.onnx", Recipe.tensorrt())
    fp32 = OnnxRuntimeRunner(base_export / "model.onnx", threads=2)(calib_images)
    for path, zp_dtype in ((cpu, "uint8"), (trt, "int8")):
        facts = check_qdq(path)
        assert facts["quantize_linear"] > 20 and facts["dequantize_linear"] > 20
        assert facts["input_name"] == "image" and facts["input_dtype"] == "UINT8"  # uint8 input kept
        assert facts["quantized_layers"] >= 45  # every conv of lite0 + fc/projector
        assert facts["per_channel_weights"] == facts["weight_dequantize"] == facts["quantized_layers"]
        assert facts["activation_dtypes"] == [zp_dtype]
        out = OnnxRuntimeRunner(path, threads=2)(calib_images)  # the gate's runner loads and runs it
        assert out.shape == (len(calib_images), 128) and np.all(np.isfinite(out))
    assert check_qdq(trt)["activation_zero_points"] == [0]  # symmetric: what TensorRT requires
    # descriptors stay close to FP32 (this 96 px student has an untrained random head: the bar is loose, but
    # a broken quantization gives cosines near 0): the CPU model with ORT's integer kernels, the TensorRT
    # input with QDQ reference semantics (TensorRT's arithmetic; ORT's x86 kernels saturate on it)
    for out in (OnnxRuntimeRunner(cpu, threads=2)(calib_images), OnnxRuntimeRunner(trt, threads=2, reference=True)(calib_images)):
        cos = np.sum(out * fp32, axis=1) / np.linalg.norm(out, axis=1)
        assert cos.mean() > 0.85 and cos.min() > 0.6, cos
    import onnx

    first = [n for n in onnx.load(str(cpu)).graph.node if "image" in n.input]
    assert {n.op_type for n in first} <= {"Cast", "Shape", "Transpose"}  # the uint8 head stays float


def test_keeping_a_residual_add_in_float_removes_its_input_quantization(base_export, calib_images, tmp_path):
    """The sensitivity ranking names residual Adds first; keeping one in float must take the Q/DQ pair off the
    conv output it adds (not only off the Add's own output), or the fallback step changes nothing (it did:
    1, 2, 4 and 8 Adds in float gave the same µAP to 4 decimals)."""
    import onnx

    from rdcd.quantize.onnx_ptq import OnnxQuantizer, Recipe

    with OnnxQuantizer(base_export / "model.onnx", calib_images) as q:
        pre = {n.name: n for n in onnx.load(str(q.pre_path)).graph.node}
        adds = [u for u in q.units if pre[q.units[u][0]].op_type == "Add"]
        assert adds, list(q.units)[:10]
        unit = adds[0]
        assert any(pre[n].op_type == "Conv" for n in q.units[unit][1:])  # the conv feeding the residual
        base = q.quantize(tmp_path / "all.onnx", Recipe())
        kept = q.quantize(tmp_path / "kept.onnx", Recipe(), exclude_layers=[unit])

    def quantized_inputs(path):
        g = onnx.load(str(path)).graph
        producer = {o: n for n in g.node for o in n.output}
        add = next(n for n in g.node if n.name == q.units[unit][0])
        return sum(1 for i in add.input if i in producer and producer[i].op_type == "DequantizeLinear")

    # the residual branch (the conv's output) goes float; the skip input may keep the Q/DQ pair that the
    # next block's conv, which reads the same tensor, puts on it
    assert quantized_inputs(base) == 2
    assert quantized_inputs(kept) <= 1


def test_fallback_loop_reduces_a_deliberately_large_drop(export_dir, tiny_bench, blank_calib_dir):
    """Calibrating on black images ruins every activation range; the loop must keep layers in float
    until the µAP drop shrinks, and record them."""
    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize

    result = quantize(export_dir, blank_calib_dir, targets=("onnx",),
                      recipe=QuantizeRecipe(method="minmax", engine="ort", calib_count=4),
                      accuracy=AccuracyControl(tiny_bench, max_drop=0.02, max_fallback_steps=8),
                      with_tensorrt=False, codes=False, raise_on_drop=False)
    art = result.artifacts[0]
    report = result.report
    steps = report["targets"]["onnx"]["fallback"]["steps"]
    assert steps[0]["float_layers"] == 0 and steps[0]["drop"] > 0.05, steps[0]  # the crippled model is bad
    assert len(steps) >= 2
    assert art.accuracy.drop < steps[0]["drop"] - 0.03  # ... and the loop really recovers µAP
    assert art.accuracy.drop <= 0.02 and art.accuracy.max_drop == 0.02
    assert art.fallback_layers and art.fallback_layers == steps[-1]["excluded"]
    assert [s["float_layers"] for s in steps] == sorted(s["float_layers"] for s in steps)
    sens = report["sensitivity"]
    assert sens[0]["sqnr_db"] <= sens[-1]["sqnr_db"]
    # the worst layers by SQNR were probed one by one; the schedule starts with those that measurably helped
    probes = report["targets"]["onnx"]["fallback"]["probes"]
    assert [p["layer"] for p in probes] == [r["layer"] for r in sens[: len(probes)]] and probes
    helped = sorted((p for p in probes if p["drop"] < steps[0]["drop"]), key=lambda p: p["drop"])
    if helped:
        assert art.fallback_layers[0] == helped[0]["layer"]
    m = _manifest(export_dir)["rows"]["onnx-int8"]
    assert m["fallback_layers"] == art.fallback_layers and m["reference"] == "onnx-fp32"


def test_cli_exit_1_when_drop_stays_too_large_and_work_is_kept(export_dir, tiny_bench, blank_calib_dir, capsys):
    from rdcd.quantize.cli import main

    code = main(["--exports", str(export_dir), "--calib-dir", str(blank_calib_dir), "--calib-count", "4",
                 "--benchmark", str(tiny_bench), "--target", "tensorrt", "--no-fallback", "--no-codes",
                 "--method", "minmax", "--max-drop", "0.01"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "tensorrt-int8" in err and "above --max-drop" in err
    art = _manifest(export_dir)["rows"]["tensorrt-int8"]  # written all the same (QDQ model; no engine here)
    assert (export_dir / art["qdq_source"]).is_file() and art["status"] == "not_checkable"
    assert "trtexec" in art["command"] and "--int8" in art["command"]
    assert art["accuracy"]["drop"] > 0.01


# ------------------------------------------------------------------------- every target, end to end
def test_quantize_all_targets(export_dir, tiny_bench, calib_dir, student_run):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("coremltools")
    from rdcd.artifact import COREML_SIMULATION, layout_path
    from rdcd.fsutil import sha256
    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize
    from rdcd.quantize.context import OLD_LAYOUT

    old = [export_dir / rel for rels in OLD_LAYOUT.values() for rel in rels]  # what older versions wrote (folders)
    for p in old:
        p.mkdir()
    assert not (export_dir / "coreml").exists() and not (export_dir / "openvino").exists()  # made on saving
    arts = quantize(export_dir, calib_dir, targets=("onnx", "openvino", "coreml"),
                    recipe=QuantizeRecipe(method="minmax", engine="ort", calib_count=12),
                    accuracy=AccuracyControl(tiny_bench, max_drop=0.05, max_fallback_steps=2),
                    raise_on_drop=False).artifacts
    names = {a.name for a in arts}
    assert names == {"onnx-int8", "tensorrt-int8", "openvino-int8", "coreml-w8a8", "coreml-w8"}
    assert {a.name: a.path for a in arts} == {a.name: layout_path(a.target, a.precision) for a in arts}
    assert not any(p.exists() for p in old), [p.name for p in old if p.exists()]
    m = _manifest(export_dir)
    by = m["rows"]
    gt_sha = sha256(tiny_bench / "ground_truth.csv")
    for name in names:
        a = by[name]
        if name == "tensorrt-int8":  # the engine is not built here: its QDQ source is (tests/test_tensorrt.py)
            assert not (export_dir / a["path"]).exists() and a["qdq_sha256"] == sha256(export_dir / a["qdq_source"])
        else:
            assert (export_dir / a["path"]).exists() and a["sha256"] and a["size_bytes"] > 0, name
        assert a["reference"] == "onnx-fp32"
        acc = a["accuracy"]
        assert acc["ground_truth_sha256"] == gt_sha and Path(acc["benchmark"]) == tiny_bench.resolve()
        assert 0 < acc["micro_ap"] <= 1 and abs(acc["fp32_micro_ap"] - acc["micro_ap"] - acc["drop"]) < 1e-5
        assert a["calibration"]["images"] == 12
    onnx_art = by["onnx-int8"]
    assert onnx_art["status"] == "ok" and onnx_art["accuracy"]["simulated"] is False
    trt = by["tensorrt-int8"]
    assert trt["target"] == "tensorrt" and trt["status"] == "not_checkable" and trt["accuracy"]["simulated"]
    assert (export_dir / "tensorrt" / "build_engine.sh").read_text().count("--onnx=model-int8.onnx") == 2  # TRT 10, 11

    # OpenVINO INT8 via NNCF: FakeQuantize ops, runs in OpenVINO
    from rdcd.validate.runtimes import OpenVINORunner

    ov = by["openvino-int8"]
    assert ov["status"] == "ok" and ov["fake_quantize_ops"] > 20 and ov["accuracy"]["runtime"] == "openvino"
    out = OpenVINORunner(export_dir / ov["path"], threads=2)(np.zeros((2, TEST_SIZE, TEST_SIZE, 3), np.uint8))
    assert out.shape == (2, 128)
    # the L2-normalisation tail stays float: no FakeQuantize feeds the ops after the projector (the converter
    # renames the final Div, so matching ONNX names alone left the norm itself 8-bit), and descriptors are unit length
    import openvino

    ops = openvino.Core().read_model(str(export_dir / ov["path"])).get_ordered_ops()
    last_matmul = max(i for i, op in enumerate(ops) if op.get_type_name() == "MatMul")
    fed = [op.get_friendly_name() for op in ops[last_matmul + 1:] if op.get_type_name() != "FakeQuantize"
           and any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())]
    assert fed == [], fed
    assert abs(ov["checks"]["unit_norm"]["norm_max"] - 1) < 1e-3 and ov["produced_by"]["options"]["overflow_fix"] == "enable"
    xml, weights = export_dir / ov["path"], export_dir / "openvino" / "model-int8.bin"  # the .bin counts too
    assert ov["size_bytes"] == xml.stat().st_size + weights.stat().st_size and ov["content_sha256"] != ov["sha256"]
    for name in ("onnx-int8", "openvino-int8", "coreml-w8a8", "coreml-w8", "tensorrt-int8"):
        a = by[name]
        lo, hi = a["accuracy"]["drop_ci95"]  # paired bootstrap over the benchmark's queries
        assert lo <= a["accuracy"]["drop"] + 1e-6 and a["accuracy"]["drop"] - 1e-6 <= hi, name

    # Core ML: W8A8 iOS 17 package with quantized activations, W8 with int8 weights; µAP simulated off macOS
    w8a8, w8 = by["coreml-w8a8"], by["coreml-w8"]
    assert w8a8["precision"] == "w8a8" and w8["precision"] == "w8"
    assert w8a8["mlpackage"]["specification_version"] >= 8  # iOS 17
    assert w8a8["mlpackage"]["quantize_ops"] > 20 and w8a8["mlpackage"]["constexpr_dequant_ops"] > 40
    assert w8["mlpackage"]["constexpr_dequant_ops"] > 40 and w8["mlpackage"]["quantize_ops"] == 0
    assert w8a8["mlpackage"]["inputs"] == ["image"] and w8a8["mlpackage"]["outputs"] == ["descriptor"]
    assert w8a8["input"]["shape"] == [1, TEST_SIZE, TEST_SIZE, 3] == w8["input"]["shape"]  # one RGB image
    if platform.system() != "Darwin":
        for a in (w8a8, w8):
            assert a["status"] == "not_checkable" and "macOS" in a["reason"]
            assert a["accuracy"]["simulated"] is True and "simulated in PyTorch" in a["accuracy"]["runtime"]

    # the saved simulation state rebuilds the same simulated model without calibrating again
    from rdcd.model import load_student
    from rdcd.quantize.coreml_ptq import load_w8a8_simulation
    from rdcd.quantize.accuracy import BenchImages
    from rdcd.preprocess import PreprocessSpec

    assert w8a8["path"] == "coreml/model-w8a8.mlpackage" and w8a8["simulation"]["path"] == COREML_SIMULATION
    sim = load_w8a8_simulation(load_student(student_run), export_dir / w8a8["simulation"]["path"])
    bench = BenchImages.load(tiny_bench, PreprocessSpec.from_dict(m["preprocess"]), with_training=False)
    assert abs(bench.micro_ap(sim.embedder()) - w8a8["accuracy"]["micro_ap"]) < 1e-6

    # the report: calibration, per-layer SQNR, fallback steps, codes; the codec file
    report = json.loads((export_dir / "quantize_report.json").read_text())
    assert report["calibration"]["images"] == 12 and report["sensitivity"][0]["sqnr_db"] is not None
    codes = {r["code"]: r for r in report["codes"]}
    assert codes["int8"]["bytes_per_image"] == 128 and codes["binary"]["bytes_per_image"] == 16
    assert codes["float32"]["index_1m_mb"] == pytest.approx(488.3, abs=0.1)
    assert json.loads((export_dir / "index_codes.json").read_text())["dim"] == 128


def test_old_layout_files_go_unless_a_row_names_them(tmp_path):
    from rdcd.manifest import Artifact, Input, Manifest, Output
    from rdcd.quantize.context import remove_old_layout

    for name in ("openvino-int8", "model.w8a8.mlpackage", "model.w8a8.simulation"):
        (tmp_path / name).mkdir()
    m = Manifest(tmp_path)  # a row still naming a file in the old folder keeps it
    m.upsert(Artifact("openvino-int8", "openvino", "int8", "openvino-int8/model.xml", "openvino", Input(), Output()))
    assert remove_old_layout(m, "openvino") == [] and remove_old_layout(m, "onnx") == []
    assert remove_old_layout(m, "coreml") == ["model.w8a8.mlpackage", "model.w8a8.simulation"]
    assert (tmp_path / "openvino-int8").is_dir() and not (tmp_path / "model.w8a8.mlpackage").exists()


# ----------------------------------------------------------------------------------------- codes
def test_codes_round_trip_and_search(tmp_path):
    from rdcd.quantize.codes import BinaryCodes, Int8Codes, load_int8_codec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    int8 = Int8Codes.fit(x)
    codes = int8.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (200, 64) and int8.bytes_per_image == 64
    step = np.asarray(int8.scales()["vdiff"]) / 255
    assert np.all(np.abs(int8.decode(codes) - x) <= step * 0.51 + 1e-6)  # within half a quantization step
    b = BinaryCodes.fit(x, 64)
    bc = b.encode(x)
    assert bc.shape == (200, 8) and b.bytes_per_image == 8
    assert np.array_equal(b.decode_signs(bc) > 0, x - b.mean > 0)
    sims, idx = b.search(x[:5], x)
    assert list(idx[:, 0]) == [0, 1, 2, 3, 4] and np.allclose(sims[:, 0], 1.0)
    s8, i8 = int8.search(x[:5], x)
    assert list(i8[:, 0]) == [0, 1, 2, 3, 4]
    from rdcd.fsutil import write_json

    write_json(tmp_path / "c.json", {"dim": 64, "int8": int8.scales()})
    assert np.array_equal(load_int8_codec(tmp_path / "c.json").encode(x), codes)


def test_sqnr_and_schedule():
    from rdcd.quantize.sensitivity import combine_db, exclusion_schedule, fallback_loop, sqnr_db

    x = np.linspace(-1, 1, 1000)
    assert sqnr_db(x, x) > 100 and sqnr_db(x, x + 0.1) < sqnr_db(x, x + 0.01)
    assert combine_db(30.0, 30.0) == pytest.approx(30 - 10 * np.log10(2), abs=1e-6)
    assert exclusion_schedule(51, 8) == [1, 2, 4, 8, 16, 32, 51]
    assert exclusion_schedule(3, 8) == [1, 2, 3]
    # a toy model whose µAP recovers once its two bad layers are in float
    bad = {"a", "b"}
    res = fallback_loop(lambda ex, i: tuple(ex), lambda ex: 0.5 - 0.1 * len(bad - set(ex)),
                        ["a", "b", "c", "d"], 0.5, 0.01)
    assert [s.drop for s in res.steps] == pytest.approx([0.2, 0.1, 0.0]) and res.chosen.excluded == ["a", "b"]
    assert res.holds
    # SQNR ranks the layer µAP needs third: the probes measure it and the loop keeps it alone in float,
    # instead of the SQNR schedule's 1, 2 then 4 layers
    res = fallback_loop(lambda ex, i: tuple(ex), lambda ex: 0.5 - 0.1 * ("z" not in ex) - 0.001 * len(ex),
                        ["x", "y", "z", "w", "v"], 0.5, 0.01, probe=4)
    assert res.chosen.excluded == ["z"] and [p.excluded[0] for p in res.probes] == ["x", "y", "z"]
    assert [s.call for s in res.steps] == [0, 3]  # the calls build() saw, probes included
    # with probes off, the SQNR order is followed
    res = fallback_loop(lambda ex, i: tuple(ex), lambda ex: 0.5 - 0.1 * ("z" not in ex) - 0.001 * len(ex),
                        ["x", "y", "z", "w", "v"], 0.5, 0.01, probe=0)
    assert res.chosen.excluded == ["x", "y", "z", "w"] and not res.probes
