"""rdcd-validate (metrics, build-demo, eval, gate, merge), rdcd-bench and rdcd-index keep the command contract
(tests/contract.py): the tiny scikit-image benchmark and the 96 px student exported to ONNX, run as the
installed console scripts.

Rows: ground truth with a foreign header or about other queries, malformed predictions, bad numbers (parse
time), outputs that cannot be written (refused before any evaluation), a bench JSON of another file with the
same name, an export folder with nothing to gate. Runs: ids with commas and quotes round-trip through every
CSV; non-UTF-8 file names are skipped; a full disk exits 2 with no partial output and no temporary.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import onnx_export_dir

pytest.importorskip("onnxruntime")

from contract import Case, assert_contract, leftovers, non_utf8_name, run_cli, unwritable_dir  # noqa: E402

V, B, I = "rdcd-validate", "rdcd-bench", "rdcd-index"
FAST = ["--latency-iters", 2, "--warmup", 0, "--threads", 1]


def _write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_bench, student_run) -> dict:

    root = tmp_path_factory.mktemp("validate-contract")
    exp = onnx_export_dir(student_run, root / "exp")
    gt = tiny_bench / "ground_truth.csv"
    preds = _write_csv(root / "preds.csv", ("query_id", "reference_id", "score"),
                       [(q, r, 0.9) for q, r in list(csv.reader(open(gt)))[1:] if r])
    return {"root": root, "bench": tiny_bench, "exp": exp, "model": exp / "model.onnx", "gt": gt, "preds": preds,
            "refs": tiny_bench / "references"}


@pytest.fixture(scope="module")
def report(paths) -> Path:
    """A gate report of the FP32-only export (--allow-empty), for merge."""
    out = paths["root"] / "report"
    r = run_cli(V, ["gate", "--benchmark", paths["bench"], "--exports", paths["exp"], "--allow-empty",
                    "--report", out, *FAST])
    assert_contract(r, 0)
    assert "nothing to gate" in r.stdout
    return out


@pytest.fixture(scope="module")
def bench_json(paths) -> Path:
    out = paths["root"] / "bench.json"
    assert_contract(run_cli(B, ["--model", paths["model"], "--iters", 2, "--warmup", 0, "--threads", 1,
                                "--json", out]), 0)
    return out


# ------------------------------------------------------------------------------------------- metrics
def _gt(text: str):
    def argv(p):
        f = p["tmp"] / "gt.csv"
        f.write_text(text)
        return ["metrics", "--predictions", p["preds"], "--ground-truth", f]
    return argv


def _preds(text: str):
    def argv(p):
        f = p["tmp"] / "p.csv"
        f.write_text(text)
        return ["metrics", "--predictions", f, "--ground-truth", p["gt"]]
    return argv


def _metrics(*extra):
    return lambda p: ["metrics", "--predictions", p["preds"], "--ground-truth", p["gt"], *extra]


def _eval(*extra, model=None):
    return lambda p: ["eval", "--benchmark", p["bench"], "--model", model or p["model"], "--threads", 1, *extra]


def _demo(*extra, out=None):
    return lambda p: ["build-demo", out(p) if out else p["tmp"] / "demo", *extra]


def _gate(*extra, exports=None):
    return lambda p: ["gate", "--benchmark", p["bench"], "--exports", exports or p["exp"], *FAST, *extra]


VALIDATE_ROWS = [
    Case("gt-foreign-header", _gt("query,reference\nQ00000,R000000\n"), says="query_id,reference_id"),
    Case("gt-header-a-b", _gt("a,b\nQ00000,R000000\n"), says="expected the header query_id,reference_id"),
    Case("gt-no-header", _gt("Q00000,R000000\n"), says="header"),
    Case("gt-empty", _gt(""), says="header"),
    Case("gt-other-queries", _gt("query_id,reference_id\nX1,R000000\nX2,\n"), says="query ids"),
    Case("preds-other-queries", _preds("query_id,reference_id,score\nZ1,R000000,0.5\n"), says="query ids"),
    Case("preds-missing-column", _preds("query_id,reference_id,score\nQ00000,R000000\n"), says=":2:"),
    Case("preds-nan-score", _preds("query_id,reference_id,score\nQ00000,R000000,nan\n"), says=":2:"),
    Case("preds-text-score", _preds("query_id,reference_id,score\nQ00000,R000000,0.5\nQ00001,R000001,high\n"),
         says=":3:"),
    Case("preds-foreign-header", _preds("q,r,s\nQ00000,R000000,0.5\n"), says=":1:"),
    Case("max-per-query-zero", _metrics("--max-per-query", 0), says="--max-per-query"),
    Case("max-per-query-negative", _metrics("--max-per-query", -1), says="--max-per-query"),
    Case("eval-k-zero", _eval("--k", 0), says="--k"),
    Case("eval-k-negative", _eval("--k", -1), says="--k"),
    Case("eval-batch-zero", _eval("--batch-size", 0), says="--batch-size"),
    Case("eval-batch-negative", _eval("--batch-size", -1), says="--batch-size"),
    Case("eval-threads-zero", _eval("--threads", 0), says="--threads"),
    Case("eval-student-dim-zero", _eval(model="student:efficientnet_lite0:0"), says="student:efficientnet_lite0:0"),
    Case("eval-student-dim-text", _eval(model="student:efficientnet_lite0:big"), says="not an integer"),
    Case("eval-student-no-backbone", _eval(model="student:"), says="student:BACKBONE"),
    Case("eval-predictions-out-unwritable", _eval("--predictions-out", lambda: None), says="--predictions-out"),
    Case("demo-queries-per-ref-zero", _demo("--queries-per-ref", 0), says="--queries-per-ref", absent=["demo"]),
    Case("demo-holdout-negative", _demo("--holdout", -1), says="--holdout", absent=["demo"]),
    Case("demo-out-unwritable", _demo(out=lambda p: unwritable_dir(p["tmp"])), says="OUT"),
    Case("gate-report-unwritable", _gate("--report", lambda: None), says="--report"),
    Case("gate-report-is-file", lambda p: _gate("--report", _file(p))(p), says="--report"),
    Case("gate-k-zero", _gate("--k", 0), says="--k"),
    Case("gate-max-drop-negative", _gate("--max-drop", -0.1), says="--max-drop"),
    Case("gate-nothing-to-gate", _gate(), code=1, says="nothing to gate"),
]


def _file(p) -> Path:
    f = p["tmp"] / "a-file"
    f.write_text("x\n")
    return f


def _resolve(argv: list, p: dict) -> list:
    """A ``lambda: None`` placeholder in a row is an unwritable path under the test's tmp dir."""
    return [unwritable_dir(p["tmp"]) / "out.csv" if callable(a) else a for a in argv]


