"""Per-layer quantization error (SQNR) and the µAP-driven fallback loop.

Sensitivity: for every weight layer of a QDQ model, the local signal-to-quantization-noise ratio of what the
layer consumes: its input activation, taken from the FP32 model on real calibration images and passed
through the layer's own calibrated quantizer (scale, zero point, clipping), and its weights, compared with
their dequantized INT8 values (ONNX Runtime's ``qdq_loss_debug`` tools collect both). The two noises add:
``SQNR = -10 log10(10^(-act/10) + 10^(-w/10))``. Low SQNR = sensitive layer.

Fallback: while the µAP drop exceeds ``max_drop``, keep the next worst layers in float (1, 2, 4, 8, ...
layers, so that even a model broken everywhere is recovered in a handful of re-quantizations), re-quantize and
re-measure µAP; the first step that holds wins, or the best step when none does. Before that schedule the few
worst layers by SQNR are each measured alone in float, and those that raise µAP go first: the order is by
measured µAP effect, SQNR only picks the candidates. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rdcd.fsutil import temp_prefix

log = logging.getLogger(__name__)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64).ravel()
    test = np.asarray(test, np.float64).ravel()
    eps = np.finfo(np.float32).eps
    return float(20 * math.log10(max(np.linalg.norm(ref), eps) / max(np.linalg.norm(ref - test), eps)))


def combine_db(*values: float | None) -> float:
    noise = sum(10 ** (-v / 10) for v in values if v is not None)
    return float(-10 * math.log10(noise)) if noise > 0 else float("inf")


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    info = np.iinfo(zp.dtype)
    s = np.asarray(scale, np.float64)
    z = np.asarray(zp, np.float64)
    q = np.clip(np.round(x / s) + z, info.min, info.max)
    return (q - z) * s


def layer_sensitivity(float_path: str | os.PathLike, qdq_path: str | os.PathLike, images: np.ndarray,
                      units: dict[str, list[str]]) -> list[dict]:
    """SQNR per quantized unit, worst first. ``units`` maps a unit name -> its node names (same in both models);
    the first node is the one whose inputs are scored."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_weight_error,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    fmodel = onnx.load(str(float_path))
    qmodel = onnx.load(str(qdq_path))
    input_name = fmodel.graph.input[0].name
    fnodes = {n.name: n for n in fmodel.graph.node}
    qnodes = {n.name: n for n in qmodel.graph.node}
    finits = {i.name for i in fmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    inits = {i.name: i for i in qmodel.graph.initializer}

    # unit -> [(float activation tensor, scale, zero point)], [weight initializer names]
    wanted: dict[str, tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]] = {}
    for unit, nodes in units.items():
        node_name = nodes[0]
        qn, fn = qnodes.get(node_name), fnodes.get(node_name)
        if qn is None or fn is None or len(qn.input) != len(fn.input):
            continue
        acts, weights = [], []
        for i, (qi, fi) in enumerate(zip(qn.input, fn.input)):
            dq = producer.get(qi)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if fi in finits:
                if i == 1:  # the weight; biases (int32, scale = input x weight scale) add no noise worth ranking
                    weights.append(fi)
                continue
            scale = inits.get(dq.input[1])
            zp = inits.get(dq.input[2]) if len(dq.input) > 2 else None
            if scale is None or zp is None:
                continue
            acts.append((fi, numpy_helper.to_array(scale), numpy_helper.to_array(zp)))
        if acts or weights:
            wanted[unit] = (acts, weights)

    with tempfile.TemporaryDirectory(prefix=temp_prefix("sqnr"), dir=Path(qdq_path).parent) as tmp:
        aug = Path(tmp) / "float.aug.onnx"
        modify_model_output_intermediate_tensors(str(float_path), str(aug))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(range(len(images)))

            def get_next(self):
                i = next(self._it, None)
                return None if i is None else {input_name: images[i: i + 1]}

        acts_f = collect_activations(str(aug), Reader())
        weight_err = compute_weight_error(create_weight_matching(str(float_path), str(qdq_path)))

    rows = []
    for unit, (acts, weights) in wanted.items():
        act_dbs = []
        for tensor, scale, zp in acts:
            if tensor in acts_f:
                x = np.concatenate([a.ravel() for a in acts_f[tensor]])
                act_dbs.append(sqnr_db(x, _fake_quant(x, scale, zp)))
        w_dbs = [weight_err[w] for w in weights if w in weight_err]
        act_db = combine_db(*act_dbs) if act_dbs else None
        w_db = combine_db(*w_dbs) if w_dbs else None
        rows.append({"layer": unit, "nodes": list(units[unit]), "act_sqnr_db": _r(act_db),
                     "weight_sqnr_db": _r(w_db), "sqnr_db": _r(combine_db(act_db, w_db))})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def _r(v):
    return None if v is None else round(float(v), 2)


