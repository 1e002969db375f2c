"""The gate's comparison of a row with its reference: which FP32 artifact it is compared with, the µAP drop
against the budget, the paired bootstrap interval of that drop, and the quantize stage's simulated numbers
for rows whose runtime cannot run here (Core ML off macOS). Also the row statuses. No torch here."""

from __future__ import annotations

from pathlib import Path

from rdcd.manifest import STATUSES, Artifact, Manifest

OK, NOT_CHECKABLE, FAILED = STATUSES  # a gate row's status: the manifest's words
SIMULATED = "simulated in PyTorch"


def _accuracy_block(art: Artifact, bench_root: Path, gt_sha: str) -> tuple[dict | None, str | None]:
    """The quantize stage's simulated numbers for this artifact, if measured on this benchmark."""
    acc = art.accuracy
    if acc is None or not acc.simulated:
        return None, None
    rec_sha, rec_bench = acc.ground_truth_sha256, acc.benchmark
    if rec_sha:
        if rec_sha != gt_sha:
            return None, (f"simulated µAP was measured on another benchmark ({rec_bench or '?'}, ground truth "
                          f"sha256 {str(rec_sha)[:12]}…, this one {gt_sha[:12]}…)")
    elif not rec_bench or Path(rec_bench).resolve() != bench_root.resolve():
        return None, f"simulated µAP was measured on another benchmark ({rec_bench or 'unrecorded'})"
    return {"micro_ap": float(acc.micro_ap), "reference_micro_ap": float(acc.fp32_micro_ap),
            "recall_at_p90": None, "acc_at_1": None,  # the quantize stage records µAP only
            "runtime": acc.runtime or SIMULATED,
            "drop_ci95": acc.drop_ci95 if isinstance(acc.drop_ci95, list) else None}, None


def add_simulated(row: dict, art: Artifact, bench, gt_sha: str) -> None:
    sim, why = _accuracy_block(art, bench.root, gt_sha)
    if why:
        row["notes"].append(why)
    if sim:
        row.update(simulated=True, micro_ap=sim["micro_ap"], recall_at_p90=sim["recall_at_p90"],
                   acc_at_1=sim["acc_at_1"], runtime=sim["runtime"], simulated_reference_micro_ap=sim["reference_micro_ap"],
                   simulated_drop_ci95=sim["drop_ci95"])
        how = sim["runtime"] if sim["runtime"] != SIMULATED else "in PyTorch"
        row["notes"].append(f"µAP simulated by rdcd-quantize on this benchmark ({how}); the runtime itself was not run")


def default_reference(manifest: Manifest, art: Artifact) -> str | None:
    """The float artifact an INT8/FP16 artifact is compared with: its ``reference``, followed through
    quantized references (a TensorRT INT8 engine names its QDQ ONNX model, which names the FP32 one),
    else the FP32 artifact of the same target, else the FP32 ONNX."""
    ref, seen = art.reference, {art.name}
    while ref and ref not in seen:
        seen.add(ref)
        nxt = manifest.get(ref)
        if nxt is None or not nxt.quantized or not nxt.reference:
            return ref
        ref = nxt.reference
    if ref:
        return ref
    if art.precision == "fp32":
        return None
    fp32 = [a for a in manifest.artifacts if a.precision == "fp32"]
    same = [a for a in fp32 if a.target == art.target]
    pick = (same or [a for a in fp32 if a.target == "onnx"] or fp32 or [None])[0]
    return pick.name if pick else None


def _drop(ref: float, q: float, drop_type: str) -> float:
    if drop_type == "relative":
        return (ref - q) / ref if ref > 0 else (0.0 if q >= ref else float("inf"))
    return ref - q


def compare_with_reference(row: dict, by_name: dict, cfg) -> None:
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
                row.update(status=NOT_CHECKABLE, reason=f"reference {ref_name} not evaluated ({why}): µAP drop unknown")
            return
    if ref_map is None:
        if row["gated"] and row["status"] == OK:
            row.update(status=NOT_CHECKABLE, reason="no FP32 reference in the manifest: µAP drop unknown")
        return
    row["reference_micro_ap"] = ref_map
    row["delta"] = row["micro_ap"] - ref_map
    row["drop"] = _drop(ref_map, row["micro_ap"], cfg.drop_type)
    if row["gated"] and row["drop"] > cfg.max_drop + 1e-12:
        what = "simulated µAP drop" if row["simulated"] else "µAP drop"
        unit = "" if cfg.drop_type == "absolute" else " (relative)"
        row.update(status=FAILED, reason=f"{what} {row['drop']:.4f}{unit} > max {cfg.max_drop:g} "
                                         f"({row['micro_ap']:.4f} vs {ref_map:.4f})")


def drop_interval(row: dict, predictions: dict, bench, cfg) -> None:
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
