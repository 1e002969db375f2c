"""The INT8 accuracy gate: ``rdcd-validate [gate] --benchmark B --exports DIR [--max-drop 0.005]``.

Every artifact of an export directory (its ``manifest.json``) is run on a DISC-layout benchmark with
its own runtime: µAP, R@P90 and acc@1 (ISC2021 rules), Δ µAP against its FP32 reference
(``"reference"`` in the manifest), file size, and latency p50/p90/p99 + throughput at batch 1. Each
row ends ✅ (checked), ❎ (not checkable here, with the reason: never a pass) or ❌ (failed, with the
reason). Exit codes:

* 1 when an INT8-class artifact (precision int8 / w8a8 / w8) loses more µAP than ``--max-drop``
  (default 0.005, the project's one budget; absolute, or relative with ``--drop-type relative``), when
  an artifact fails to run, when a ``--require TARGET`` has no checked artifact, or when the manifest
  has no INT8-class artifact at all ("nothing to gate", unless ``--allow-empty``);
* 2 on bad usage or input (no manifest, malformed manifest, missing benchmark, bad bench JSON);
* 0 otherwise.

Core ML cannot run off macOS: when the quantize stage recorded W8A8/W8 µAP *simulated in PyTorch*
(``"accuracy"`` block with ``simulated: true``) on the same benchmark (ground-truth sha256), the row
shows those numbers labelled "simulated in PyTorch" and is still ❎ (the runtime itself was not
checked); a simulated drop over the gate is ❌. Keys read from that block: ``simulated``, ``micro_ap``,
``fp32_micro_ap`` (or ``reference_micro_ap``), ``ground_truth_sha256`` (or ``gt_sha256``),
``benchmark`` (path), ``runtime``, optionally ``recall_at_p90`` and ``acc_at_1``. ``--bench-json`` merges ``rdcd-bench`` results from
devices (a Jetson, a Mac) as extra latency columns; ``rdcd-validate merge`` does the same for an
existing ``report.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd import cli
from rdcd.errors import GateFailed, MissingDependency, RdcdError, RuntimeUnavailable
from rdcd.manifest import MAX_DROP, PRECISIONS, TARGETS, Manifest

INT8_CLASS = ("int8", "w8a8", "w8")
OK, NOT_CHECKED, FAILED = "ok", "not_checked", "failed"
SIMULATED = "simulated in PyTorch"


# ----------------------------------------------------------------------------------------- arguments
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="rdcd-validate gate",
        description="Evaluate every artifact of an export directory on a DISC-layout benchmark (µAP, R@P90, "
                    "Δ vs FP32, size, latency) and fail (exit 1) when an INT8 artifact loses too much µAP.")
    p.add_argument("--benchmark", required=True, help="DISC-layout benchmark folder (references/, queries/, ground_truth.csv)")
    p.add_argument("--exports", required=True, help="export directory with manifest.json (rdcd-export / rdcd-quantize)")
    p.add_argument("--max-drop", type=float, default=MAX_DROP,
                   help=f"largest allowed µAP drop of an INT8 artifact (default {MAX_DROP})")
    p.add_argument("--drop-type", choices=("absolute", "relative"), default="absolute",
                   help="absolute: fp32 - int8 µAP; relative: (fp32 - int8) / fp32 (default absolute)")
    p.add_argument("--require", action="append", default=[], choices=TARGETS, metavar="TARGET",
                   help=f"a target ({', '.join(TARGETS)}) that must be checked here: not checkable = failure (repeatable)")
    p.add_argument("--allow-empty", action="store_true",
                   help="exit 0 when the manifest has no INT8 artifact (default: 'nothing to gate', exit 1)")
    p.add_argument("--report", default=None, metavar="OUT",
                   help="write OUT/report.md, OUT/report.json, OUT/pr_curve.png, OUT/latency.png")
    p.add_argument("--bench-json", action="append", default=[], metavar="FILE",
                   help="rdcd-bench results from a device, merged as a latency column (repeatable)")
    p.add_argument("--k", type=cli.positive_int, default=10, help="neighbours per query (ISC2021: 10)")
    p.add_argument("--whiten", action="store_true", help="PCA-whitening fitted on the benchmark's training/")
    p.add_argument("--score-norm", default=None, help="e.g. 1.0[0,2]: SSCD score normalisation on training/")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="batch size for descriptor extraction")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads per runtime (default 2)")
    p.add_argument("--latency-iters", type=cli.positive_int, default=100, help="timed batch-1 calls per artifact (default 100)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=10, help="untimed calls before timing (default 10)")
    return p


def check_manifest(manifest: Manifest) -> None:
    """What the gate relies on beyond :meth:`Manifest.load`: known targets/precisions, unique names, references."""
    where = manifest.path
    if not manifest.artifacts:
        raise RdcdError(f"{where} lists no artifacts: nothing to validate")
    names = set()
    for i, art in enumerate(manifest.artifacts):
        name = art.get("name")
        if not isinstance(name, str) or not name:
            raise RdcdError(f"malformed {where}: artifact {i} has no name")
        if name in names:
            raise RdcdError(f"malformed {where}: artifact name {name!r} appears twice")
        names.add(name)
        if art.get("target") not in TARGETS:
            raise RdcdError(f"malformed {where}: artifact {name!r} has target {art.get('target')!r} "
                            f"(expected one of {', '.join(TARGETS)})")
        if art.get("precision") not in PRECISIONS:
            raise RdcdError(f"malformed {where}: artifact {name!r} has precision {art.get('precision')!r} "
                            f"(expected one of {', '.join(PRECISIONS)})")
        if not isinstance(art.get("path"), str) or not art["path"]:
            raise RdcdError(f"malformed {where}: artifact {name!r} has no path")
        if not isinstance(art.get("input"), dict) or not isinstance(art.get("output"), dict):
            raise RdcdError(f"malformed {where}: artifact {name!r} input/output must be objects")
    for art in manifest.artifacts:
        ref = art.get("reference")
        if ref is not None and ref not in names:
            raise RdcdError(f"malformed {where}: artifact {art['name']!r} names reference {ref!r}, "
                            f"which is not in the manifest")


# -------------------------------------------------------------------------------------- evaluation
def _spec_for(manifest: Manifest, art: dict):
    from rdcd.preprocess import PreprocessSpec
    from rdcd.validate.models import artifact_spec

    size = art["input"].get("size")
    pre = manifest.data.get("preprocess")
    try:
        size = int(size[0]) if isinstance(size, list) and size else (int(size) if isinstance(size, int) else None)
        if isinstance(pre, dict) and "size" in pre:
            size = size or int(pre["size"])
        if size:  # only the size and the resize rule matter here: normalisation is inside every artifact
            return PreprocessSpec(size=size, resize=(pre or {}).get("resize", "stretch-bilinear"))
    except (TypeError, ValueError) as exc:
        raise RdcdError(f"malformed {manifest.path}: bad input size for {art['name']} ({exc})") from None
    return artifact_spec(manifest.resolve(art))


def artifact_files(path: Path) -> list[Path]:
    """The files an artifact consists of: an OpenVINO ``.xml`` needs its ``.bin`` (same name)."""
    files = [path]
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        files.append(path.with_suffix(".bin"))
    return files


def content_key(path: Path) -> str:
    """sha256 over all of an artifact's files: two IRs with the same graph but other weights differ."""
    import hashlib

    from rdcd.fsutil import sha256

    files = artifact_files(path)
    if len(files) == 1:
        return sha256(path)
    return hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()


