"""``rdcd-index``: build -> add -> search on scikit-image photos (faiss and Milvus Lite), scored by
``rdcd-validate metrics``; model mismatch, duplicates, thresholds, codes, IVF/PQ; no torch."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SIZE, onnx_export_dir

from rdcd.fsutil import sha256
from rdcd.validate.cli import main as validate_main
from rdcd.validate.index_cli import main as index_main

pytest.importorskip("onnxruntime")
pytest.importorskip("faiss")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(student_run, tmp_path_factory) -> Path:
    return onnx_export_dir(student_run, tmp_path_factory.mktemp("index-exports"))


@pytest.fixture(scope="module")
def split(tiny_bench, tmp_path_factory) -> tuple[Path, Path]:
    """The references in two folders (built from, then added), the first with one unreadable file."""
    root = tmp_path_factory.mktemp("refs")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    refs = sorted((tiny_bench / "references").iterdir())
    for i, p in enumerate(refs):
        os.link(p, (a if i < len(refs) // 2 else b) / p.name)
    (a / "R_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return a, b


@pytest.fixture(scope="module")
def direct_uap(exports, tiny_bench) -> float:
    """µAP of the same artifact computed without the index (rdcd-validate eval's path)."""
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.models import resolve_model

    bench = load_benchmark(tiny_bench)
    emb, spec, label = resolve_model(str(exports / "model.onnx"), threads=1)
    return evaluate_descriptors(bench, describe(bench, emb, spec, 32, label=label), k=10).metrics.micro_ap


def run(capsys, *args) -> tuple[int, str, str]:
    rc = index_main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def fails(capsys, *args) -> str:
    rc, _, err = run(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ": error: " in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def metrics(capsys, preds: Path, gt: Path) -> dict:
    assert validate_main(["metrics", "--predictions", str(preds), "--ground-truth", str(gt)]) == 0
    return json.loads(capsys.readouterr().out)


def read_matches(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["query_id", "reference_id", "score"]
    return rows[1:]


def identity_gt(folder: Path, out: Path) -> Path:
    ids = sorted(p.stem for p in folder.iterdir())
    out.write_text("query_id,reference_id\n" + "".join(f"{i},{i}\n" for i in ids))
    return out


def test_faiss_build_add_search_round_trip(exports, tiny_bench, split, direct_uap, tmp_path, capsys, caplog):
    a, b = split
    idx = tmp_path / "refs.idx"
    caplog.set_level(logging.INFO, logger="rdcd.index")
    rc, out, err = run(capsys, "build", "--model", exports, "--images", a, "--out", idx, "--threads", 1,
                       "--log-every", 5, "--batch-size", 4)
    assert rc == 0 and "1 unreadable skipped" in out, err
    progress = [r.getMessage() for r in caplog.records if r.name == "rdcd.index"]
    assert len(progress) == 3 and progress[0].startswith("references: 8/15 images") and "1 unreadable" in progress[-1]
    bad = [r for r in caplog.records if "R_broken.jpg" in r.getMessage()]
    assert len(bad) == 1 and bad[0].levelname == "WARNING"  # one warning for the bad file
    meta = json.loads((idx / "index.json").read_text())
    n_a, n_b = len(list(a.iterdir())) - 1, len(list(b.iterdir()))
    assert meta["schema"] == "rdcd-index/1" and meta["backend"] == "faiss" and meta["codes"] == "fp32"
    assert meta["model"]["sha256"] == sha256(exports / "model.onnx") and meta["model"]["artifact"] == "onnx-fp32"
    assert meta["dim"] == 128 and meta["preprocess"]["size"] == TEST_SIZE and meta["count"] == n_a
    assert meta["history"][0]["unreadable"] == 1 and meta["ivf"] is None
    assert sorted(p.name for p in idx.iterdir()) == ["ids.npz", "index.faiss", "index.json"]

    rc, out, _ = run(capsys, "add", "--index", idx, "--images", b)  # the index's own model
    assert rc == 0 and f"+{n_b} references" in out
    assert "already in the index" in fails(capsys, "add", "--index", idx, "--images", b)
    rc, out, _ = run(capsys, "add", "--index", idx, "--images", b, "--replace")
    assert rc == 0 and f"{n_b} replaced" in out and f"({n_a + n_b} in all)" in out
    assert "exists" in fails(capsys, "build", "--model", exports, "--images", a, "--out", idx)

    matches = tmp_path / "matches.csv"
    rc, out, _ = run(capsys, "search", "--index", idx, "--images", tiny_bench / "queries", "--out", matches)
    assert rc == 0
    rows = read_matches(matches)
    per_query = {}
    for q, r, s in rows:
        per_query.setdefault(q, []).append(float(s))
    assert len(per_query) == len(list((tiny_bench / "queries").iterdir()))
    assert all(len(v) == 10 and v == sorted(v, reverse=True) for v in per_query.values())
    m = metrics(capsys, matches, tiny_bench / "ground_truth.csv")
    assert m["micro_ap"] == pytest.approx(direct_uap, abs=1e-6) and m["micro_ap"] > 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matches.csv", "refs.idx"]  # no temporaries left

    rc, out, _ = run(capsys, "info", "--index", idx)
    info = json.loads(out)
    assert rc == 0 and info["live"]["count"] == n_a + n_b and [h["op"] for h in info["history"]] == ["build", "add", "add"]


def test_score_norm_matches_the_evaluation(exports, tiny_bench, tmp_path, capsys):
    """--background at build + --score-norm at search give the µAP of rdcd-validate eval --score-norm."""
    from rdcd.benchmark import load_benchmark
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.models import resolve_model

    bench = load_benchmark(tiny_bench)
    emb, spec, label = resolve_model(str(exports / "model.onnx"), threads=1)
    desc = describe(bench, emb, spec, 32, with_training=True, label=label)
    raw = evaluate_descriptors(bench, desc, k=10).metrics.micro_ap
    normed = evaluate_descriptors(bench, desc, k=10, score_norm="1.0[0,2]").metrics.micro_ap
    assert abs(normed - raw) > 1e-4  # the normalisation changes the cross-query ranking here

    idx = tmp_path / "bg.idx"
    assert run(capsys, "build", "--model", exports, "--images", tiny_bench / "references", "--out", idx,
               "--background", tiny_bench / "training")[0] == 0
    meta = json.loads((idx / "index.json").read_text())
    assert meta["background"]["count"] == len(list((tiny_bench / "training").iterdir()))
    assert (idx / "background.npy").is_file()
    matches = tmp_path / "normed.csv"
    assert run(capsys, "search", "--index", idx, "--images", tiny_bench / "queries", "--out", matches,
               "--score-norm", "1.0[0,2]")[0] == 0
    assert metrics(capsys, matches, tiny_bench / "ground_truth.csv")["micro_ap"] == pytest.approx(normed, abs=1e-6)
    assert run(capsys, "add", "--index", idx, "--images", tiny_bench / "queries")[0] == 0
    assert (idx / "background.npy").is_file()  # an add keeps the background

    plain = tmp_path / "plain.idx"
    assert run(capsys, "build", "--model", exports, "--images", tiny_bench / "references", "--out", plain)[0] == 0
    assert "built without --background" in fails(capsys, "search", "--index", plain, "--images", tiny_bench / "queries",
                                                 "--out", tmp_path / "x.csv", "--score-norm", "1.0[0,2]")
    assert "BETA[START,END]" in fails(capsys, "search", "--index", idx, "--images", tiny_bench / "queries",
                                      "--out", tmp_path / "x.csv", "--score-norm", "lots")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("codes", ["fp32", "int8", "binary"])
def test_codes_find_each_reference_itself(codes, exports, tiny_bench, tmp_path, capsys):
    refs = tiny_bench / "references"
    idx = tmp_path / f"{codes}.idx"
    assert run(capsys, "build", "--model", exports / "model.onnx", "--images", refs, "--out", idx, "--codes", codes)[0] == 0
    meta = json.loads((idx / "index.json").read_text())
    assert meta["codes"] == codes and meta["bytes_per_reference"] == {"fp32": 512, "int8": 128, "binary": 16}[codes]
    if codes == "binary":
        assert len(meta["binary"]["center"]) == 128
    out = tmp_path / "self.csv"
    assert run(capsys, "search", "--index", idx, "--images", refs, "--out", out, "--k", 3)[0] == 0
    m = metrics(capsys, out, identity_gt(refs, tmp_path / "gt.csv"))
    assert m["acc_at_1"] == 1.0 and m["micro_ap"] > 0.95
    top = [float(s) for q, r, s in read_matches(out) if q == r]
    assert min(top) > (0.99 if codes != "int8" else 0.95)


def test_model_mismatch_refused(exports, tiny_bench, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    idx = tmp_path / "idx"
    assert run(capsys, "build", "--model", exports, "--images", tiny_bench / "references", "--out", idx)[0] == 0
    graph = helper.make_graph(  # another real descriptor model: mean colour, L2-normalised
        [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
         helper.make_node("LpNormalization", ["m"], ["descriptor"], axis=1, p=2)], "mean_colour",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "h", "w", 3])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 3])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    out = tmp_path / "m.csv"
    for cmd in (["search", "--out", out], ["add"]):
        err = fails(capsys, *cmd, "--index", idx, "--images", tiny_bench / "queries", "--model", other, "--size", TEST_SIZE)
        assert "is not the model this index was built with" in err
    assert not out.exists() and json.loads((idx / "index.json").read_text())["count"] == 28


def test_threshold_auto(exports, tiny_bench, tmp_path, capsys):
    from rdcd.validate.report import SCHEMA

    idx, q = tmp_path / "idx", tiny_bench / "queries"
    assert run(capsys, "build", "--model", exports, "--images", tiny_bench / "references", "--out", idx)[0] == 0
    assert "no measured operating point" in fails(capsys, "search", "--index", idx, "--images", q,
                                                  "--out", tmp_path / "x.csv", "--threshold", "auto")
    sha = sha256(exports / "model.onnx")
    report = tmp_path / "gate" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"schema": SCHEMA, "settings": {"whiten": False, "score_norm": None},
                                  "artifacts": [{"name": "onnx-fp32", "path": "model.onnx", "status": "ok", "sha256": sha,
                                                 "threshold_at_p90": 0.9}]}))
    out = tmp_path / "thr.csv"
    assert run(capsys, "search", "--index", idx, "--images", q, "--out", out, "--threshold", "auto",
               "--report", report.parent)[0] == 0
    rows = read_matches(out)
    assert 0 < len(rows) < 280 and all(float(s) >= 0.9 for _, _, s in rows)
    assert run(capsys, "search", "--index", idx, "--images", q, "--out", tmp_path / "f.csv", "--threshold", "0.95")[0] == 0
    assert all(float(s) >= 0.95 for _, _, s in read_matches(tmp_path / "f.csv"))
    # recorded at build time: auto works without --report afterwards
    idx2 = tmp_path / "idx2"
    assert run(capsys, "build", "--model", exports, "--images", tiny_bench / "references", "--out", idx2,
               "--report", report)[0] == 0
    assert json.loads((idx2 / "index.json").read_text())["operating_point"]["threshold_at_p90"] == 0.9
    assert run(capsys, "search", "--index", idx2, "--images", q, "--out", tmp_path / "a.csv", "--threshold", "auto")[0] == 0
    assert read_matches(tmp_path / "a.csv") == rows
    report.write_text(json.dumps({"schema": SCHEMA, "settings": {"whiten": True},
                                  "artifacts": [{"name": "onnx-fp32", "path": "model.onnx", "status": "ok", "sha256": sha,
                                                 "threshold_at_p90": 0.5}]}))
    assert "whitened" in fails(capsys, "search", "--index", idx, "--images", q, "--out", tmp_path / "w.csv",
                               "--threshold", "auto", "--report", report)


