"""The gate's rows: every artifact of a manifest run with its own runtime on the benchmark (µAP, R@P90, acc@1,
latency, size), or the reason it is not checkable or failed, then compared with its reference
(:mod:`rdcd.validate.gate_reference`) and turned into a verdict. No torch here."""

from __future__ import annotations

import os
import time

import numpy as np

from rdcd.errors import MissingDependency, RdcdError, RuntimeUnavailable
from rdcd.fsutil import artifact_files, artifact_sha256
from rdcd.manifest import Artifact, Manifest, replace
from rdcd.targets import RUNTIMES
from rdcd.validate.gate_reference import (FAILED, NOT_CHECKABLE, OK, add_simulated, compare_with_reference,
                                          default_reference, drop_interval)


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

    def run(self, manifest: Manifest, art: Artifact, runtime: str, content_key: str):
        """Return (measurement dict, runner description) or raise; ``content_key``: the artifact's
        :func:`~rdcd.fsutil.artifact_sha256` (two rows of the same files and runtime are measured once)."""
        from rdcd.validate.bench import measure_latency
        from rdcd.validate.evaluate import describe, evaluate_descriptors
        from rdcd.validate.artifact_input import artifact_input
        from rdcd.validate.runtimes import load_runner

        cfg = self.cfg
        path = manifest.resolve(art)
        runner = load_runner(path, runtime=runtime, threads=cfg.threads)
        key = (content_key, runner.name)
        if key in self.cache:
            return {**self.cache[key], "cached": True, "predictions": self.predictions[key]}, runner.describe()
        spec = artifact_input(path, runner, manifest=manifest, row=art).spec  # checked against the model's shape
        t0 = time.perf_counter()
        desc = describe(self.bench, runner, spec, cfg.batch_size, with_training=cfg.whiten or bool(cfg.score_norm),
                        label=art.name)
        res = evaluate_descriptors(self.bench, desc, k=cfg.k, whiten=cfg.whiten, score_norm=cfg.score_norm)
        eval_s = time.perf_counter() - t0
        lat = measure_latency(runner, self.sample(spec), cfg.warmup, cfg.latency_iters)
        m = res.metrics
        out = {"micro_ap": m.micro_ap, "recall_at_p90": m.recall_at_p90, "threshold_at_p90": m.threshold_at_p90,
               "acc_at_1": m.acc_at_1,
               "setting": res.setting, "dim": res.dim, "curve": _curve(m), "eval_seconds": round(eval_s, 2),
               "latency": {"batch": 1, "threads": cfg.threads, "warmup": cfg.warmup, "iters": cfg.latency_iters,
                           **{f"{k}_ms": v for k, v in lat["latency_ms"].items() if k in ("p50", "p90", "p99", "mean")},
                           "throughput_ips": lat["throughput_ips"]}}
        self.cache[key] = out
        self.predictions[key] = res.predictions
        return {**out, "predictions": res.predictions}, runner.describe()


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
        row = {"name": art.name, "target": art.target, "precision": art.precision, "path": art.path,
               "runtime": art.runtime or "auto", "runtime_version": None, "status": None, "reason": None,
               "micro_ap": None, "recall_at_p90": None, "acc_at_1": None, "simulated": False,
               "reference": default_reference(manifest, art), "reference_micro_ap": None, "delta": None,
               "drop": None, "gated": art.quantized, "size_bytes": None, "sha256": None,
               "latency": None, "curve": None, "notes": [], "devices": {}}
        rows.append(row)
        row["notes"] += [engine_note] if engine_note else []
        content_key = None
        if path.exists():
            files = artifact_files(path)
            row["size_bytes"] = sum(size_bytes(f) for f in files)
            row["sha256"] = sha256(path)
            content_key = row["sha256"] if len(files) == 1 else artifact_sha256(path)
            if art.sha256 and art.sha256 != row["sha256"]:
                row["notes"].append("file differs from the sha256 recorded in the manifest")
        if art.status == FAILED:
            row.update(status=FAILED, reason=f"export failed: {art.reason or 'no reason recorded'}")
            continue
        if not path.exists():
            if art.status == NOT_CHECKABLE:
                row.update(status=NOT_CHECKABLE, reason=art.reason or f"{art.path} was not built here")
                add_simulated(row, art, bench, gt_sha)
            else:
                what = "TensorRT engine" if art.runtime == "tensorrt" else "file"
                row.update(status=FAILED, reason=f"{what} not found: {art.path} (the manifest says {art.status})")
            continue
        runtime = art.runtime if art.runtime in RUNTIMES else "auto"
        t0 = time.perf_counter()
        try:
            meas, desc = ev.run(manifest, art, runtime, content_key)
            _progress(f"{art.name}: µAP {meas['micro_ap']:.4f}, p50 {meas['latency']['p50_ms']:.2f} ms "
                      f"({time.perf_counter() - t0:.1f} s)")
        except (RuntimeUnavailable, MissingDependency) as exc:
            row.update(status=NOT_CHECKABLE, reason=f"not checkable here: {_first_line(exc)}")
            add_simulated(row, art, bench, gt_sha)
            continue
        except RdcdError as exc:
            row.update(status=FAILED, reason=_first_line(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - an artifact that crashes its runtime is a failed row, not a crash
            if os.environ.get("RDCD_DEBUG"):
                raise
            row.update(status=FAILED, reason=f"{type(exc).__name__}: {_first_line(exc)}")
            continue
        predictions[art.name] = meas["predictions"]
        row.update(status=OK, runtime=desc.get("runtime", runtime), runtime_version=desc.get("version"),
                   micro_ap=meas["micro_ap"], recall_at_p90=meas["recall_at_p90"], acc_at_1=meas["acc_at_1"],
                   threshold_at_p90=meas["threshold_at_p90"],  # the operating point rdcd-index --threshold auto uses
                   setting=meas["setting"], curve=meas["curve"], latency=meas["latency"],
                   eval_seconds=meas["eval_seconds"])
        if meas.get("cached"):
            row["notes"].append("same file and runtime as an earlier row: results reused")

    by_name = {r["name"]: r for r in rows}
    for row in rows:
        compare_with_reference(row, by_name, cfg)
        drop_interval(row, predictions, bench, cfg)
    # a not-checkable row whose file was evaluated under another runtime (the QDQ model behind a TensorRT row)
    for row in rows:
        if row["status"] == NOT_CHECKABLE and row["sha256"] and not row["simulated"]:
            twin = next((r for r in rows if r is not row and r["sha256"] == row["sha256"] and r["status"] == OK), None)
            if twin:
                row["notes"].append(f"the same file was evaluated as {twin['name']} ({twin['runtime']})")
    failures = []
    for t in cfg.require:
        mine = [r for r in rows if r["target"] == t]
        if not mine:
            failures.append(f"required target {t}: no artifact in the manifest")
        for r in mine:
            if r["status"] == NOT_CHECKABLE:
                r.update(status=FAILED, reason=f"required target {t} not checked: {r['reason']}")
    for r in rows:
        if r["status"] == FAILED:
            failures.append(f"{r['name']}: {r['reason']}")
    gated = [r for r in rows if r["gated"]]
    return {"rows": rows, "gt_sha256": gt_sha, "failures": failures, "passed": not failures,
            "counts": {s: sum(r["status"] == s for r in rows) for s in (OK, NOT_CHECKABLE, FAILED)},
            "int8_artifacts": len(gated), "int8_checked": sum(r["status"] == OK for r in gated)}


def _engine_row(art: Artifact) -> tuple[Artifact, str | None]:
    """A TensorRT row as the gate runs it: its engine, never an ONNX file. Manifests from before rdcd-quantize
    built engines name the engine's QDQ source in ``path`` (and the engine in ``engine_path``)."""
    if not (art.target == "tensorrt" or art.runtime == "tensorrt") or not art.path.endswith(".onnx"):
        return art, None
    engine = art.engine_path or ""
    engine = engine if engine and not engine.endswith(".onnx") else art.path[: -len(".onnx")] + ".engine"
    row = replace(art, path=engine, runtime="tensorrt", qdq_source=art.path)
    row.clear_files()
    return row, (f"{art.path} is the engine's QDQ source (a manifest from before rdcd-quantize built engines): "
                 f"the engine is {engine}")


def _progress(msg: str) -> None:
    """One line per artifact on stderr, so that long CI runs show where they are."""
    import sys

    print(f"rdcd-validate gate: {msg}", file=sys.stderr, flush=True)
