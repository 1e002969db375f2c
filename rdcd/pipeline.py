"""``rdcd-demo``: the main job, end to end on a built-in default (small, CPU, minutes).

1. **benchmark**: a DISC2021-layout benchmark of held-out pool images and photos and their edited copies
   (1,120 true pairs by default; scikit-image photos when the pool is absent);
2. **baselines**: the offline SSCD teacher, its MobileNetV4 peer, PDQ and the untrained student on it;
3. **distill**: a short RDCD run of the student from the offline teacher (``rdcd-distill``);
4. **export**: ONNX, Core ML, OpenVINO and TensorRT artifacts with parity checks (``rdcd.export.export``);
5. **quantize**: INT8 for every target, calibrated on pool images outside the benchmark
   (``rdcd.quantize.quantize``);
6. **validate**: the INT8 accuracy gate and latency table, with a report (``rdcd.validate.gate``).

Each stage prints the command a user would type for it, then runs it (distill through ``rdcd-distill``'s own
entry point, the others through the library calls that the commands make); a re-run reuses the benchmark and
the teacher-feature cache. Exit status: that of the first stage that fails, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence

from rdcd import cli
from rdcd.errors import RdcdError
from rdcd.manifest import MAX_DROP

log = logging.getLogger("rdcd.demo")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POOL = REPO.parent / "shared" / "data" / "train-pool"
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "train-photos"


def _baseline_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "dim", "µAP", "R@P90", "acc@1", "seconds"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], str(r["dim"]), f"{r['micro_ap']:.4f}", f"{r['recall_at_p90']:.4f}",
                  f"{r['acc_at_1']:.4f}", f"{r['seconds']:.1f}")
    Console(width=120).print(t)


def _distill_summary(run_dir: Path, baselines: list[dict] | None) -> dict | None:
    """The distilled student's µAP on the benchmark next to the untrained student's (the baselines stage)."""
    try:
        evals = json.loads((run_dir / "config.json").read_text())["result"]["eval"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if not evals:
        return None
    out = {"micro_ap": evals[-1]["micro_ap"]}
    init = next((r["micro_ap"] for r in baselines or [] if r["model"].startswith("untrained")), None)
    if init is not None:
        out.update(untrained_micro_ap=round(init, 5), gain=round(out["micro_ap"] - init, 5))
        print(f"distilled student: µAP {out['micro_ap']:.4f} vs {init:.4f} untrained ({out['gain']:+.4f})", flush=True)
    return out


BENCH_DIGEST = "demo-benchmark-sources.sha256"  # in the run folder: the benchmark its training left out


def _sources_digest(bench_dir: Path) -> str:
    import hashlib

    from rdcd.validate.demo import used_sources

    return hashlib.sha256("\n".join(sorted(used_sources(bench_dir))).encode()).hexdigest()


def _stage(name: str, prog: str, entry: Callable[[], int | None], argv: list[str], timings: dict) -> int:
    """Run one stage (``entry``), announced as the command ``prog argv`` that does the same."""
    print(f"\n=== {name}: {prog} {shlex.join(argv)}", flush=True)
    t0 = time.time()
    try:
        code = entry()
    except SystemExit as exc:  # argparse inside a stage
        code = exc.code if isinstance(exc.code, int) else 2
    except RdcdError as exc:  # one line, like the stage's own command would print
        print(f"{prog}: error: {exc}", flush=True)
        code = exc.exit_code
    code = 0 if code is None else int(code)
    timings[name] = round(time.time() - t0, 1)
    print(f"=== {name}: exit {code} after {timings[name]} s", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="rdcd-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    p.add_argument("--train-dir", default=str(DEFAULT_POOL), help="unlabeled training images (default: ../shared/data/train-pool)")
    p.add_argument("--photos-dir", default=str(DEFAULT_PHOTOS),
                   help="more training images, photographs (default: ../shared/data/train-photos, when present)")
    p.add_argument("--max-images", type=cli.positive_int, default=4000,
                   help="training images drawn from both folders (default 4000: a CPU-sized feature cache)")
    p.add_argument("--holdout", type=cli.positive_int, default=600, help="pool images held out for the benchmark (default 600)")
    p.add_argument("--photo-holdout", type=cli.nonnegative_int, default=1000,
                   help="photos held out for the benchmark too, when --photos-dir exists (default 1000)")
    p.add_argument("--queries-per-ref", type=cli.positive_int, default=2,
                   help="edited copies per matched reference (default 2: with the defaults, 1,120 true pairs, "
                        "enough to resolve a 0.005 µAP drop)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--dim", type=cli.positive_int, default=128, help="descriptor dimension (default 128)")
    p.add_argument("--input-size", dest="size", type=cli.positive_int, default=128, help="student input size (default 128: CPU-sized)")
    p.add_argument("--size", dest="size", type=cli.positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--teacher-size", type=cli.positive_int, default=224, help="the teacher sees the student's view at this size")
    p.add_argument("--head-steps", type=cli.nonnegative_int, default=1500,
                   help="head-stage steps on cached backbone + teacher features (default 1500; rdcd-distill --head-steps)")
    p.add_argument("--max-steps", dest="steps", type=cli.nonnegative_int, default=0,
                   help="full fine-tuning steps after the head stage (default 0: on 2 CPU cores a short full "
                        "fine-tune spends its budget in the early dip; see docs/reports/distill.md)")
    p.add_argument("--steps", dest="steps", type=cli.nonnegative_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="training batch (default 32)")
    p.add_argument("--lr", type=cli.nonnegative_float, default=0.0015, help="peak learning rate (default 0.0015 at batch 32)")
    p.add_argument("--queue", type=cli.positive_int, default=1024,
                   help="MoCo key queue and RSD teacher queue (default 1024: below one epoch of the pool, so a queue "
                        "never holds the same image's previous view)")
    p.add_argument("--cache-views", type=cli.positive_int, default=2,
                   help="cached views per training image (default 2: the head stage contrasts two views of an image)")
    p.add_argument("--calib-count", type=cli.positive_int, default=300, help="INT8 calibration images (default 300)")
    p.add_argument("--max-drop", type=cli.nonnegative_float, default=MAX_DROP, help=f"gate: largest INT8 µAP drop (default {MAX_DROP})")
    p.add_argument("--stages", default="bench,baselines,distill,export,quantize,validate",
                   help="comma list of stages to run (default: all)")
    return p


@dataclasses.dataclass
class Demo:
    """What the stages share: the options, the working folder, the benchmark, the training images, the summary."""

    a: argparse.Namespace
    out: Path
    pool: Path
    bench_dir: Path
    bench: object  # rdcd.benchmark.Benchmark of bench_dir
    train_dir: Path
    summary: dict
    timings: dict

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    @property
    def export_dir(self) -> Path:
        return self.out / "export"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"


def baselines_stage(d: Demo) -> int:
    from rdcd.validate.evaluate import describe, evaluate_descriptors
    from rdcd.validate.models import resolve_model

    bench, a, t1 = d.bench, d.a, time.time()
    rows = []
    for spec in ("teacher", "sscd-distilled", "pdq", f"student:{a.backbone}:{a.dim}"):
        emb, pspec, label = resolve_model(spec, size=a.size if spec.startswith("student") else None)
        desc = describe(bench, emb, pspec, label=label)
        rows.append({"model": label, **evaluate_descriptors(bench, desc).row(), "seconds": desc.seconds})
    d.timings["baselines"] = round(time.time() - t1, 1)
    _baseline_table(rows, f"Baselines on {d.bench_dir} ({bench.summary()['queries']} queries)")
    d.summary["baselines"] = rows
    return 0


def _as_argv(settings: dict) -> list[str]:
    """The ``rdcd-distill`` options that give ``settings`` (TrainConfig fields; a list repeats its option; a
    switch is its flag when it differs from the field's default)."""
    import dataclasses

    from rdcd.distill import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    argv: list[str] = []
    for key, value in settings.items():
        flag = fields[key].metadata.get("flag") or "--" + key.replace("_", "-")
        if isinstance(value, bool):  # store_true / store_false flags; BooleanOptionalAction for a None default
            if value != fields[key].default:
                argv.append(flag if fields[key].default is not None else ("--" if value else "--no-") + flag[2:])
        elif value is not None:
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, str(v)]
    return argv


