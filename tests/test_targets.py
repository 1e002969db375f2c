"""The one table of targets (rdcd.targets): every target has its export, quantize job and runner, in the
manifest's target order, and says what this machine can do with it."""

from __future__ import annotations

import inspect

import pytest

from rdcd.errors import RdcdError
from rdcd.manifest import LAYOUT, TARGETS
from rdcd.targets import BY_RUNTIME, REGISTRY, for_file


def test_every_target_has_each_stage():
    assert tuple(REGISTRY) == TARGETS
    for target in REGISTRY.values():
        for stage in ("export", "quantize", "runner"):
            fn = target.function(stage)
            assert callable(fn), (target.name, stage)
        assert "threads" in inspect.signature(target.function("runner")).parameters  # one runner interface
        assert target.precisions and all((target.name, p) in LAYOUT for p in target.precisions)
        assert for_file(target.suffixes[0]) is target and BY_RUNTIME[target.runtime] is target


def test_describe_says_what_runs_here():
    rows = {t: REGISTRY[t].describe() for t in TARGETS}
    assert rows["onnx"]["export"] == "yes" and rows["onnx"]["run"] == "yes"
    assert rows["openvino"]["run"] == "yes"
    import platform

    if platform.system() != "Darwin":
        assert "macOS" in rows["coreml"]["run"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "tensorrt is not installed" in rows["tensorrt"]["run"]
    assert rows["tensorrt"]["export"] == "yes"  # the build script and engine inputs are always written


def test_load_runner_goes_through_the_table(tmp_path):
    from rdcd.validate.runtimes import load_runner

    odd = tmp_path / "model.tflite"
    odd.write_bytes(b"x")
    with pytest.raises(RdcdError, match="cannot tell the runtime"):
        load_runner(odd)
    with pytest.raises(RdcdError, match="unknown runtime 'tvm'"):
        load_runner(odd, runtime="tvm")


def test_rdcd_export_lists_the_targets(capsys):
    from rdcd.export.cli import main

    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in TARGETS) and "run here" in out
