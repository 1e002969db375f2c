"""Gate reports: the console table (rich, CI-log friendly), ``report.md``, ``report.json``,
``pr_curve.png`` and ``latency.png``, and merging ``rdcd-bench`` JSON files from devices.

``report.json`` holds everything needed to re-render the others (curves are stored down-sampled),
so ``rdcd-validate merge`` can add device columns later without re-running the evaluation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rdcd.artifact import STATUS_ICON, STATUSES
from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import read_json
from rdcd.validate.bench import device_label

SCHEMA = "rdcd-gate-report/1"
#: statuses of reports written by earlier versions, read as today's
LEGACY_STATUS = {"not_checked": "not_checkable"}
HOST = "this machine"


# ------------------------------------------------------------------------------------------- loading
def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency("matplotlib", "needed for the report plots: pip install 'rdcd[eval]'") from None


def load_bench_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RdcdError(f"bench JSON not found: {path}")
    rec = read_json(path)
    if not isinstance(rec, dict) or not str(rec.get("schema", "")).startswith("rdcd-bench/"):
        raise RdcdError(f"{path} is not an rdcd-bench result (no 'schema': 'rdcd-bench/1')")
    lat, model = rec.get("latency_ms"), rec.get("model")
    if not isinstance(lat, dict) or not isinstance(lat.get("p50"), (int, float)) or not isinstance(model, dict) \
            or not model.get("name"):
        raise RdcdError(f"{path}: rdcd-bench result lacks latency_ms.p50 or model.name")
    rec["source"] = str(path)
    return rec


def load_report(path: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise RdcdError(f"no gate report at {path} (expected a folder with report.json from rdcd-validate --report)")
    report = read_json(file)
    if not isinstance(report, dict) or report.get("schema") != SCHEMA or not isinstance(report.get("artifacts"), list):
        raise RdcdError(f"{file} is not an rdcd gate report ({SCHEMA})")
    for i, row in enumerate(report["artifacts"]):
        if not (isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("path"), str)):
            raise RdcdError(f"malformed {file}: artifact row {i} lacks a name or path")
        status = LEGACY_STATUS.get(row.get("status"), row.get("status"))
        if status not in STATUSES:
            raise RdcdError(f"malformed {file}: artifact {row['name']!r} has status {row.get('status')!r}, not one of "
                            f"{', '.join(STATUSES)}")
        row["status"] = status
    return file.parent, report


# ------------------------------------------------------------------------------------------- merging
def _row_sha(row: dict, base: Path | None) -> str | None:
    if row.get("sha256"):
        return row["sha256"]
    if base is not None:
        p = base / row["path"]
        if p.exists():
            from rdcd.fsutil import sha256

            row["sha256"] = sha256(p)
            return row["sha256"]
    return None


def match_rows(rows: list[dict], rec: dict, base: Path | None = None) -> tuple[list[dict], str]:
    """Rows (report rows or manifest artifacts) that a bench result measured: by sha256, then the manifest
    artifact name recorded by rdcd-bench, then file name, then file stem (an engine built on the device as
    model-int8.engine matches the row for model-int8.engine or model-int8.onnx). Of several hits, the rows run
    by the bench's runtime are taken (else the first hit)."""
    model = rec["model"]
    runtime = (rec.get("runtime") or {}).get("runtime")
    name = str(model.get("name"))
    stem = Path(name).stem
    tests = [
        ("sha256", lambda r: model.get("sha256") and _row_sha(r, base) == model.get("sha256")),
        ("artifact name", lambda r: model.get("artifact") and r.get("name") == model.get("artifact")),
        ("file name", lambda r: Path(r["path"]).name == name),
        ("file stem", lambda r: Path(r["path"]).stem == stem),
    ]
    for how, test in tests:
        hits = [r for r in rows if test(r)]
        if hits and how != "sha256":
            hits = _same_file(hits, rec, base)
        if hits:
            same = [r for r in hits if r.get("runtime") == runtime]
            return (same or hits[:1]), how
    raise RdcdError(f"{rec.get('source', 'bench JSON')}: {name} (sha256 {str(model.get('sha256'))[:12]}…) matches no "
                    f"artifact of the report/manifest by sha256, artifact name or file name")