def _curve(metrics, points: int = 256) -> dict:
    p, r = metrics.precisions, metrics.recalls
    if len(p) > points:
        idx = np.unique(np.linspace(0, len(p) - 1, points).round().astype(int))
        p, r = p[idx], r[idx]
    return {"precision": [round(float(x), 5) for x in p], "recall": [round(float(x), 5) for x in r]}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Evaluator:
    """Runs artifacts on the benchmark; descriptors/latency are cached per (file sha256, runtime)."""

    def __init__(self, bench, cfg):
        self.bench = bench
        self.cfg = cfg
        self.cache: dict[tuple[str, str], dict] = {}
        self.predictions: dict[tuple[str, str], object] = {}  # for the paired bootstrap of Δ µAP
        self._sample = None

    def sample(self, spec) -> np.ndarray:
        if self._sample is None or self._sample.shape[1] != spec.size:
            self._sample = spec.load(self.bench.queries.paths[0])[None]
        return self._sample

    def run(self, manifest: Manifest, art: dict, runtime: str):
        """Return (measurement dict, runner description) or raise."""
        from rdcd.validate.bench import measure_latency
        from rdcd.validate.evaluate import describe, evaluate_descriptors
        from rdcd.validate.runtimes import load_runner

        cfg = self.cfg
        path = manifest.resolve(art)
        runner = load_runner(path, runtime=runtime, threads=cfg.threads)
        key = (content_key(path), runner.name)
        if key in self.cache:
            return {**self.cache[key], "cached": True, "predictions": self.predictions[key]}, runner.describe()
        spec = _spec_for(manifest, art)
        t0 = time.perf_counter()
        desc = describe(self.bench, runner, spec, cfg.batch_size, with_training=cfg.whiten or bool(cfg.score_norm),
                        label=art["name"])
        res = evaluate_descriptors(self.bench, desc, k=cfg.k, whiten=cfg.whiten, score_norm=cfg.score_norm)
        eval_s = time.perf_counter() - t0
        lat = measure_latency(runner, self.sample(spec), cfg.warmup, cfg.latency_iters)
        m = res.metrics
        out = {"micro_ap": m.micro_ap, "recall_at_p90": m.recall_at_p90, "threshold_at_p90": m.threshold_at_p90,
               "acc_at_1": m.acc_at_1,
               "setting": res.setting, "dim": res.dim, "curve": _curve(m), "eval_seconds": round(eval_s, 2),
               "latency": {"batch": 1, "threads": cfg.threads, "warmup": cfg.warmup, "iters": cfg.latency_iters,
                           **{f"{k}_ms": v for k, v in lat["latency_ms"].items() if k in ("p50", "p90", "p99", "mean")},
                           "throughput_ips": lat["throughput_ips"],
                           **({"gpu_compute_p50_ms": lat["gpu_compute_ms"]["p50"]} if lat["gpu_compute_ms"] else {})}}
        self.cache[key] = out
        self.predictions[key] = res.predictions
        return {**out, "predictions": res.predictions}, runner.describe()