def test_ivf_pq_plan_and_replace():
    from rdcd.validate.index import FaissStore, ivf_plan, new_meta, pq_subquantizers

    assert ivf_plan(1_000_000, "fp32") == {"nlist": 4000, "nprobe": 250}
    assert ivf_plan(10_000, "fp32") is None and ivf_plan(10_000, "pq") == {"nlist": 256, "nprobe": 16}
    assert ivf_plan(500, "int8", "off") is None and pq_subquantizers(128) == 32 and pq_subquantizers(96) == 24
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"R{i:05d}" for i in range(len(x))]
    for codes, ivf in (("pq", "auto"), ("fp32", "8"), ("int8", "8"), ("binary", "8")):
        meta = new_meta({"sha256": "s", "name": "m"}, 32, {"size": 96}, codes, "stem", ivf_plan(len(x), codes, ivf),
                        pq_subquantizers(32) if codes == "pq" else None)
        store = FaissStore.create(meta, x)
        store.add(ids[:1500], x[:1500])
        store.add(ids[1500:], x[1500:])
        noisy = x[:100] + 0.03 * rng.standard_normal((100, 32)).astype(np.float32)
        top1 = np.mean([h[0][0] == ids[i] for i, h in enumerate(store.search(noisy, 5, nprobe=8))])
        assert top1 > (0.9 if codes == "binary" else 0.97), (codes, top1)
        store.add(ids[:3], -x[:3], replace=True)  # replaced: now found at the negated vectors
        assert store.count == len(x) and [h[0][0] for h in store.search(-x[:3], 1, nprobe=8)] == ids[:3]
    from rdcd.errors import RdcdError

    meta = new_meta({"sha256": "s"}, 32, {}, "pq", "stem", ivf_plan(100, "pq"), 8)
    with pytest.raises(RdcdError, match="at least 1000"):
        FaissStore.create(meta, x[:100])