@pytest.mark.parametrize("case", VALIDATE_ROWS, ids=[c.id for c in VALIDATE_ROWS])
def test_validate_rows(case: Case, paths, tmp_path):
    p = {**paths, "tmp": tmp_path}
    argv = case.argv(p)
    r = run_cli(V, [str(a) for a in _resolve(list(argv), p)], timeout=300)
    assert_contract(r, case.code, case.says)
    assert r.error_lines[0].startswith(V)  # "rdcd-validate: error:" or "rdcd-validate metrics: error:"
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    assert not leftovers(tmp_path)
    if case.id.startswith(("eval-", "gate-")):
        assert "µAP" not in r.stderr + r.stdout or case.code == 1, "the evaluation ran before the check"


# --------------------------------------------------------------------------------------- bench, index
def _bench(*extra):
    return lambda p: ["--model", p["model"], "--iters", 2, "--warmup", 0, "--threads", 1, *extra]


BENCH_ROWS = [
    Case("size-not-the-fixed-size", _bench("--size", 64, "--json", lambda: None), says="fixed at 96"),
    Case("batch-too-large-for-memory", lambda p: _bench("--batch", 100000, "--json", p["tmp"] / "b.json")(p),
         says="--batch", absent=["b.json"]),
    Case("json-unwritable", _bench("--json", lambda: None), says="--json"),
    Case("json-is-folder", lambda p: _bench("--json", p["tmp"])(p), says="--json"),
]