def _same_file(hits: list[dict], rec: dict, base: Path | None) -> list[dict]:
    """Rows matched by name that may be the benched file: a row of the same file type whose sha256 differs
    is another file (another export under the same name) and is refused, never merged."""
    model = rec["model"]
    sha, suffix = model.get("sha256"), Path(str(model.get("name"))).suffix
    if not sha:
        return hits
    ok = [r for r in hits if Path(r["path"]).suffix != suffix or _row_sha(r, base) in (None, sha)]
    if ok:
        return ok
    r = hits[0]
    raise RdcdError(f"{rec.get('source', 'bench JSON')}: {model.get('name')} (sha256 {str(sha)[:12]}…) has the name "
                    f"of artifact {r.get('name')} ({r['path']}, sha256 {str(_row_sha(r, base))[:12]}…) but not its "
                    f"content: it benched another file; bench the report's file")


def merge_device(report: dict, rec: dict) -> list[str]:
    """Add a bench result as a device column; returns the artifact names it was attached to."""
    label = device_label(rec)
    rows, how = match_rows(report["artifacts"], rec)
    lat = rec["latency_ms"]
    gpu = rec.get("gpu_compute_ms") or {}
    cell = {"p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
            "throughput_ips": rec.get("throughput_ips"), "batch": (rec.get("settings") or {}).get("batch", 1),
            "gpu_compute_p50_ms": gpu.get("p50"), "matched_by": how, "source": rec.get("source"),
            "model": rec["model"].get("name")}
    for r in rows:
        r.setdefault("devices", {})[label] = cell
    devices = report.setdefault("devices", [])
    entry = next((d for d in devices if d["label"] == label), None)
    if entry is None:
        entry = {"label": label, "device": rec.get("device"), "runtime": rec.get("runtime"), "sources": [],
                 "artifacts": []}
        devices.append(entry)
    if rec.get("source") not in entry["sources"]:
        entry["sources"].append(rec.get("source"))
    entry["artifacts"] = sorted(set(entry["artifacts"]) | {r["name"] for r in rows})
    return [r["name"] for r in rows]