# ------------------------------------------------------------------------------------------ fallback
@dataclasses.dataclass
class Step:
    excluded: list[str]
    micro_ap: float
    drop: float
    path: Path | None = None
    call: int = 0  # the index ``build`` was called with

    def row(self) -> dict:
        return {"float_layers": len(self.excluded), "excluded": list(self.excluded),
                "micro_ap": round(self.micro_ap, 6), "drop": round(self.drop, 6)}


@dataclasses.dataclass
class FallbackResult:
    steps: list[Step]
    chosen: Step
    max_drop: float
    probes: list[Step] = dataclasses.field(default_factory=list)

    @property
    def holds(self) -> bool:
        return self.chosen.drop <= self.max_drop

    def report(self) -> dict:
        return {"max_drop": self.max_drop, "holds": self.holds, "fallback_layers": list(self.chosen.excluded),
                "steps": [s.row() for s in self.steps],
                "probes": [{"layer": p.excluded[0], "micro_ap": round(p.micro_ap, 6), "drop": round(p.drop, 6)}
                           for p in self.probes]}


def exclusion_schedule(n_layers: int, max_steps: int) -> list[int]:
    """1, 2, 4, ... layers kept in float, ending with all of them."""
    ks, k = [], 1
    while k < n_layers and len(ks) < max_steps - 1:
        ks.append(k)
        k *= 2
    if n_layers and len(ks) < max_steps:
        ks.append(n_layers)
    return ks


PROBE = 4  # layers measured one at a time before the fallback schedule


def fallback_loop(build: Callable[[Sequence[str], int], Path | None], measure: Callable[[Path | None], float],
                  ranking: Sequence[str], fp32_uap: float, max_drop: float, max_steps: int = 8,
                  enabled: bool = True, label: str = "", probe: int = PROBE) -> FallbackResult:
    """``build(excluded_layers, call)`` writes a quantized variant and returns it; ``measure`` gives its µAP.

    When the fully quantized model misses the budget, the ``probe`` worst layers by SQNR are first each kept in
    float alone and measured: the ranking then starts with the layers whose float copy measurably raised µAP
    (largest gain first), so a layer that SQNR underrates but µAP needs is found in the first steps."""
    steps: list[Step] = []
    probes: list[Step] = []
    calls = [0]

    def variant(excluded: list[str]) -> Step:
        path = build(excluded, calls[0])
        uap = float(measure(path))
        calls[0] += 1
        return Step(list(excluded), uap, float(fp32_uap) - uap, path, calls[0] - 1)

    def run(excluded: list[str]) -> Step:
        probed = next((p for p in probes if p.excluded == list(excluded)), None)
        step = probed or variant(excluded)  # a probe already measured this exact variant
        steps.append(step)
        log.info("%s: %d layer(s) in float -> µAP %.4f (drop %+.4f)", label or "fallback", len(excluded), step.micro_ap,
                 step.drop)
        return step

    step = run([])
    if enabled and step.drop > max_drop:
        if not ranking:
            log.warning("%s: drop %.4f > %.4f but no layer ranking to fall back on", label, step.drop, max_drop)
        for layer in list(ranking[:probe]):
            probes.append(variant([layer]))
            log.info("%s: probe %s alone in float -> µAP %.4f (drop %+.4f)", label or "fallback", layer,
                     probes[-1].micro_ap, probes[-1].drop)
            if probes[-1].drop <= max_drop:  # one layer is enough: it is the first step
                steps.append(probes[-1])
                return FallbackResult(steps, probes[-1], max_drop, probes)
        helped = sorted((p for p in probes if p.drop < step.drop), key=lambda p: p.drop)
        first = [p.excluded[0] for p in helped]
        ranking = first + [r for r in ranking if r not in first]
        for k in exclusion_schedule(len(ranking), max_steps):
            step = run(list(ranking[:k]))
            if step.drop <= max_drop:
                break
    holding = [s for s in steps if s.drop <= max_drop]
    chosen = holding[0] if holding else min(steps, key=lambda s: s.drop)
    return FallbackResult(steps, chosen, max_drop, probes)
