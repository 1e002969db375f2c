"""The typed manifest (rdcd.manifest / rdcd.artifact): JSON round trips unchanged, old manifests load, bad ones
are refused with one line, and the queries every stage uses answer from the rows."""

from __future__ import annotations

import json

import pytest

from rdcd.errors import RdcdError
from rdcd.manifest import (LAYOUT, TARGETS, Accuracy, Artifact, Input, Manifest, Output, ProducedBy, layout_path,
                           replace)

#: a manifest as rdcd 0.1.0 wrote it before INT8 artifacts moved into their target folders (shortened)
OLD = {
    "schema": 1, "rdcd_version": "0.1.0", "created": "2026-11-23T12:00:00Z",
    "source": {"kind": "student", "checkpoint": "runs/x", "sha256": "ab" * 32, "label": "lite0 128-d",
               "model": {"whitening": {"folder": "w", "shrinkage": 0.1}}},
    "preprocess": {"size": 96, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "stretch-bilinear"},
    "tensorrt": {"batch": 8},
    "artifacts": [
        {"name": "onnx-fp32", "target": "onnx", "precision": "fp32", "path": "model.onnx", "runtime": "onnxruntime",
         "input": {"name": "image", "layout": "NHWC", "dtype": "uint8", "size": 96}, "output": {"dim": 128},
         "produced_by": {"tool": "torch.onnx.export"}, "status": "ok", "parity": {"min_cos": 0.99999}},
        {"name": "openvino-int8", "target": "openvino", "precision": "int8", "path": "openvino-int8/model.xml",
         "runtime": "openvino", "input": {"size": [96, 96]}, "output": {"dim": 128}, "produced_by": {"tool": "nncf"},
         "status": "ok", "reference": "onnx-fp32", "future_key": {"kept": True},
         "accuracy": {"fp32_micro_ap": 0.5, "micro_ap": 0.49, "drop": 0.01, "max_drop": 0.005, "new_stat": 3}},
        {"name": "tensorrt-int8", "target": "tensorrt", "precision": "int8", "path": "tensorrt/model-int8.onnx",
         "engine_path": "tensorrt/model-int8.engine", "runtime": "tensorrt", "input": {"size": [96, 96]},
         "output": {"dim": 128}, "produced_by": {}, "status": "not_checkable", "reason": "no GPU"},
    ],
    "notes": {"parity": "cosine"},
}


def _write(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_old_manifest_loads_typed_and_round_trips(tmp_path):
    _write(tmp_path, OLD)
    m = Manifest.load(tmp_path)
    fp32, ov, trt = m.artifacts
    assert isinstance(fp32.input, Input) and fp32.input.side == 96 and fp32.output.dim == 128
    assert isinstance(ov.accuracy, Accuracy) and ov.accuracy.over() and ov.accuracy.over(0.02)  # its own budget
    assert not Accuracy(0.5, 0.49, 0.01).over() and Accuracy(0.5, 0.49, 0.01).over(0.005)
    assert ov.extra == {"future_key": {"kept": True}} and ov.accuracy.extra == {"new_stat": 3}
    assert trt.engine_path == "tensorrt/model-int8.engine" and m.trt_batch == 8
    assert m.source.label == "lite0 128-d" and m.source.whitening == {"folder": "w", "shrinkage": 0.1}
    assert [a.name for a in m.artifacts if a.quantized] == ["openvino-int8", "tensorrt-int8"]
    # nothing lost or renamed (unknown keys are written back as they were); missing defaults are filled in
    assert _contains(m.to_dict(), OLD)
    assert m.get("onnx-fp32").to_dict()["input"] == {**OLD["artifacts"][0]["input"], "name": "image"}
    m.save()
    again = Manifest.load(tmp_path)
    assert again.to_dict() == {**m.to_dict(), "updated": again.updated}


def _contains(big, small) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(_contains, big, small))
    return big == small


def test_queries(tmp_path):
    _write(tmp_path, OLD)
    m = Manifest.load(tmp_path)
    assert m.find("onnx") is None and m.default_artifact() is None  # no files here
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert m.find("onnx") is m.get("onnx-fp32") is m.default_artifact()
    assert m.find("onnx", ("int8",)) is None and m.find("openvino", ("int8",)) is None
    spec = m.spec(m.get("onnx-fp32"))
    assert spec.size == 96 and tuple(spec.mean) == (0.5,) * 3
    assert m.input_size() == 96 and Manifest.beside(tmp_path / "model.onnx")[1] == [m.get("onnx-fp32")]
    assert Manifest.beside(tmp_path.parent / "elsewhere.onnx") == (None, [])