@pytest.mark.parametrize("case", BENCH_ROWS, ids=[c.id for c in BENCH_ROWS])
def test_bench_rows(case: Case, paths, tmp_path):
    p = {**paths, "tmp": tmp_path}
    if case.id == "size-not-the-fixed-size":  # the unwritable --json of the row: use a writable one here
        argv = [a if not callable(a) else tmp_path / "b.json" for a in case.argv(p)]
    else:
        argv = _resolve(list(case.argv(p)), p)
    r = run_cli(B, argv, timeout=300)
    assert_contract(r, case.code, case.says, B)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    assert not leftovers(tmp_path)


INDEX_ROWS = [
    Case("search-k-zero", lambda p: ["search", "--index", p["tmp"] / "none", "--images", p["refs"], "--k", 0,
                                     "--out", p["tmp"] / "m.csv"], says="--k", absent=["m.csv"]),
    Case("build-out-unwritable", lambda p: ["build", "--model", p["model"], "--images", p["refs"],
                                            "--out", unwritable_dir(p["tmp"])], says="--out"),
    Case("search-out-unwritable", lambda p: ["search", "--index", p["tmp"] / "none", "--images", p["refs"],
                                             "--out", unwritable_dir(p["tmp"]) / "m.csv"], says="--out"),
    Case("batch-size-zero", lambda p: ["build", "--model", p["model"], "--images", p["refs"], "--out", p["tmp"] / "i",
                                       "--batch-size", 0], says="--batch-size", absent=["i"]),
]


@pytest.mark.parametrize("case", INDEX_ROWS, ids=[c.id for c in INDEX_ROWS])
def test_index_rows(case: Case, paths, tmp_path):
    pytest.importorskip("faiss")
    r = run_cli(I, case.args({**paths, "tmp": tmp_path}), timeout=300)
    assert_contract(r, case.code, case.says, I)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


# -------------------------------------------------------------------------------------------- merge
def test_merge_refuses_another_file_of_the_same_name(paths, report, bench_json, tmp_path):
    before = (report / "report.json").read_bytes()
    rec = json.loads(bench_json.read_text())
    rec["model"]["sha256"] = "f" * 64  # model.onnx benched on a device, but another export of that name
    other = tmp_path / "other.json"
    other.write_text(json.dumps(rec))
    r = run_cli(V, ["merge", "--report", report, "--bench-json", other])
    assert_contract(r, 2, "model.onnx", V)
    assert "onnx-fp32" in r.error_lines[0] and "ffffffffffff" in r.error_lines[0]
    assert (report / "report.json").read_bytes() == before
    # the file that was evaluated merges, matched by its content
    r = run_cli(V, ["merge", "--report", report, "--bench-json", bench_json])
    assert_contract(r, 0)
    cells = json.loads((report / "report.json").read_text())["artifacts"][0]["devices"]
    assert [c["matched_by"] for c in cells.values()] == ["sha256"]


# --------------------------------------------------------------------------------------- full disk
def _no_partial(folder: Path, names) -> None:
    for n in names:
        assert not (folder / n).exists(), n
    assert not leftovers(folder)


def test_full_disk_gate_report(paths, tmp_path):
    out = tmp_path / "report"
    r = run_cli(V, [*_gate("--allow-empty", "--report", out)(paths)], fsize=3000)
    assert_contract(r, 2, "disk full", V)
    _no_partial(out, ["report.json", "report.md", "pr_curve.png", "latency.png"])