def _accuracy_block(art: dict, bench_root: Path, gt_sha: str) -> tuple[dict | None, str | None]:
    """The quantize stage's simulated numbers for this artifact, if measured on this benchmark."""
    acc = art.get("accuracy")
    if not isinstance(acc, dict) or not acc.get("simulated"):
        return None, None
    rec_sha = acc.get("ground_truth_sha256") or acc.get("gt_sha256") or acc.get("benchmark_gt_sha256")
    rec_bench = acc.get("benchmark")
    if isinstance(rec_bench, dict):
        rec_sha = rec_sha or rec_bench.get("ground_truth_sha256") or rec_bench.get("gt_sha256")
        rec_bench = rec_bench.get("path")
    if rec_sha:
        if rec_sha != gt_sha:
            return None, (f"simulated µAP was measured on another benchmark ({rec_bench or '?'}, ground truth "
                          f"sha256 {str(rec_sha)[:12]}…, this one {gt_sha[:12]}…)")
    elif not rec_bench or Path(rec_bench).resolve() != bench_root.resolve():
        return None, f"simulated µAP was measured on another benchmark ({rec_bench or 'unrecorded'})"
    q = acc.get("micro_ap")
    ref = acc.get("fp32_micro_ap", acc.get("reference_micro_ap"))
    if not isinstance(q, (int, float)):
        return None, "the recorded simulated accuracy has no micro_ap"
    return {"micro_ap": float(q), "reference_micro_ap": float(ref) if isinstance(ref, (int, float)) else None,
            "recall_at_p90": acc.get("recall_at_p90"), "acc_at_1": acc.get("acc_at_1"),
            "runtime": acc.get("runtime") or SIMULATED,
            "drop_ci95": acc.get("drop_ci95") if isinstance(acc.get("drop_ci95"), list) else None}, None


def _default_reference(manifest: Manifest, art: dict) -> str | None:
    """The float artifact an INT8/FP16 artifact is compared with: its ``reference``, followed through
    quantized references (a TensorRT INT8 engine names its QDQ ONNX model, which names the FP32 one),
    else the FP32 artifact of the same target, else the FP32 ONNX."""
    ref, seen = art.get("reference"), {art["name"]}
    while ref and ref not in seen:
        seen.add(ref)
        nxt = manifest.get(ref)
        if nxt is None or nxt["precision"] not in INT8_CLASS or not nxt.get("reference"):
            return ref
        ref = nxt["reference"]
    if ref:
        return ref
    if art["precision"] == "fp32":
        return None
    fp32 = [a for a in manifest.artifacts if a["precision"] == "fp32"]
    same = [a for a in fp32 if a["target"] == art["target"]]
    pick = (same or [a for a in fp32 if a["target"] == "onnx"] or fp32 or [None])[0]
    return pick["name"] if pick else None


