"""rdcd-demo (the README's main job): stage selection, the scikit-image fallback, bad usage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rdcd.pipeline", *args], capture_output=True, text=True, timeout=600)


def test_unknown_stage_is_bad_usage_in_one_line(tmp_path):
    r = _demo("--out", str(tmp_path / "demo"), "--stages", "bench,nonsense")
    assert r.returncode == 2
    assert "nonsense" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "demo" / "summary.json").exists()


def test_bench_stage_without_pool_falls_back_to_scikit_image(tmp_path):
    out = tmp_path / "demo"
    r = _demo("--out", str(out), "--train-dir", str(tmp_path / "no-pool"), "--stages", "bench")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    bench = Path(summary["benchmark"])
    assert bench.name == "bench-skimage" and (bench / "ground_truth.csv").exists()
    assert summary["benchmark_summary"]["queries_with_match"] > 0
    assert summary["exit"] == 0 and "distill" not in summary["stages"]
    # a second run reuses the benchmark instead of rebuilding it
    before = (bench / "ground_truth.csv").stat().st_mtime_ns
    assert _demo("--out", str(out), "--train-dir", str(tmp_path / "no-pool"), "--stages", "bench").returncode == 0
    assert (bench / "ground_truth.csv").stat().st_mtime_ns == before


def test_a_run_trained_for_another_benchmark_is_not_reused(tmp_path):
    """A finished run whose training may have seen this benchmark's images (no record of the benchmark it
    left out, or another one) is refused in one line instead of being exported and gated."""
    out = tmp_path / "demo"
    assert _demo("--out", str(out), "--train-dir", str(tmp_path / "no-pool"), "--stages", "bench").returncode == 0
    run = out / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"not used")
    r = _demo("--out", str(out), "--train-dir", str(tmp_path / "no-pool"), "--stages", "bench,distill")
    assert r.returncode == 2 and "trained for another benchmark" in r.stderr and "Traceback" not in r.stderr
    r = _demo("--out", str(out), "--queries-per-ref", "0", "--stages", "bench")
    assert r.returncode == 2 and "--queries-per-ref" in r.stderr