def test_full_disk_merge_keeps_the_report(paths, report, bench_json, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    before = {f.name: f.read_bytes() for f in copy.iterdir()}
    r = run_cli(V, ["merge", "--report", copy, "--bench-json", bench_json], fsize=3000)
    assert_contract(r, 2, "disk full", V)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before and not leftovers(copy)


def test_full_disk_eval_predictions_and_bench_json(paths, tmp_path):
    out = tmp_path / "preds.csv"
    r = run_cli(V, _eval("--predictions-out", out)(paths), fsize=1000)
    assert_contract(r, 2, "disk full", V)
    _no_partial(tmp_path, ["preds.csv"])
    r = run_cli(B, _bench("--json", tmp_path / "b.json")(paths), fsize=300)
    assert_contract(r, 2, "disk full", B)
    _no_partial(tmp_path, ["b.json"])


def test_full_disk_build_demo(tmp_path):
    r = run_cli(V, ["build-demo", tmp_path / "demo"], fsize=20_000)
    assert_contract(r, 2, "disk full", V)
    _no_partial(tmp_path, ["demo"])


# ---------------------------------------------------------------------------------------- CSV is CSV
def test_ids_with_commas_and_quotes_round_trip(paths, tmp_path):
    """Queries named ``a,b`` and ``say "cheese"``: eval's predictions CSV, read back by metrics, gives eval's µAP;
    a non-UTF-8 query file name is skipped with a warning."""
    bench = tmp_path / "bench"
    shutil.copytree(paths["bench"], bench)
    rename = {"Q00000": "a,b", "Q00001": 'say "cheese"'}
    for old, new in rename.items():
        (bench / "queries" / f"{old}.jpg").rename(bench / "queries" / f"{new}.jpg")
    with open(bench / "ground_truth.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    _write_csv(bench / "ground_truth.csv", None, [[rename.get(q, q), r] for q, r in rows])
    non_utf8_name(bench / "queries")
    preds = tmp_path / "preds.csv"
    r = run_cli(V, ["eval", "--benchmark", bench, "--model", paths["model"], "--threads", 1,
                    "--predictions-out", preds])
    assert_contract(r, 0)
    assert "caf\\xe9.jpg" in r.stderr  # skipped, with a warning naming it
    uap = json.loads(r.stdout)["micro_ap"]
    with open(preds, newline="") as fh:
        got = {row[0] for row in csv.reader(fh)}
    assert {"a,b", 'say "cheese"'} <= got
    m = run_cli(V, ["metrics", "--predictions", preds, "--ground-truth", bench / "ground_truth.csv"])
    assert_contract(m, 0)
    assert json.loads(m.stdout)["micro_ap"] == pytest.approx(uap, abs=1e-9)


def test_build_demo_folder_with_odd_names(skimage_dir, tmp_path):
    """Source names with commas and quotes survive sources.csv (read back with csv); a non-UTF-8 name is skipped."""
    src = tmp_path / "pool"
    src.mkdir()
    for i, p in enumerate(sorted(skimage_dir.glob("*.png"))[:10]):
        shutil.copy(p, src / (f'photo,{i} "x".png' if i < 3 else p.name))
    non_utf8_name(src)
    r = run_cli(V, ["build-demo", tmp_path / "demo", "--source", src])
    assert_contract(r, 0)
    from rdcd.validate.demo import used_sources

    used = used_sources(tmp_path / "demo")
    assert used <= {p.name for p in src.iterdir()} and 'photo,0 "x".png' in used
    with open(tmp_path / "demo" / "sources.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len({Path(row["source"]).name for row in rows}) == 10  # the non-UTF-8 name was skipped
    assert all(set(row) == {"role", "id", "source", "edits"} for row in rows)


def test_index_build_skips_non_utf8_names(paths, tmp_path):
    pytest.importorskip("faiss")
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted(paths["refs"].iterdir())[:5]:
        os.link(p, refs / p.name)
    shutil.copy(refs / sorted(os.listdir(refs))[0], refs / "ref,1.jpg")
    non_utf8_name(refs)
    r = run_cli(I, ["build", "--model", paths["model"], "--images", refs, "--out", tmp_path / "idx", "--threads", 1])
    assert_contract(r, 0)
    assert "caf\\xe9.jpg" in r.stderr and ": 6 references" in r.stdout
    r = run_cli(I, ["search", "--index", tmp_path / "idx", "--images", refs, "--out", tmp_path / "m.csv", "--k", 1])
    assert_contract(r, 0)
    with open(tmp_path / "m.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert any(row[0] == "ref,1" for row in rows)  # an id with a comma, quoted by the csv module


def test_rdcd_debug_shows_the_library_failure_behind_a_line(monkeypatch, capsys):
    from rdcd import cli
    from rdcd.errors import RdcdError

    def fails(argv):
        try:
            int("x")
        except ValueError as exc:
            raise RdcdError("a library failed") from exc

    assert cli.run(fails, []) == 2 and capsys.readouterr().err.strip().endswith("error: a library failed")
    monkeypatch.setenv("RDCD_DEBUG", "1")
    assert cli.run(fails, []) == 2
    err = capsys.readouterr().err
    assert "ValueError: invalid literal" in err and "Traceback" in err and err.strip().endswith("a library failed")