def _drop(ref: float, q: float, drop_type: str) -> float:
    if drop_type == "relative":
        return (ref - q) / ref if ref > 0 else (0.0 if q >= ref else float("inf"))
    return ref - q


def evaluate_manifest(bench, manifest: Manifest, cfg) -> dict:
    """All rows of the report (without devices) and the verdict."""
    from rdcd.fsutil import sha256, size_bytes

    gt_sha = sha256(bench.gt_path)
    ev = Evaluator(bench, cfg)
    rows = []
    predictions: dict[str, object] = {}
    for art in manifest.artifacts:
        art, engine_note = _engine_row(art)
        path = manifest.resolve(art)
        row = {"name": art["name"], "target": art["target"], "precision": art["precision"], "path": art["path"],
               "runtime": art.get("runtime") or "auto", "runtime_version": None, "status": None, "reason": None,
               "micro_ap": None, "recall_at_p90": None, "acc_at_1": None, "simulated": False,
               "reference": _default_reference(manifest, art), "reference_micro_ap": None, "delta": None,
               "drop": None, "gated": art["precision"] in INT8_CLASS, "size_bytes": None, "sha256": None,
               "latency": None, "curve": None, "notes": [], "devices": {}}
        rows.append(row)
        row["notes"] += [engine_note] if engine_note else []
        if path.exists():
            row["size_bytes"] = sum(size_bytes(f) for f in artifact_files(path))
            row["sha256"] = sha256(path)
            if art.get("sha256") and art["sha256"] != row["sha256"]:
                row["notes"].append("file differs from the sha256 recorded in the manifest")
        if art["status"] == "failed":
            row.update(status=FAILED, reason=f"export failed: {art.get('reason') or 'no reason recorded'}")
            continue
        if not path.exists():
            if art["status"] == "not_checkable":
                row.update(status=NOT_CHECKED, reason=art.get("reason") or f"{art['path']} was not built here")
                _simulated(row, art, bench, gt_sha)
            else:
                what = "TensorRT engine" if art.get("runtime") == "tensorrt" else "file"
                row.update(status=FAILED, reason=f"{what} not found: {art['path']} (the manifest says {art['status']})")
            continue
        runtime = art.get("runtime") if art.get("runtime") in ("onnxruntime", "openvino", "tensorrt", "coreml") else "auto"
        t0 = time.perf_counter()
        try:
            meas, desc = ev.run(manifest, art, runtime)
            _progress(f"{art['name']}: µAP {meas['micro_ap']:.4f}, p50 {meas['latency']['p50_ms']:.2f} ms "
                      f"({time.perf_counter() - t0:.1f} s)")
        except (RuntimeUnavailable, MissingDependency) as exc:
            row.update(status=NOT_CHECKED, reason=f"not checkable here: {_first_line(exc)}")
            _simulated(row, art, bench, gt_sha)
            continue
        except RdcdError as exc:
            row.update(status=FAILED, reason=_first_line(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - an artifact that crashes its runtime is a failed row, not a crash
            if os.environ.get("RDCD_DEBUG"):
                raise
            row.update(status=FAILED, reason=f"{type(exc).__name__}: {_first_line(exc)}")
            continue
        predictions[art["name"]] = meas["predictions"]
        row.update(status=OK, runtime=desc.get("runtime", runtime), runtime_version=desc.get("version"),
                   micro_ap=meas["micro_ap"], recall_at_p90=meas["recall_at_p90"], acc_at_1=meas["acc_at_1"],
                   threshold_at_p90=meas["threshold_at_p90"],  # the operating point rdcd-index --threshold auto uses
                   setting=meas["setting"], curve=meas["curve"], latency=meas["latency"],
                   eval_seconds=meas["eval_seconds"])
        if meas.get("cached"):
            row["notes"].append("same file and runtime as an earlier row: results reused")

    by_name = {r["name"]: r for r in rows}
    for row in rows:
        _delta(row, by_name, cfg)
        _interval(row, predictions, bench, cfg)
    # a not-checkable row whose file was evaluated under another runtime (the QDQ model behind a TensorRT row)
    for row in rows:
        if row["status"] == NOT_CHECKED and row["sha256"] and not row["simulated"]:
            twin = next((r for r in rows if r is not row and r["sha256"] == row["sha256"] and r["status"] == OK), None)
            if twin:
                row["notes"].append(f"the same file was evaluated as {twin['name']} ({twin['runtime']})")
    failures = []
    for t in cfg.require:
        mine = [r for r in rows if r["target"] == t]
        if not mine:
            failures.append(f"required target {t}: no artifact in the manifest")
        for r in mine:
            if r["status"] == NOT_CHECKED:
                r.update(status=FAILED, reason=f"required target {t} not checked: {r['reason']}")
    for r in rows:
        if r["status"] == FAILED:
            failures.append(f"{r['name']}: {r['reason']}")
    gated = [r for r in rows if r["gated"]]
    return {"rows": rows, "gt_sha256": gt_sha, "failures": failures, "passed": not failures,
            "counts": {s: sum(r["status"] == s for r in rows) for s in (OK, NOT_CHECKED, FAILED)},
            "int8_artifacts": len(gated), "int8_checked": sum(r["status"] == OK for r in gated)}


def _engine_row(art: dict) -> tuple[dict, str | None]:
    """A TensorRT row as the gate runs it: its engine, never an ONNX file. Manifests from before rdcd-quantize
    built engines name the engine's QDQ source in ``path`` (and the engine in ``engine_path``)."""
    if not (art["target"] == "tensorrt" or art.get("runtime") == "tensorrt") or not art["path"].endswith(".onnx"):
        return art, None
    engine = art.get("engine_path") or ""
    engine = engine if engine and not engine.endswith(".onnx") else art["path"][: -len(".onnx")] + ".engine"
    kept = {k: v for k, v in art.items() if k not in ("sha256", "size_bytes")}
    return {**kept, "path": engine, "runtime": "tensorrt", "qdq_source": art["path"]}, (
        f"{art['path']} is the engine's QDQ source (a manifest from before rdcd-quantize built engines): the engine is {engine}")


def _progress(msg: str) -> None:
    """One line per artifact on stderr, so that long CI runs show where they are."""
    import sys

    print(f"rdcd-validate gate: {msg}", file=sys.stderr, flush=True)


def _simulated(row: dict, art: dict, bench, gt_sha: str) -> None:
    sim, why = _accuracy_block(art, bench.root, gt_sha)
    if why:
        row["notes"].append(why)
    if sim:
        row.update(simulated=True, micro_ap=sim["micro_ap"], recall_at_p90=sim["recall_at_p90"],
                   acc_at_1=sim["acc_at_1"], runtime=sim["runtime"], simulated_reference_micro_ap=sim["reference_micro_ap"],
                   simulated_drop_ci95=sim["drop_ci95"])
        how = sim["runtime"] if sim["runtime"] != SIMULATED else "in PyTorch"
        row["notes"].append(f"µAP simulated by rdcd-quantize on this benchmark ({how}); the runtime itself was not run")


def _delta(row: dict, by_name: dict, cfg) -> None:
    if row["micro_ap"] is None or row["status"] == FAILED:
        return
    ref_name = row["reference"]
    ref_map = None
    if row["simulated"] and row.get("simulated_reference_micro_ap") is not None:
        ref_map = row["simulated_reference_micro_ap"]  # same simulation, same benchmark: like for like
        row["notes"].append("Δ against the FP32 µAP recorded with the simulation")
    elif ref_name and ref_name != row["name"]:
        ref = by_name.get(ref_name)
        if ref is not None and ref["status"] == OK and not ref["simulated"]:
            ref_map = ref["micro_ap"]
        elif row["gated"]:
            why = ref["reason"] if ref else "not in the manifest"
            if row["status"] == OK:
                row.update(status=NOT_CHECKED, reason=f"reference {ref_name} not evaluated ({why}): µAP drop unknown")
            return
    if ref_map is None:
        if row["gated"] and row["status"] == OK:
            row.update(status=NOT_CHECKED, reason="no FP32 reference in the manifest: µAP drop unknown")
        return
    row["reference_micro_ap"] = ref_map
    row["delta"] = row["micro_ap"] - ref_map
    row["drop"] = _drop(ref_map, row["micro_ap"], cfg.drop_type)
    if row["gated"] and row["drop"] > cfg.max_drop + 1e-12:
        what = "simulated µAP drop" if row["simulated"] else "µAP drop"
        unit = "" if cfg.drop_type == "absolute" else " (relative)"
        row.update(status=FAILED, reason=f"{what} {row['drop']:.4f}{unit} > max {cfg.max_drop:g} "
                                         f"({row['micro_ap']:.4f} vs {ref_map:.4f})")


def _interval(row: dict, predictions: dict, bench, cfg) -> None:
    """The paired bootstrap 95 % interval of a gated row's drop (recorded by rdcd-quantize for simulated rows);
    a note when the benchmark cannot resolve the budget (the verdict stays on the point estimate)."""
    if not row["gated"] or row["drop"] is None:
        return
    ci = None
    if row["name"] in predictions and row["reference"] in predictions and cfg.drop_type == "absolute":
        from rdcd.validate.bootstrap import paired_drop_interval

        iv = paired_drop_interval(predictions[row["reference"]], predictions[row["name"]], bench.gt_pairs,
                                  bench.queries.ids)
        ci = [round(iv.low, 6), round(iv.high, 6)]
    elif row["simulated"] and isinstance(row.get("simulated_drop_ci95"), list) and cfg.drop_type == "absolute":
        ci = row["simulated_drop_ci95"]
    if ci is None:
        return
    row["drop_ci95"] = ci
    if ci[1] - ci[0] > cfg.max_drop:
        row["notes"].append(f"the 95 % interval of the drop [{ci[0]:+.4f}, {ci[1]:+.4f}] is wider than the budget "
                            f"{cfg.max_drop:g}: this benchmark cannot resolve it (the gate uses the point estimate)")


# -------------------------------------------------------------------------------------------- mains
def gate_main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from rdcd.benchmark import load_benchmark
    from rdcd.validate import report as rep
    from rdcd.validate.bench import load_average
    from rdcd.validate.gate_checks import check_gate_inputs
    from rdcd.validate.runtimes import device_info

    manifest = Manifest.load(a.exports)
    check_manifest(manifest)
    bench = load_benchmark(a.benchmark)
    devices = check_gate_inputs(a, manifest)  # before minutes of evaluation: outputs, bench JSONs, INT8 rows
    t0 = time.perf_counter()
    result = evaluate_manifest(bench, manifest, a)
    report = {
        "schema": rep.SCHEMA, "tool": "rdcd-validate gate", "created": _now(),
        "benchmark": {"path": str(bench.root), "ground_truth": str(bench.gt_path), "ground_truth_sha256": result["gt_sha256"],
                      **bench.summary()},
        "exports": {"path": str(manifest.dir), "source": manifest.data.get("source", {}),
                    "rdcd_version": manifest.data.get("rdcd_version")},
        "settings": {"max_drop": a.max_drop, "drop_type": a.drop_type, "require": a.require, "k": a.k,
                     "whiten": a.whiten, "score_norm": a.score_norm, "threads": a.threads,
                     "latency_iters": a.latency_iters, "warmup": a.warmup, "batch_size": a.batch_size},
        "host": {**device_info(), "load_avg_1m_at_start": load_average()},
        "gate": {"passed": result["passed"], "failures": result["failures"], "counts": result["counts"],
                 "int8_artifacts": result["int8_artifacts"], "int8_checked": result["int8_checked"]},
        "artifacts": result["rows"], "devices": [],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for d in devices:
        rep.merge_device(report, d)
    rep.print_table(report)
    if a.report:
        written = rep.write_report(report, a.report)
        print(f"report: {', '.join(str(p) for p in written)}")
    if not report["gate"]["passed"]:
        raise GateFailed("gate failed: " + "; ".join(report["gate"]["failures"]))
    return 0


def merge_main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="rdcd-validate merge",
                           description="Merge rdcd-bench JSON files from devices into an existing gate report "
                                       "(device latency columns) and re-render report.md and latency.png.")
    p.add_argument("--report", required=True, metavar="OUT", help="report folder (with report.json) or report.json")
    p.add_argument("--bench-json", action="append", required=True, metavar="FILE", help="rdcd-bench result (repeatable)")
    a = p.parse_args(argv)
    from rdcd.validate import report as rep

    out, report = rep.load_report(a.report)
    rep.require_plotting()
    cli.writable_dir(out, "--report", clean=True)
    devices = [rep.load_bench_json(f) for f in a.bench_json]
    for d in devices:
        rep.merge_device(report, d)
    rep.print_table(report)
    written = rep.write_report(report, out)
    print(f"merged {len(devices)} bench file(s); report: {', '.join(str(p) for p in written)}")
    return 0


def _now() -> str:
    from rdcd.manifest import now

    return now()
