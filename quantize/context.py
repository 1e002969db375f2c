"""What the INT8 targets of :func:`rdcd.quantize.quantize` share: the export, its preprocessing, the
calibration images, the benchmark and µAP budget, the ONNX quantizer and the per-layer sensitivity ranking
(:class:`Context`), the manifest-row helpers every target uses and the removal of files an older layout left.
No torch here."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

from rdcd import __version__
from rdcd.errors import RdcdError
from rdcd.manifest import MAX_DROP, Artifact, Manifest, ProducedBy, package_versions
from rdcd.targets import new_artifact
from rdcd.quantize.accuracy import check_unit_norm

log = logging.getLogger("rdcd.quantize.api")

#: calibration methods tried in order by ``method="auto"`` (the first within the budget wins)
AUTO_METHODS = ("minmax", "percentile", "entropy")
#: the packages whose versions every quantized artifact records
PRODUCED_WITH = ("onnx", "onnxruntime", "nncf", "openvino", "coremltools", "torch", "faiss-cpu")
#: calibration images the per-layer SQNR ranking runs on
SENSITIVITY_IMAGES = 16
TRT_PREDICTION = "onnxruntime (QDQ reference semantics, graph optimisations off): the TensorRT INT8 prediction"


#: target -> what older versions wrote where :data:`rdcd.artifact.LAYOUT` now puts that target's INT8 artifacts
OLD_LAYOUT = {"openvino": ("openvino-int8",),
              "coreml": ("model.w8a8.mlpackage", "model.w8.mlpackage", "model.w8a8.simulation")}


def remove_old_layout(manifest: Manifest, target: str) -> list[str]:
    """Remove the files of ``target`` that an older version wrote at its old paths (re-quantizing replaced them),
    unless a row of ``manifest`` still names one; returns what was removed."""
    named = {manifest.resolve(a).resolve() for a in manifest.artifacts}
    removed = []
    for rel in OLD_LAYOUT.get(target, ()):
        p = manifest.dir / rel
        if p.exists() and not any(n == p.resolve() or p.resolve() in n.parents for n in named):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(rel)
    if removed:
        log.info("removed %s (the layout of older versions)", ", ".join(removed))
    return removed


class Context:
    """One :func:`rdcd.quantize.quantize` run, as the targets see it."""

    def __init__(self, manifest: Manifest, spec, bench, calib, accuracy, recipe, threads: int, command: str | None,
                 onnx_art: Artifact, fp32_onnx: Path, student=None, checkpoint: Path | None = None):
        self.manifest, self.spec, self.bench, self.calib = manifest, spec, bench, calib
        self.recipe, self.threads, self.command = recipe, threads, command
        self.onnx_art, self.fp32_onnx, self.student, self.checkpoint = onnx_art, fp32_onnx, student, checkpoint
        #: the µAP budget in points; a relative AccuracyControl becomes points once the FP32 µAP is known
        self.max_drop = accuracy.max_drop if accuracy is not None else MAX_DROP
        self.fallback = accuracy is not None and accuracy.fallback  # the benchmark comes with the accuracy control
        self.max_steps = accuracy.max_fallback_steps if accuracy is not None else 0
        self.methods = AUTO_METHODS if recipe.method == "auto" else (recipe.method,)
        # NNCF's QDQ graphs leave Conv -> Clip -> QuantizeLinear, which ONNX Runtime cannot fuse into integer
        # kernels (measured 3-4x slower than FP32 on this CPU): auto uses ONNX Runtime's quantizer
        self.engines = ("ort",) if recipe.engine == "auto" else (recipe.engine,)
        self.fp32_uap: float | None = None
        self.quantizer = None
        self.work: Path = Path(".")
        self.ranking: list[str] | None = None
        self.sensitivity: list[dict] | None = None
        self.chosen_method: str | None = None
        self.predictions: dict = {}  # key -> Predictions, for the paired bootstrap of each drop

    def uap(self, embedder, key=None) -> float:
        """µAP of ``embedder`` on the benchmark; its predictions are kept under ``key``."""
        if self.bench is None:
            return float("nan")
        res = self.bench.evaluate(self.bench.describe(embedder))
        if key is not None:
            self.predictions[key] = res.predictions
        return float(res.metrics.micro_ap)

    def unit_norm(self, embedder, label: str) -> dict:
        """The L2-norm contract on calibration images: an error when the tail is kept float (a quantizer
        there is a bug), a warning with ``--quantize-tail`` (the user asked for a quantized tail)."""
        try:
            return check_unit_norm(embedder, self.calib.images, label)
        except RdcdError as exc:
            if self.quantizer is not None and self.quantizer.keep_tail_float:
                raise
            log.warning("%s (--quantize-tail)", exc)
            return {"error": str(exc)}

    def interval(self, reference_key, key) -> dict:
        """``drop_ci95`` for an accuracy block: the paired bootstrap 95 % interval of the drop over queries."""
        from rdcd.validate.bootstrap import paired_drop_interval

        if reference_key not in self.predictions or key not in self.predictions:
            return {}
        b = self.bench.bench
        iv = paired_drop_interval(self.predictions[reference_key], self.predictions[key], b.gt_pairs, b.queries.ids)
        return {"drop_ci95": [round(iv.low, 6), round(iv.high, 6)]}

    def produced_by(self, tool: str, options: dict) -> ProducedBy:
        return ProducedBy(tool, {"rdcd": __version__, **package_versions(*PRODUCED_WITH)}, options,
                          self.command or "rdcd.quantize.quantize")

    def base(self, target: str, precision: str, reference: str, status: str = "ok", reason: str | None = None) -> Artifact:
        """A quantized row (:func:`rdcd.targets.new_artifact`) taking the FP32 ONNX model's input (``spec``, its
        one answer), with its output and the calibration it used."""
        return new_artifact(target, precision, self.spec.size, copy.deepcopy(self.onnx_art.output), reference=reference,
                            status=status, reason=reason, calibration=self.calib.describe())

    def rank(self, recipe, step0_path: Path | None = None) -> list[str]:
        """Layers worst first, by local SQNR of an ONNX Runtime QDQ model (computed once, shared by targets)."""
        if self.ranking is not None:
            return self.ranking
        from rdcd.quantize.sensitivity import layer_sensitivity

        q = self.quantizer
        if step0_path is None or recipe.engine != "ort":
            from rdcd.quantize.onnx_ptq import Recipe

            step0_path = q.quantize(self.work / "sensitivity.onnx", Recipe(engine="ort", method=recipe.method))
        rows = layer_sensitivity(q.pre_path, step0_path, self.calib.images[:SENSITIVITY_IMAGES], q.units)
        self.sensitivity = rows
        self.ranking = [r["layer"] for r in rows]
        log.info("sensitivity: worst layers %s", ", ".join(f"{r['layer']} ({r['sqnr_db']} dB)" for r in rows[:5]))
        return self.ranking


def default_recipe():
    from rdcd.quantize.onnx_ptq import Recipe

    return Recipe()


def r6(v):
    return None if v is None else round(float(v), 6)