@pytest.fixture(scope="module")
def milvus_lite(tmp_path_factory):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from pymilvus import MilvusClient

    try:
        MilvusClient(str(tmp_path_factory.mktemp("probe") / "probe.db")).close()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Milvus Lite cannot start here: {exc}")


def test_milvus_lite_round_trip(milvus_lite, exports, tiny_bench, split, direct_uap, tmp_path, capsys):
    a, b = split
    idx, db = tmp_path / "mil.idx", tmp_path / "refs.db"
    rc, out, err = run(capsys, "build", "--model", exports, "--images", a, "--out", idx, "--uri", db)
    assert rc == 0 and "Milvus rdcd_mil" in out, err
    meta = json.loads((idx / "index.json").read_text())
    assert meta["backend"] == "milvus" and meta["milvus"]["uri"] == str(db.resolve()) and meta["milvus"]["lite"]
    assert sorted(p.name for p in idx.iterdir()) == ["index.json"]
    assert run(capsys, "add", "--index", idx, "--images", b)[0] == 0
    assert "already in the index" in fails(capsys, "add", "--index", idx, "--images", b)
    rc, out, _ = run(capsys, "add", "--index", idx, "--images", b, "--replace")
    assert rc == 0 and "replaced" in out and "(28 in all)" in out
    matches = tmp_path / "matches.csv"
    assert run(capsys, "search", "--index", idx, "--images", tiny_bench / "queries", "--out", matches)[0] == 0
    assert metrics(capsys, matches, tiny_bench / "ground_truth.csv")["micro_ap"] == pytest.approx(direct_uap, abs=1e-5)
    rc, out, _ = run(capsys, "info", "--index", idx)
    assert rc == 0 and json.loads(out)["live"]["count"] == 28
    assert "exists" in fails(capsys, "build", "--model", exports, "--images", a, "--out", tmp_path / "other",
                             "--uri", db, "--collection", "rdcd_mil")
    assert "no binary vectors" in fails(capsys, "build", "--model", exports, "--images", a, "--out", tmp_path / "bin",
                                        "--uri", db, "--codes", "binary")
    assert ".db" in fails(capsys, "build", "--model", exports, "--images", a, "--out", tmp_path / "x", "--uri", "refs.sqlite")


