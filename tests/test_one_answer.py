"""One answer per question, whichever command asks: an artifact's input, a teacher spec, the uint8 -> float
conversion, the targets and runtimes, a gate report's statuses, the gate's settings, the demo's training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, make_exports, onnx_export_dir, row, student_onnx
from rdcd.errors import RdcdError


# ----------------------------------------------------------------------------- an artifact's input
def test_artifact_input_order_and_checks(student_run, tmp_path):
    from rdcd.validate.artifact_input import artifact_input
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    exports = onnx_export_dir(student_run, tmp_path / "exports")
    model = exports / "model.onnx"
    runner = OnnxRuntimeRunner(model, threads=1)
    got = artifact_input(model, runner)
    assert (got.spec.size, got.source, got.row.name) == (TEST_SIZE, "manifest.json", "onnx-fp32")
    assert got.spec.mean == (0.5, 0.5, 0.5)  # the manifest's preprocessing, not a default
    # a size asked for must fit the model's static input; a default size never overrides what is recorded
    with pytest.raises(RdcdError, match=f"fixed at {TEST_SIZE} x {TEST_SIZE}"):
        artifact_input(model, runner, size=TEST_SIZE + 8)
    assert artifact_input(model, runner, default_size=288).spec.size == TEST_SIZE
    # no manifest: the ONNX metadata rdcd-export wrote (read through the runner's session, or from the file)
    alone = shutil.copy(student_onnx(student_run), tmp_path / "alone.onnx")
    for r in (OnnxRuntimeRunner(alone, threads=1), None):
        assert (artifact_input(alone, r).spec.size, artifact_input(alone, r).source) == (TEST_SIZE, "ONNX metadata")
    # a manifest that contradicts the file is bad input, one line
    wrong = make_exports(tmp_path / "wrong", [row("onnx-fp32", "onnx", "fp32", "model.onnx", "onnxruntime",
                                                  input={"name": "image", "size": [48, 48]})], {"model.onnx": model})
    with pytest.raises(RdcdError, match="its manifest.json says 48"):
        artifact_input(wrong / "model.onnx", OnnxRuntimeRunner(wrong / "model.onnx", threads=1))


def test_model_metadata_never_stops_a_run():
    from rdcd.validate.artifact_input import metadata_spec

    assert metadata_spec({"rdcd.preprocess": '{"size": 128}', "rdcd.input_size": "128"}).size == 128  # no mean/std
    assert metadata_spec({"rdcd.preprocess": "{not json", "input_size": "64"}).size == 64  # a third-party file's
    assert metadata_spec({"rdcd.input_size": "many"}) is None and metadata_spec({}) is None


def test_manifest_row_without_runtime_takes_its_targets(tmp_path, student_run):
    from rdcd.manifest import Manifest
    from rdcd.targets import REGISTRY

    exports = onnx_export_dir(student_run, tmp_path / "exports")
    data = json.loads((exports / "manifest.json").read_text())
    del data["artifacts"][0]["runtime"]  # as a hand-written or older manifest may have it
    (exports / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(exports).get("onnx-fp32").runtime == REGISTRY["onnx"].runtime == "onnxruntime"


# ----------------------------------------------------------------------------- teachers
def test_a_timm_teacher_is_the_same_model_in_training_and_export():
    torch = pytest.importorskip("torch")
    from rdcd.export.source import teacher_source
    from rdcd.teacher import build_teacher, parse_teacher

    assert parse_teacher("teacher") == parse_teacher("sscd-onnx") == ("sscd-onnx", "sscd-onnx")
    torch.manual_seed(123)  # the caller's seed neither matters nor is changed
    state = torch.random.get_rng_state()
    trained = build_teacher("timm:test_resnet", size=64)
    assert torch.equal(torch.random.get_rng_state(), state)
    exported = teacher_source("timm:test_resnet", size=64)
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    from rdcd.model import DeployModel

    with torch.no_grad():
        out = DeployModel(exported.net)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(trained.embed_uint8(x), out, atol=1e-5)
    with pytest.raises(RdcdError, match="unknown timm teacher"):
        build_teacher("timm:no_such_model")
    assert build_teacher("timm:test_resnet.r160_in1k", size=64).dim == trained.dim  # a name with its weights tag


def test_onnx_teacher_runs_on_the_one_onnxruntime_runner():
    from rdcd.teacher import build_teacher
    from rdcd.validate.runtimes import OnnxRuntimeRunner

    t = build_teacher("sscd-onnx", size=64, threads=1)
    assert isinstance(t.runner, OnnxRuntimeRunner) and t.dim == 512


# ----------------------------------------------------------------------------- uint8 -> float
def test_torch_and_numpy_conversions_are_one():
    torch = pytest.importorskip("torch")
    from rdcd.model import DeployModel
    from rdcd.preprocess import PreprocessSpec, to_float_nchw

    batch = np.random.default_rng(3).integers(0, 256, (2, 17, 19, 3), dtype=np.uint8)
    t = to_float_nchw(torch.from_numpy(batch))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (2, 3, 17, 19)
    np.testing.assert_array_equal(t.numpy(), to_float_nchw(batch))
    spec = PreprocessSpec(size=17)
    np.testing.assert_array_equal(to_float_nchw(torch.from_numpy(batch), spec.mean, spec.std).numpy(),
                                  spec.normalize(batch))
    ident = DeployModel(torch.nn.Identity())  # the exported graph's conversion is the same function
    np.testing.assert_array_equal(ident(torch.from_numpy(batch)).numpy(), to_float_nchw(batch))


# ----------------------------------------------------------------------------- targets and runtimes
def test_targets_runtimes_and_rows_come_from_one_table():
    from rdcd.artifact import LAYOUT, TARGETS
    from rdcd.manifest import Output
    from rdcd.targets import REGISTRY, RUNTIMES, new_artifact
    from rdcd.validate.bench import RUNTIME_CHOICES

    assert tuple(REGISTRY) == TARGETS == tuple(dict.fromkeys(t for t, _ in LAYOUT))
    assert RUNTIMES == tuple(t.runtime for t in REGISTRY.values()) and RUNTIME_CHOICES == ("auto", *RUNTIMES)
    art = new_artifact("openvino", "int8", 160, Output(dim=64))
    assert (art.name, art.path, art.runtime, art.input.side) == ("openvino-int8", LAYOUT[("openvino", "int8")],
                                                                 "openvino", 160)
    assert new_artifact("coreml", "w8a8", 160, Output(dim=64)).input.kind == "image"  # Core ML's one image


def test_quantize_targets_are_spelled_as_export_targets(tmp_path):
    from rdcd.quantize import quantize

    for bad, says in ((["bogus"], "unknown target 'bogus'"), ([], "no target")):
        with pytest.raises(RdcdError, match=says):
            quantize(tmp_path / "absent", tmp_path, targets=bad)
    with pytest.raises(RdcdError, match="export directory not found"):  # "all" and comma lists are targets
        quantize(tmp_path / "absent", tmp_path, targets=["all"])
    with pytest.raises(RdcdError, match="export directory not found"):
        quantize(tmp_path / "absent", tmp_path, targets=["onnx,openvino"])


# ----------------------------------------------------------------------------- gate reports and settings
def _report(tmp_path: Path, status: str) -> Path:
    from rdcd.validate.report import SCHEMA

    folder = tmp_path / f"report-{status}"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"schema": SCHEMA, "artifacts": [
        {"name": "onnx-int8", "path": "model.int8.onnx", "status": status, "runtime": "onnxruntime"}]}))
    return folder


def test_old_gate_reports_load_and_bad_statuses_are_refused(tmp_path):
    from rdcd.validate.report import load_report

    _, report = load_report(_report(tmp_path, "not_checked"))  # written before the status was renamed
    assert report["artifacts"][0]["status"] == "not_checkable"
    with pytest.raises(RdcdError, match="has status 'lost'"):
        load_report(_report(tmp_path, "lost"))


@pytest.mark.parametrize("change, says", [({"drop_type": "percent"}, "--drop-type"), ({"require": ("tpu",)}, "tpu"),
                                          ({"k": 0}, "--k"), ({"threads": 0}, "--threads"),
                                          ({"warmup": -1}, "--warmup")])
def test_gate_settings_from_python_are_checked_like_the_command_line(tiny_bench, student_run, tmp_path, change, says):
    from rdcd.validate import GateConfig, gate

    exports = onnx_export_dir(student_run, tmp_path / "exports")
    with pytest.raises(RdcdError, match=says):
        gate(tiny_bench, exports, GateConfig(allow_empty=True, **change))


# ----------------------------------------------------------------------------- the demo's training run
def test_the_demo_prints_the_rdcd_distill_command_of_its_run():
    """The demo trains through the library (rdcd.distill.distill); the command it prints gives the same config."""
    from rdcd.distill import from_options
    from rdcd.distill.cli import build_parser, config_from_args
    from rdcd.pipeline import _as_argv

    settings = {"train_dir": ["pool", "photos"], "out": "runs/x", "dim": 64, "input_size": 128, "teacher_size": 224,
                "head_steps": 1500, "max_steps": 0, "lr": 0.0015, "cache_views": 2, "queue_size": 1024,
                "rsd_queue_size": 1024, "exclude_benchmark": ["bench"], "max_images": 4000, "resume": True,
                "pretrained": False, "amp": False, "progress": None}
    from_cli = config_from_args(build_parser().parse_args(_as_argv(settings))).to_dict()
    assert from_cli == from_options(settings).to_dict()