def test_new_rows_use_the_layout(tmp_path):
    m = Manifest(tmp_path)
    for (target, precision), path in LAYOUT.items():
        assert target in TARGETS and path == layout_path(target, precision)
        assert path.startswith(f"{target}/") or target == "onnx"
    art = Artifact("onnx-int8", "onnx", "int8", layout_path("onnx", "int8"), "onnxruntime", Input.square(96),
                   Output(dim=64), ProducedBy("test", {}, {"method": "minmax"}), reference=None)
    (tmp_path / art.path).write_bytes(b"int8")
    m.upsert(art)
    assert art.sha256 and art.size_bytes == 4
    m.save()
    row = json.loads(m.path.read_text())["artifacts"][0]
    assert row["input"] == {"name": "image", "layout": "NHWC", "dtype": "uint8", "size": [96, 96],
                            "shape": ["batch", 96, 96, 3]}
    assert "reason" not in row and "accuracy" not in row  # unset fields are not written as null
    assert Input.of("coreml", 96).to_dict() == {"name": "image", "layout": "NHWC", "dtype": "uint8", "size": [96, 96],
                                                "shape": [1, 96, 96, 3], "kind": "image", "color": "RGB",
                                                "note": "Core ML image input; batch 1"}
    assert Input.of("openvino", 96) == Input.square(96)
    copy = replace(art, path="other.onnx")
    assert copy.path == "other.onnx" and art.path == "model.int8.onnx" and copy.input is not art.input


@pytest.mark.parametrize("change, says", [
    (lambda a: a.update(precision="int4"), "precision 'int4'"),
    (lambda a: a.update(input=[96]), "input must be an object"),
    (lambda a: a.update(accuracy={"micro_ap": "high"}), "accuracy must be an object with numbers"),
    (lambda a: a.update(reference="ghost"), "reference 'ghost'"),
    (lambda a: a.pop("path"), "lacks path"),
    (lambda a: a.update(bogus_field_with_a_wrong_type=1, produced_by="x"), "produced_by must be an object"),
    # well-formed JSON, wrong types: refused at load, not a crash in a later stage
    (lambda a: a.update(runtime=5), "'onnx-fp32': runtime must be str"),
    (lambda a: a.update(reason=["a"]), "reason must be str"),
    (lambda a: a.update(engine_path=5), "engine_path must be str"),
    (lambda a: a.update(parity="x"), "parity must be dict"),
    (lambda a: a.update(size_bytes="x"), "size_bytes must be int"),
    (lambda a: a.update(fallback_layers=3), "fallback_layers must be list"),
    (lambda a: a["produced_by"].update(options=[1]), "produced_by.options must be dict"),
    (lambda a: a["input"].update(shape="batch"), "input.shape must be list"),
    (lambda a: a.update(accuracy={"fp32_micro_ap": 0.5, "micro_ap": 0.4, "drop": 0.1, "drop_ci95": []}),
     r"drop_ci95 must be \[low, high\]"),
    (lambda a: a.update(accuracy={"fp32_micro_ap": 0.5, "micro_ap": 0.4, "drop": 0.1, "drop_ci95": ["a", "b"]}),
     "accuracy.drop_ci95 must be"),
    (lambda a: a.update(accuracy={"fp32_micro_ap": 0.5, "micro_ap": 0.4, "drop": 0.1, "benchmark": 5}),
     "accuracy.benchmark must be str"),
])
def test_bad_manifests_are_one_clear_error(tmp_path, change, says):
    data = json.loads(json.dumps(OLD))
    change(data["artifacts"][0])
    _write(tmp_path, data)
    with pytest.raises(RdcdError, match=f"malformed .*manifest.json: .*{says}"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("change, says", [
    (lambda d: d["source"].update(checkpoint=5), "source.checkpoint must be str"),
    (lambda d: d["source"].update(model="x"), "source.model must be dict"),
    (lambda d: d["preprocess"].update(size=True), "preprocess size must be an integer >= 16"),
    (lambda d: d["preprocess"].update(size=8), "preprocess size must be an integer >= 16"),
    (lambda d: d["preprocess"].update(mean="abc"), "preprocess mean must be 3 numbers"),
    (lambda d: d["preprocess"].update(resize="crop"), "resize"),
    (lambda d: d["tensorrt"].update(batch="8"), "tensorrt batch must be a positive integer"),
])
def test_bad_manifest_sections_are_one_clear_error(tmp_path, change, says):
    data = json.loads(json.dumps(OLD))
    change(data)
    _write(tmp_path, data)
    with pytest.raises(RdcdError, match=f"malformed .*manifest.json: .*{says}"):
        Manifest.load(tmp_path)


def test_beside_finds_only_the_manifest_of_the_file(tmp_path):
    _write(tmp_path, OLD)
    (tmp_path / "sub").mkdir()
    assert Manifest.beside(tmp_path / "sub" / "model.onnx") == (None, [])  # same name, not the row's path
    (tmp_path / "sub" / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 2}))
    assert Manifest.beside(tmp_path / "sub" / "model.onnx") == (None, [])  # not an export manifest
    m, rows = Manifest.beside(tmp_path / "openvino-int8" / "model.xml")  # a row's path one folder down
    assert m.dir == tmp_path and [a.name for a in rows] == ["openvino-int8"]


def test_rows_are_typed_on_the_way_in(tmp_path):
    with pytest.raises(ValueError, match="status 'done'"):
        Artifact("x", "onnx", "fp32", "m.onnx", "onnxruntime", Input.square(96), Output(dim=8), status="done")
    with pytest.raises(TypeError, match="takes an Artifact"):
        Manifest(tmp_path).upsert(OLD["artifacts"][0])