def test_bad_usage(exports, tiny_bench, tmp_path, capsys):
    refs = tiny_bench / "references"
    assert "image folder not found" in fails(capsys, "build", "--model", exports, "--images", tmp_path / "no",
                                             "--out", tmp_path / "i")
    assert "model not found" in fails(capsys, "build", "--model", tmp_path / "no.onnx", "--images", refs,
                                      "--out", tmp_path / "i")
    assert "--ivf must be" in fails(capsys, "build", "--model", exports, "--images", refs, "--out", tmp_path / "i",
                                    "--ivf", "many")
    assert "at least 1000" in fails(capsys, "build", "--model", exports, "--images", refs, "--out", tmp_path / "i",
                                    "--codes", "pq")
    assert "index not found" in fails(capsys, "search", "--index", tmp_path / "none", "--images", refs,
                                      "--out", tmp_path / "m.csv")
    (tmp_path / "file").write_text("x")
    assert "not an rdcd index" in fails(capsys, "build", "--model", exports, "--images", refs, "--out", tmp_path / "file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    shutil.copy2(next(refs.iterdir()), tmp_path / "empty" / "sub")
    assert "--ids relpath" in fails(capsys, "build", "--model", exports, "--images", tmp_path / "empty",
                                    "--out", tmp_path / "i")
    assert "--k must be" in fails(capsys, "search", "--index", tmp_path / "none", "--images", refs, "--k", 0,
                                  "--out", tmp_path / "m.csv")
    assert not (tmp_path / "i").exists() and not (tmp_path / "m.csv").exists()
    with pytest.raises(SystemExit) as e:
        index_main(["build", "--model", str(exports), "--images", str(refs), "--out", "x", "--codes", "fp16"])
    assert e.value.code == 2


NO_TORCH = textwrap.dedent("""
    import json, sys
    import rdcd.validate.index_cli as index_cli
    heavy = ("torch", "onnxruntime", "onnx", "faiss", "pymilvus", "matplotlib")
    after_import = sorted(m for m in heavy if m in sys.modules)
    out, refs, queries = sys.argv[1:4]
    rcs = [index_cli.main(["build", "--model", sys.argv[4], "--images", refs, "--out", out, "--ids", "relpath"]),
           index_cli.main(["search", "--index", out, "--images", queries, "--out", out + ".csv"])]
    print(json.dumps({"rcs": rcs, "after_import": after_import, "torch": "torch" in sys.modules}))
""")


def test_index_imports_no_torch(exports, tiny_bench, tmp_path):
    nested = tmp_path / "nested"
    (nested / "x").mkdir(parents=True)
    for p in sorted((tiny_bench / "references").iterdir())[:4]:
        os.link(p, nested / "x" / p.name)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "idx"), str(nested), str(tiny_bench / "queries"),
                           str(exports / "model.onnx")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rcs": [0, 0], "after_import": [], "torch": False}
    refs = {r for _, r, _ in read_matches(tmp_path / "idx.csv")}
    assert refs and all(r.startswith("x/") for r in refs)  # --ids relpath