# ------------------------------------------------------------------------------------------- tables
def _f(x, nd=4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ms(x) -> str:
    return "—" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _size(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _delta(row: dict, drop_type: str) -> str:
    d = row.get("delta")
    if d is None:
        return "—"
    s = f"{d:+.4f}"
    if drop_type == "relative" and row.get("reference_micro_ap"):
        s += f" ({d / row['reference_micro_ap']:+.1%})"
    ci = row.get("drop_ci95")
    if ci:  # the interval of the drop, shown as an interval of Δ = -drop
        s += f" [{-ci[1]:+.4f}, {-ci[0]:+.4f}]"
    return s


def _runtime(row: dict) -> str:
    if row.get("simulated"):  # the full label (which tool) is in report.json
        if str(row.get("runtime") or "").startswith("onnxruntime"):
            return "predicted: ORT QDQ ref."  # the TensorRT INT8 row: its QDQ model in reference semantics
        return "simulated in PyTorch"
    rt = row.get("runtime") or "?"
    ver = str(row.get("runtime_version") or "").split("-")[0]  # OpenVINO: 2026.4.1-22982-<hash>-releases/...
    return f"{rt} {ver}" if ver else rt


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    drop_type = report["settings"]["drop_type"]
    labels = [d["label"] for d in report.get("devices", [])]
    head = ["", "artifact", "target", "precision", "runtime", "µAP", "R@P90", "Δ µAP [95% CI]", "size",
            "p50 ms", "p90 ms", "p99 ms", "img/s"] + [f"p50 ms · {lb}" for lb in labels]
    body = []
    for r in report["artifacts"]:
        lat = r.get("latency") or {}
        sim = " (sim.)" if r.get("simulated") else ""
        cells = [STATUS_ICON[r["status"]], r["name"], r["target"], r["precision"], _runtime(r),
                 (_f(r.get("micro_ap")) + sim) if r.get("micro_ap") is not None else "—",
                 _f(r.get("recall_at_p90")), _delta(r, drop_type), _size(r.get("size_bytes")),
                 _ms(lat.get("p50_ms")), _ms(lat.get("p90_ms")), _ms(lat.get("p99_ms")),
                 "—" if lat.get("throughput_ips") is None else f"{lat['throughput_ips']:.1f}"]
        for lb in labels:
            c = (r.get("devices") or {}).get(lb)
            if not c:
                cells.append("—")
                continue
            s = _ms(c.get("p50_ms"))
            if c.get("gpu_compute_p50_ms") is not None:
                s += f" (GPU {_ms(c['gpu_compute_p50_ms'])})"
            cells.append(s)
        body.append(cells)
    return head, body


def notes(report: dict) -> list[str]:
    out = []
    for r in report["artifacts"]:
        parts = ([r["reason"]] if r.get("reason") else []) + list(r.get("notes") or [])
        if parts:
            out.append(f"{STATUS_ICON[r['status']]} {r['name']}: " + "; ".join(parts))
    return out


def verdict(report: dict) -> str:
    g, s = report["gate"], report["settings"]
    c = g["counts"]
    rule = f"max µAP drop {s['max_drop']:g} ({s['drop_type']})"
    if g["passed"]:
        head = "✅ PASSED"
        if not g["int8_artifacts"]:
            detail = "no INT8 artifact in the manifest: nothing to gate"
        else:
            detail = f"{g['int8_checked']} of {g['int8_artifacts']} INT8 artifact(s) checked within {rule}"
    else:
        head = "❌ FAILED"
        detail = f"{len(g['failures'])} failure(s), {rule}"
    extra = f"; {c['not_checkable']} not checkable here (not a pass)" if c.get("not_checkable") else ""
    return f"{head}: {detail}{extra}"


def print_table(report: dict, file=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if tty else max(int(os.environ.get("COLUMNS", 0) or 0), 200),
                      highlight=False, emoji=False)
    head, body = table(report)
    t = Table(box=box.SIMPLE_HEAD, title=f"rdcd gate · {Path(report['benchmark']['path']).name}", title_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="right" if i >= 5 else "left", no_wrap=i < 5)
    for row in body:
        t.add_row(*[Text(c) for c in row])
    console.print(t)
    for line in notes(report):
        console.print(Text(f"  {line}"))
    console.print(Text(f"gate: {verdict(report)}"))


def markdown(report: dict) -> str:
    b, s, h = report["benchmark"], report["settings"], report.get("host", {})
    head, body = table(report)
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["# rdcd INT8 gate report", "", f"**{verdict(report)}**", ""]
    for f in report["gate"]["failures"]:
        lines.append(f"- {esc(f)}")
    if report["gate"]["failures"]:
        lines.append("")
    lines += [f"Benchmark `{b['path']}`: {b.get('queries')} queries, {b.get('references')} references, "
              f"{b.get('true_pairs')} true pairs (ground truth sha256 `{b['ground_truth_sha256'][:16]}…`). "
              f"Exports `{report['exports']['path']}`.", "",
              "| " + " | ".join(esc(x) for x in head) + " |",
              "|" + "|".join([":-:"] + [":--"] * 4 + ["--:"] * (len(head) - 5)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    lines += ["", "Δ µAP is against each artifact's FP32 reference; the gate applies to INT8-class artifacts "
                  "(int8, w8a8, w8). ✅ checked here · ❎ not checkable here (never a pass) · ❌ failed. "
                  f"Latency on {HOST}: batch 1, {s['threads']} thread(s), p50/p90/p99 over {s['latency_iters']} "
                  f"runs after {s['warmup']} warm-up runs, end-to-end (uint8 image in, descriptor out).", ""]
    nts = notes(report)
    if nts:
        lines += ["## Notes", ""] + [f"- {esc(n)}" for n in nts] + [""]
    lines += ["## Precision-recall", "", "![precision-recall](pr_curve.png)", "",
              "## Latency", "", "![latency p50](latency.png)", ""]
    if report.get("devices"):
        lines += ["## Devices", "", "| column | device | runtime | power mode | source |", "|---|---|---|---|---|"]
        for d in report["devices"]:
            dev, rt = d.get("device") or {}, d.get("runtime") or {}
            what = dev.get("board") or dev.get("cpu") or dev.get("machine") or "?"
            lines.append(f"| {esc(d['label'])} | {esc(what)} ({dev.get('system', '?')}, {dev.get('cpu_count', '?')} CPUs) | "
                         f"{esc(rt.get('runtime', '?'))} {esc(rt.get('version', ''))} | {esc(dev.get('power_mode') or '—')} | "
                         f"{esc(', '.join(Path(x).name for x in d.get('sources', []) if x))} |")
        lines.append("")
    host = h.get("board") or h.get("cpu") or h.get("machine")
    lines += ["## Settings", "",
              f"- {HOST}: {host}, {h.get('cpu_count')} CPUs, {h.get('system')}, Python {h.get('python')}, "
              f"1-min load average at start {h.get('load_avg_1m_at_start', '?')} (other work skews latency)",
              f"- gate: max drop {s['max_drop']:g} ({s['drop_type']}), required targets: "
              f"{', '.join(s['require']) or 'none'}",
              f"- search: k={s['k']}, whitening {'on' if s['whiten'] else 'off'}, score normalisation "
              f"{s['score_norm'] or 'off'}",
              f"- created {report.get('created')}, evaluation took {report.get('seconds')} s", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots
def _savefig(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def plot_pr(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    n = 0
    for r in report["artifacts"]:
        c = r.get("curve")
        if not c or not c.get("recall"):
            continue
        ax.step([0.0] + c["recall"], [c["precision"][0]] + c["precision"], where="post",
                label=f"{r['name']} (µAP {r['micro_ap']:.3f})", lw=1.5, ls="-" if r["precision"] == "fp32" else "--")
        n += 1
    if not n:
        ax.text(0.5, 0.5, "no artifact could be evaluated here", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall on {Path(report['benchmark']['path']).name} (ISC2021 micro-AP)")
    ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    ax.grid(alpha=0.3)
    if n:
        ax.legend(loc="lower left", fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


def plot_latency(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [d["label"] for d in report.get("devices", [])]
    host = f"{HOST} ({(report.get('host') or {}).get('cpu') or (report.get('host') or {}).get('machine', '?')})"
    series = [(host, lambda r: (r.get("latency") or {}).get("p50_ms"))]
    series += [(lb, (lambda lb: lambda r: ((r.get("devices") or {}).get(lb) or {}).get("p50_ms"))(lb)) for lb in labels]
    rows = [r for r in report["artifacts"] if any(get(r) is not None for _, get in series)]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(rows)) * max(1, len(series))))
    if rows:
        height = 0.8 / len(series)
        y = np.arange(len(rows))
        for i, (name, get) in enumerate(series):
            vals = [get(r) for r in rows]
            ys = [y[j] + i * height for j, v in enumerate(vals) if v is not None]
            xs = [v for v in vals if v is not None]
            if not xs:
                continue
            bars = ax.barh(ys, xs, height=height * 0.95, label=name)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in xs], padding=2, fontsize=7)
        ax.set_yticks(y + height * (len(series) - 1) / 2, [f"{r['name']} ({r['precision']})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / max(1, len(rows))), ncol=1,
                  frameon=False)
        ax.set_xlim(0, ax.get_xlim()[1] * 1.12)
    else:
        ax.text(0.5, 0.5, "no latency measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set(xlabel="p50 latency per call (ms, batch 1 unless the column says)", title="End-to-end latency (p50)")
    ax.grid(axis="x", alpha=0.3)
    _savefig(fig, path)
    plt.close(fig)


def write_report(report: dict, out: str | os.PathLike) -> list[Path]:
    """All four files or none: each is written to a temporary first, and all are renamed into place only
    when every one was written (a full disk leaves the previous report, and no temporaries)."""
    import contextlib

    from rdcd.fsutil import atomic_path, json_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "pr_curve.png", out / "latency.png"]
    with contextlib.ExitStack() as stack:
        tmp = [stack.enter_context(atomic_path(p)) for p in paths]
        plot_pr(report, tmp[2])
        plot_latency(report, tmp[3])
        tmp[1].write_text(markdown(report), encoding="utf-8")
        tmp[0].write_text(json_text(report), encoding="utf-8")
    return paths