def distill_stage(d: Demo) -> int:
    from rdcd.distill import distill, from_options
    from rdcd.fsutil import write_text

    a, run_dir = d.a, d.run_dir
    settings = {"train_dir": [str(d.train_dir)], "out": str(run_dir), "backbone": a.backbone, "dim": a.dim,
                "input_size": a.size, "teacher_size": a.teacher_size, "batch_size": a.batch_size,
                "max_steps": a.steps, "head_steps": a.head_steps, "lr": a.lr,
                "warmup_steps": max(1, a.steps // 10), "hn_ramp_steps": max(1, a.steps // 2),
                "cache": str(d.out / "teacher-cache"), "cache_views": a.cache_views,
                "queue_size": a.queue, "rsd_queue_size": a.queue,
                "ckpt_every": max(1, a.steps // 5), "eval_benchmark": str(d.bench_dir)}
    if d.pool.is_dir():
        settings["exclude_benchmark"] = [str(d.bench_dir)]
        if Path(a.photos_dir).is_dir():
            settings["train_dir"].append(str(a.photos_dir))
            settings["max_images"] = a.max_images
    trained_for = _sources_digest(d.bench_dir)
    if (run_dir / "model.safetensors").exists() or (run_dir / "checkpoint.pt").exists():
        recorded = (run_dir / BENCH_DIGEST).read_text().strip() if (run_dir / BENCH_DIGEST).exists() else None
        if recorded != trained_for:  # its training set may hold this benchmark's images
            raise RdcdError(f"{run_dir} was trained for another benchmark: delete it to train again")
    code = 0
    if (run_dir / "model.safetensors").exists():
        print(f"\n=== distill: reusing the finished run in {run_dir} (delete it to train again)", flush=True)
    else:
        if (run_dir / "checkpoint.pt").exists():  # an interrupted demo continues where it stopped
            settings["resume"] = True
        else:
            write_text(run_dir / BENCH_DIGEST, trained_for + "\n")
        def run() -> int:
            from rdcd.distill.checkpoint import AlreadyDone

            try:
                distill(from_options(settings))  # checks its settings and inputs first (RdcdError: exit 2)
            except AlreadyDone as done:  # a finished checkpoint without its model file: nothing left to train
                print(f"rdcd-distill: {done}", flush=True)
            return 0

        code = _stage("distill", "rdcd-distill", run, _as_argv(settings), d.timings)
    d.summary["distill"] = _distill_summary(run_dir, d.summary.get("baselines"))
    return code


def export_stage(d: Demo) -> int:
    from rdcd.export import Options, export
    from rdcd.export.cli import summary_table
    from rdcd.manifest import TARGETS

    argv = ["--checkpoint", str(d.run_dir), "--target", "all", "--out", str(d.export_dir)]

    def run() -> int:
        result = export(d.run_dir, TARGETS, d.export_dir, Options(command=f"rdcd-export {shlex.join(argv)}"))
        summary_table(result)
        return result.code

    return _stage("export", "rdcd-export", run, argv, d.timings)


def quantize_stage(d: Demo) -> int:
    from rdcd.errors import GateFailed
    from rdcd.quantize import AccuracyControl, QuantizeRecipe, quantize
    from rdcd.quantize.cli import print_summary

    calib_count = d.a.calib_count
    if not d.pool.is_dir():  # the scikit-image fallback has only a few dozen background images
        from rdcd.imageio import list_images

        calib_count = min(calib_count, len(list_images(d.train_dir)))
        log.warning("calibrating on the %d scikit-image background images (fewer than %d)", calib_count, d.a.calib_count)
    argv = ["--exports", str(d.export_dir), "--calib-dir", str(d.train_dir), "--calib-count", str(calib_count),
            "--benchmark", str(d.bench_dir), "--checkpoint", str(d.run_dir), "--max-drop", str(d.a.max_drop),
            "--latency", "200"]

    def run() -> int:
        try:
            result = quantize(d.export_dir, d.train_dir, recipe=QuantizeRecipe(calib_count=calib_count),
                            accuracy=AccuracyControl(d.bench_dir, max_drop=d.a.max_drop), checkpoint=d.run_dir,
                            latency_iters=200, command=f"rdcd-quantize {shlex.join(argv)}", raise_on_drop=False)
        except GateFailed as exc:  # an engine that did not build or run: the gate below reports it
            log.warning("rdcd-quantize: %s; the gate decides", exc)
            return 0
        print_summary(result, d.export_dir, d.a.max_drop)
        over = [a.name for a in result.artifacts if a.accuracy is not None and a.accuracy.over()]
        if over:  # the quantize stage's own (stricter) target missed: the gate below decides
            log.warning("rdcd-quantize: INT8 drop above %s after fallback (%s); the gate decides", d.a.max_drop,
                        ", ".join(over))
        return 0

    return _stage("quantize", "rdcd-quantize", run, argv, d.timings)


def validate_stage(d: Demo) -> int:
    from rdcd.validate import GateConfig, gate

    argv = ["--benchmark", str(d.bench_dir), "--exports", str(d.export_dir), "--max-drop", str(d.a.max_drop),
            "--report", str(d.report_dir)]
    def run() -> int:
        gate(d.bench_dir, d.export_dir, GateConfig(max_drop=d.a.max_drop, report=str(d.report_dir)))
        return 0  # a failed gate raises GateFailed: exit 1

    code = _stage("validate", "rdcd-validate", run, ["gate", *argv], d.timings)
    if (d.report_dir / "report.md").exists():
        print(f"report: {d.report_dir / 'report.md'}")
    return code


#: the stages after the benchmark (always built first), in order; a stage's non-zero exit stops the ones after it
STAGES: dict[str, Callable[[Demo], int]] = {"baselines": baselines_stage, "distill": distill_stage,
                                            "export": export_stage, "quantize": quantize_stage,
                                            "validate": validate_stage}


def _bench(a, out: Path, pool: Path) -> tuple[Path, Path]:
    """The demo benchmark (held-out pool images and photos, or scikit-image photos) and the training folder."""
    from rdcd.validate.demo import DemoConfig, build_demo

    if pool.is_dir():
        photos = Path(a.photos_dir)
        extra = ((str(photos), a.photo_holdout),) if photos.is_dir() and a.photo_holdout > 0 else ()
        bench_dir = build_demo(out / "bench", DemoConfig(source=str(pool), holdout=a.holdout, extra=extra,
                                                         queries_per_ref=a.queries_per_ref, positive_share=0.7))
        return bench_dir, pool
    log.warning("training pool %s not found: benchmark and training from scikit-image photos", pool)
    bench_dir = build_demo(out / "bench-skimage", DemoConfig(source="skimage"))
    return bench_dir, bench_dir / "training"


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging()
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(stages) - {"bench", *STAGES}
    if unknown:
        raise RdcdError(f"unknown stage(s) {', '.join(sorted(unknown))}")
    if a.holdout < 8:
        raise RdcdError(f"--holdout {a.holdout}: the benchmark needs at least 8 held-out pool images")
    from rdcd.benchmark import load_benchmark
    from rdcd.fsutil import write_json
    from rdcd.logs import keep_library_logs

    out = cli.writable_dir(a.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    library_log = keep_library_logs(out / "libraries.log")  # NNCF, ONNX Runtime, Core ML Tools, warnings
    t0 = time.time()
    pool = Path(a.train_dir)
    bench_dir, train_dir = _bench(a, out, pool)
    timings = {"bench": round(time.time() - t0, 1)}
    bench = load_benchmark(bench_dir)
    print(f"benchmark {bench_dir}: {json.dumps(bench.summary())}")
    d = Demo(a, out, pool, bench_dir, bench, train_dir,
             {"benchmark": str(bench_dir), "benchmark_summary": bench.summary(), "stages": {}}, timings)
    code = 0
    for name, run_stage in STAGES.items():
        if name in stages and code == 0:
            code = run_stage(d)
    d.summary.update(stages=timings, exit=code, wall_seconds=round(time.time() - t0, 1))
    write_json(out / "summary.json", d.summary)
    print(f"\nsummary written to {out / 'summary.json'}: wall {d.summary['wall_seconds']} s, stages {timings}")
    print(f"library logs (NNCF, ONNX Runtime, Core ML Tools, warnings): {library_log}")
    return code


if __name__ == "__main__":
    import sys

    sys.exit(main())
