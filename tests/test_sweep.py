"""rdcd-validate sweep: one checkpoint exported, quantized and measured at several input sizes, with the
peer as a reference point; bad sizes are one-line usage errors."""

from __future__ import annotations

import json

from rdcd.validate.cli import main


def test_sweep_writes_the_front(student_run, tiny_bench, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--checkpoint", str(student_run), "--benchmark", str(tiny_bench),
                 "--calib-dir", str(tiny_bench / "training"), "--calib-count", "12", "--sizes", "64,96",
                 "--iters", "20", "--baselines", "sscd-distilled", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    res = json.loads((out / "sweep.json").read_text())
    assert [p["size"] for p in res["points"]] == [64, 96]
    for p in res["points"]:
        assert 0 < p["fp32_micro_ap"] <= 1 and 0 < p["int8_micro_ap"] <= 1
        assert p["fp32_p50_ms"] > 0 and p["int8_p50_ms"] > 0 and p["drop_ci95"][0] <= p["drop_ci95"][1]
        manifest = json.loads((out / f"size-{p['size']}" / "manifest.json").read_text())
        assert manifest["preprocess"]["size"] == p["size"]  # really exported at that size
    assert res["baselines"][0]["model"].startswith("sscd_distilled") and res["baselines"][0]["p50_ms"] > 0
    assert (out / "front.png").stat().st_size > 1000 and "| 96 |" in (out / "sweep.md").read_text()


def test_sweep_bad_sizes_exit_2(student_run, tiny_bench, tmp_path, capsys):
    for sizes in ("abc", "100", ""):
        code = main(["sweep", "--checkpoint", str(student_run), "--benchmark", str(tiny_bench),
                     "--calib-dir", str(tiny_bench), "--sizes", sizes, "--out", str(tmp_path / "s")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--sizes" in err[0]
    code = main(["sweep", "--checkpoint", str(student_run), "--benchmark", str(tiny_bench),
                 "--calib-dir", str(tiny_bench), "--baselines", "nonsense", "--out", str(tmp_path / "s")])
    assert code == 2 and "--baselines" in capsys.readouterr().err
