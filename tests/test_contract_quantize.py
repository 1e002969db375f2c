"""rdcd-quantize and rdcd-export keep the command contract (tests/contract.py): the tiny 96 px student,
exported to ONNX once, quantized for ONNX Runtime only on a handful of scikit-image photos, run as the
installed console scripts.

Rows: bad numbers refused at parse time; a damaged model.onnx (random bytes, empty, truncated) refused
with one line naming it and nothing written; unwritable or misplaced outputs refused before any work.
Runs: unreadable calibration images and non-UTF-8 names are skipped and counted (console, manifest,
report); a full disk while writing exits 2 with the manifest unchanged and no temporary left; the
leftovers of a ``kill -9`` (and fake ones of a dead pid) are removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from contract import (Case, assert_contract, leftovers, non_utf8_name, run_cli, start_cli,  # noqa: E402
                      unwritable_dir, wait_for)

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png")
DEAD_PID = 999999


@pytest.fixture(scope="module")
def paths(tmp_path_factory, student_run, skimage_dir) -> dict:
    root = tmp_path_factory.mktemp("quantize-contract")
    calib = root / "calib"
    calib.mkdir()
    for name in PHOTOS:
        shutil.copy(skimage_dir / name, calib / name)
    bad = root / "calib-bad"
    shutil.copytree(calib, bad)
    non_utf8_name(bad)  # skipped by list_images (the name cannot go into a manifest)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not an image\n")
    (bad / "cut.jpg").write_bytes((skimage_dir / "rocket.jpg").read_bytes()[:2000])
    exp = root / "exp"
    r = run_cli("rdcd-export", ["--checkpoint", student_run, "--target", "onnx", "--out", exp, "--threads", 1])
    assert_contract(r, 0)
    return {"root": root, "calib": calib, "bad_calib": bad, "exp": exp, "run": student_run}


def _fresh_export(p: dict, tmp: Path) -> Path:
    dst = tmp / "exp"
    if not dst.exists():
        shutil.copytree(p["exp"], dst)
    return dst


def _quantize(p: dict, exp: Path, *extra, calib: Path | None = None, count: int = 4) -> list:
    return ["--exports", exp, "--calib-dir", calib or p["calib"], "--calib-count", count, "--target", "onnx",
            "--no-tensorrt", "--no-codes", "--threads", 1, *extra]


def _damaged(kind: str):
    def argv(p: dict) -> list:
        exp = _fresh_export(p, p["tmp"])
        model = exp / "model.onnx"
        data = model.read_bytes()
        model.write_bytes({"random": os.urandom(200_000), "empty": b"", "truncated": data[: len(data) // 2]}[kind])
        return _quantize(p, exp)
    return argv


def _bad_manifest(text: str):
    def argv(p: dict) -> list:
        exp = _fresh_export(p, p["tmp"])
        (exp / "manifest.json").write_text(text)
        return _quantize(p, exp)
    return argv


BAD_MANIFESTS = {"not-json": "{", "artifact-not-object": '{"artifacts": [42]}',
                 "path-not-string": json.dumps({"artifacts": [{"name": "onnx-fp32", "target": "onnx", "precision": "fp32",
                                                               "path": 42, "input": {}, "output": {}, "produced_by": {},
                                                               "status": "ok"}]})}

QUANTIZE_ROWS = [
    *[Case(f"manifest-{k}", _bad_manifest(v), says="manifest.json", absent=["exp/model.int8.onnx"])
      for k, v in BAD_MANIFESTS.items()],
    Case("latency-negative", lambda p: _quantize(p, p["exp"], "--latency", -1), says="--latency"),
    Case("calib-count-zero", lambda p: _quantize(p, p["exp"], count=0), says="--calib-count"),
    Case("calib-count-text", lambda p: _quantize(p, p["exp"], count="many"), says="--calib-count"),
    Case("max-drop-negative", lambda p: _quantize(p, p["exp"], "--max-drop", -0.01), says="--max-drop"),
    Case("max-drop-nan", lambda p: _quantize(p, p["exp"], "--max-drop", "nan"), says="--max-drop"),
    Case("max-drop-one", lambda p: _quantize(p, p["exp"], "--max-drop", 1), says="--max-drop"),
    Case("fallback-steps-negative", lambda p: _quantize(p, p["exp"], "--max-fallback-steps", -2),
         says="--max-fallback-steps"),
    Case("threads-zero", lambda p: _quantize(p, p["exp"], "--threads", 0), says="--threads"),
    Case("exports-missing", lambda p: _quantize(p, p["tmp"] / "nope"), says="not found", absent=["nope"]),
    Case("library-log-unwritable", lambda p: _quantize(p, p["exp"], "--library-log",
                                                       unwritable_dir(p["tmp"]) / "q.log"), says="library-log"),
    Case("calib-dir-missing", lambda p: _quantize(p, p["exp"], calib=p["tmp"] / "no-calib"), says="not found"),
    Case("onnx-random-bytes", _damaged("random"), says="model.onnx",
         absent=["exp/model.int8.onnx", "exp/quantize_report.json"]),
    Case("onnx-empty", _damaged("empty"), says="model.onnx", absent=["exp/model.int8.onnx", "exp/quantize_report.json"]),
    Case("onnx-truncated", _damaged("truncated"), says="model.onnx",
         absent=["exp/model.int8.onnx", "exp/quantize_report.json"]),
]


@pytest.mark.parametrize("case", QUANTIZE_ROWS, ids=[c.id for c in QUANTIZE_ROWS])
def test_quantize_rows(case: Case, paths, tmp_path):
    p = {**paths, "tmp": tmp_path}
    before = (paths["exp"] / "manifest.json").read_bytes()
    r = run_cli("rdcd-quantize", case.args(p))
    assert_contract(r, case.code, case.says, "rdcd-quantize")
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    for exp in (paths["exp"], tmp_path / "exp"):
        if (exp / "manifest.json").exists() and not case.id.startswith("manifest-"):
            assert (exp / "manifest.json").read_bytes() == before, "the manifest changed"
        assert not leftovers(exp)


def _out_is_file(p: dict) -> Path:
    f = p["tmp"] / "out-file"
    f.write_text("a file\n")
    return f


def _export(p: dict, *extra, out=None) -> list:
    return ["--checkpoint", p["run"], "--target", "onnx", "--out", out or p["tmp"] / "out", *extra]


def _out_with_bad_manifest(p: dict) -> Path:
    out = p["tmp"] / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"artifacts": [42]}')
    return out


EXPORT_ROWS = [
    Case("out-with-malformed-manifest", lambda p: _export(p, out=_out_with_bad_manifest(p)), says="manifest.json",
         absent=["out/model.onnx"]),
    Case("bad-target", lambda p: _export(p, "--target", "tflite"), says="unknown target", absent=["out"]),
    Case("missing-checkpoint", lambda p: ["--checkpoint", p["tmp"] / "no-run", "--out", p["tmp"] / "out"],
         says="not found", absent=["out"]),
    Case("out-is-a-file", lambda p: _export(p, out=_out_is_file(p)), says="not a folder"),
    Case("out-unwritable", lambda p: _export(p, out=unwritable_dir(p["tmp"])), says="--out"),
    Case("trt-max-batch-zero", lambda p: _export(p, "--trt-max-batch", 0), says="--trt-max-batch", absent=["out"]),
    Case("batch-alias-negative", lambda p: _export(p, "--batch", -1), says="--batch", absent=["out"]),
    Case("size-zero", lambda p: _export(p, "--size", 0), says="--size", absent=["out"]),
    Case("threads-zero", lambda p: _export(p, "--threads", 0), says="--threads", absent=["out"]),
    Case("calib-dir-without-int8", lambda p: _export(p, "--calib-dir", p["calib"]), says="--calib-dir", absent=["out"]),
    Case("int8-without-calib-dir", lambda p: _export(p, "--int8"), says="--calib-dir", absent=["out"]),
]


@pytest.mark.parametrize("case", EXPORT_ROWS, ids=[c.id for c in EXPORT_ROWS])
def test_export_rows(case: Case, paths, tmp_path):
    r = run_cli("rdcd-export", case.args({**paths, "tmp": tmp_path}))
    assert_contract(r, case.code, case.says, "rdcd-export")
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


def _fake_stale(exp: Path) -> list[Path]:
    d = exp / f".quantize-work.rdcd-{DEAD_PID}.abc123"
    d.mkdir()
    (d / "model.pre.onnx").write_bytes(b"half")
    f = exp / f".model.int8.rdcd-{DEAD_PID}.xyz.tmp.onnx"
    f.write_bytes(b"half")
    return [d, f]


def test_calibration_skips_unreadable_files_and_counts_them(paths, tmp_path):
    exp = _fresh_export(paths, tmp_path)
    stale = _fake_stale(exp)
    r = run_cli("rdcd-quantize", _quantize(paths, exp, calib=paths["bad_calib"], count=len(PHOTOS)))
    assert_contract(r, 0)
    said = r.stdout + r.stderr  # the calibration summary, once (logged by quantize(), not printed again)
    assert said.count("calibration: 6 images from") == 1, said
    assert "4 skipped (3 unreadable, 1 with a non-UTF-8 name)" in said, said
    assert "empty.jpg" in r.stderr and "caf\\xe9.jpg" in r.stderr  # one warning each
    art = next(a for a in json.loads((exp / "manifest.json").read_text())["artifacts"] if a["name"] == "onnx-int8")
    assert art["calibration"]["images"] == 6 and art["calibration"]["skipped"] == 4
    assert art["calibration"]["skipped_unreadable"] == 3 and art["calibration"]["skipped_bad_names"] == 1
    report = json.loads((exp / "quantize_report.json").read_text())
    assert report["calibration"]["skipped"] == 4
    assert not any(s.exists() for s in stale), "the leftovers of a dead run were not removed"
    assert not leftovers(exp)


def test_disk_full_while_writing_keeps_the_manifest(paths, tmp_path):
    exp = _fresh_export(paths, tmp_path)
    before = (exp / "manifest.json").read_bytes()
    # reading the 16 MB FP32 model is unaffected; writing any model (work copies, the 4.5 MB INT8) fails
    r = run_cli("rdcd-quantize", _quantize(paths, exp), fsize=2_000_000)
    assert_contract(r, 2, "disk full", "rdcd-quantize")
    assert (exp / "manifest.json").read_bytes() == before
    assert not (exp / "model.int8.onnx").exists() and not (exp / "quantize_report.json").exists()
    assert not leftovers(exp)


def test_kill_9_leftovers_are_removed_by_the_next_run(paths, tmp_path):
    exp = _fresh_export(paths, tmp_path)
    proc = start_cli("rdcd-quantize", _quantize(paths, exp), tmp_path / "killed.log")
    try:
        wait_for(lambda: any(exp.glob(".quantize-work.rdcd-*")), timeout=120, proc=proc)
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(exp), "expected the killed run's work folder"
    r = run_cli("rdcd-quantize", _quantize(paths, exp))
    assert_contract(r, 0)
    assert not leftovers(exp)
    assert (exp / "model.int8.onnx").is_file()


def test_flag_names_are_consistent_and_old_spellings_still_work():
    from rdcd.export.cli import build_parser as export_parser
    from rdcd.quantize.cli import build_parser as quantize_parser

    e = export_parser()
    assert e.parse_args(["--batch", "4", "--calib", "x"]).trt_max_batch == 4  # hidden aliases
    assert e.parse_args(["--trt-max-batch", "4", "--calib-dir", "x"]).calib == "x"
    help_text = e.format_help()
    assert "--trt-max-batch" in help_text and "--calib-dir" in help_text
    assert "--batch " not in help_text and "--calib " not in help_text
    assert "--calib-dir" in quantize_parser().format_help()
