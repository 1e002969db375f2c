"""DISC2021 layout reading, the demo benchmark builder, and end-to-end evaluation of real baselines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rdcd.benchmark import load_benchmark
from rdcd.errors import RdcdError
from rdcd.validate.demo import DemoConfig, build_demo, holdout_names, used_sources
from rdcd.validate.evaluate import describe, evaluate_descriptors


def test_demo_benchmark_layout(tiny_bench):
    b = load_benchmark(tiny_bench)
    s = b.summary()
    assert s["references"] >= 20 and s["negative_queries"] >= 5 and s["true_pairs"] >= 10 and s["training"] >= 10
    # every true pair points to existing files; negatives are listed with an empty reference
    text = (tiny_bench / "ground_truth.csv").read_text().splitlines()
    assert text[0] == "query_id,reference_id" and any(line.endswith(",") for line in text[1:])
    sources = (tiny_bench / "sources.csv").read_text()
    assert "negative" in sources and "skimage:" in sources


def test_demo_is_deterministic(tmp_path):
    a = build_demo(tmp_path / "a", DemoConfig(seed=3))
    b = build_demo(tmp_path / "b", DemoConfig(seed=3))
    assert (a / "ground_truth.csv").read_text() == (b / "ground_truth.csv").read_text()
    assert (a / "sources.csv").read_text() == (b / "sources.csv").read_text()


def test_folder_source_holdout(tmp_path, skimage_dir):
    src = tmp_path / "pool"
    src.mkdir()
    for p in sorted(skimage_dir.glob("*.png"))[:14]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpg").write_bytes(b"garbage")
    chosen = holdout_names(src, 10)
    assert len(chosen) == 10 and chosen == holdout_names(src, 10)
    bench = build_demo(tmp_path / "b", DemoConfig(source=str(src), holdout=0, seed=1))
    assert used_sources(bench) <= {p.name for p in src.iterdir()}
    assert "broken.jpg" not in used_sources(bench)


def _copy(tiny_bench, tmp_path):
    dst = tmp_path / "bench"
    shutil.copytree(tiny_bench, dst)
    return dst


def test_malformed_ground_truth_is_a_clear_error(tiny_bench, tmp_path):
    b = _copy(tiny_bench, tmp_path)
    gt = b / "ground_truth.csv"
    original = gt.read_text()
    gt.write_text(original + "Q99999,R000000\n")
    with pytest.raises(RdcdError, match="query ids match no file"):
        load_benchmark(b)
    gt.write_text(original + "Q00000,R999999\n")
    with pytest.raises(RdcdError, match="reference ids match no file"):
        load_benchmark(b)
    gt.write_text(original + "Q00000,R000000,extra\n")
    with pytest.raises(RdcdError, match=r"ground_truth.csv:\d+: expected 2 columns"):
        load_benchmark(b)
    gt.unlink()
    with pytest.raises(RdcdError, match="no ground truth"):
        load_benchmark(b)
    with pytest.raises(RdcdError, match="benchmark not found"):
        load_benchmark(tmp_path / "nothing")


def test_teacher_and_pdq_on_demo(tiny_bench):
    """The offline SSCD teacher and PDQ run end to end; the teacher must clearly beat chance."""
    from rdcd.validate.models import resolve_model

    bench = load_benchmark(tiny_bench)
    for spec in ("teacher", "pdq"):
        emb, pspec, label = resolve_model(spec)
        res = evaluate_descriptors(bench, describe(bench, emb, pspec, with_training=True))
        assert 0.0 <= res.metrics.micro_ap <= 1.0
        if spec == "teacher":
            assert res.dim == 512 and res.metrics.acc_at_1 > 0.7, res.row()
            norm = evaluate_descriptors(bench, describe(bench, emb, pspec), score_norm="1.0[0,2]")
            assert norm.setting == "norm 1[0,2]"
            wh = evaluate_descriptors(bench, describe(bench, emb, pspec), whiten=True)
            assert wh.setting.startswith("PCAW")


def test_eval_cli_writes_predictions_that_metrics_cli_reproduces(tiny_bench, tmp_path):
    pred = tmp_path / "pred.csv"
    out = subprocess.run([sys.executable, "-m", "rdcd.validate.cli", "eval", "--benchmark", str(tiny_bench),
                          "--model", "pdq", "--predictions-out", str(pred)], capture_output=True, text=True, check=True)
    ev = json.loads(out.stdout)
    out = subprocess.run([sys.executable, "-m", "rdcd.validate.cli", "metrics", "--predictions", str(pred),
                          "--ground-truth", str(tiny_bench / "ground_truth.csv")], capture_output=True, text=True,
                         check=True)
    assert abs(json.loads(out.stdout)["micro_ap"] - ev["micro_ap"]) < 1e-6


def test_mixed_sources_and_recorded_config(tmp_path, skimage_dir):
    """Two folders mixed into one benchmark (as the demo mixes pool and photos); a rebuild with other
    settings is refused instead of silently reusing the old benchmark."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pngs = sorted(skimage_dir.glob("*.png"))
    for p in pngs[:8]:
        shutil.copy(p, a / p.name)
    for p in pngs[8:18]:
        shutil.copy(p, b / p.name)
    cfg = DemoConfig(source=str(a), holdout=6, extra=((str(b), 8),), queries_per_ref=2, positive_share=0.7, seed=2)
    bench = build_demo(tmp_path / "mixed", cfg)
    used = used_sources(bench)
    assert used & {p.name for p in a.iterdir()} and used & {p.name for p in b.iterdir()}
    assert len(used) == 14  # 6 held out of a, 8 of b
    pairs = load_benchmark(bench).gt_pairs
    assert len(pairs) == 2 * len({r for _, r in pairs})  # two edited copies per matched reference
    assert build_demo(tmp_path / "mixed", cfg) == bench  # same settings: reused
    with pytest.raises(RdcdError, match="other settings"):
        build_demo(tmp_path / "mixed", DemoConfig(source=str(a), holdout=6, seed=2))
