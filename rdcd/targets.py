"""The one table of deployment targets: for each, how it is exported, quantized and run, and whether that can
happen on this machine. No torch here (the functions are named, and imported only when used).

==========  ===========  ======================  =========================================================
target      runtime      artifacts               export / quantize / run
==========  ===========  ======================  =========================================================
onnx        onnxruntime  .onnx                   torch.onnx.export / ONNX Runtime static PTQ / onnxruntime
coreml      coreml       .mlpackage, .mlmodel    coremltools.convert / coremltools.optimize / Core ML (macOS)
openvino    openvino     .xml (+ .bin)           openvino.convert_model / NNCF / OpenVINO
tensorrt    tensorrt     .engine, .plan          trtexec or the TensorRT API / QDQ for TensorRT / TensorRT
==========  ===========  ======================  =========================================================

``rdcd-export --list-targets`` prints :func:`describe` for every target.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from dataclasses import dataclass
from typing import Callable

from rdcd.artifact import LAYOUT, TARGETS, Artifact, Input, Output, artifact_name, layout_path


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
        return None
    except ImportError:
        return f"{module} is not installed"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing shared library)
        return f"{module} does not load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _onnx_here() -> tuple[str | None, str | None]:
    return _importable("onnx"), _importable("onnxruntime")


def _coreml_here() -> tuple[str | None, str | None]:
    # looked up, not imported: importing coremltools pulls in torch and prints its own warnings off macOS
    why = None if importlib.util.find_spec("coremltools") else "coremltools is not installed"
    return why, why or (None if platform.system() == "Darwin" else "Core ML prediction needs macOS")


def _openvino_here() -> tuple[str | None, str | None]:
    why = _importable("openvino")
    return why, why


def _tensorrt_here() -> tuple[str | None, str | None]:
    from rdcd.export.tensorrt import availability

    ok, why = availability()  # the build script is always written; engines need TensorRT and a CUDA device
    return None, None if ok else why


@dataclass(frozen=True)
class Target:
    """One deployment target: its runtime, the files its runner loads, and the functions of each stage
    (``"module:function"``: :mod:`rdcd.export.targets`, :mod:`rdcd.quantize`'s target jobs,
    :mod:`rdcd.validate.runtimes`)."""

    name: str
    runtime: str
    suffixes: tuple[str, ...]
    export: str  # f(Exporter) -> None: records its manifest row(s)
    quantize: str  # f(Context) -> (rows, report section)
    runner: str  # Runner class: Runner(path, ...)
    here: Callable[[], tuple[str | None, str | None]]  # (why it cannot be exported here, why it cannot run here)

    def function(self, stage: str) -> Callable:
        """The function (or runner class) of ``stage``: ``"export"``, ``"quantize"`` or ``"runner"``."""
        module, _, name = getattr(self, stage).partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for t, p in LAYOUT if t == self.name)

    def describe(self) -> dict:
        """What this machine can do with the target (the status ``rdcd-export --list-targets`` prints)."""
        export_why, run_why = self.here()
        return {"target": self.name, "runtime": self.runtime, "precisions": list(self.precisions),
                "files": list(self.suffixes), "export": export_why or "yes", "run": run_why or "yes"}


_TARGETS = (
    Target("onnx", "onnxruntime", (".onnx",), "rdcd.export.targets:onnx_target",
           "rdcd.quantize.target_onnx:onnx_int8", "rdcd.validate.runtimes:OnnxRuntimeRunner", _onnx_here),
    Target("coreml", "coreml", (".mlpackage", ".mlmodel"), "rdcd.export.targets:coreml_target",
           "rdcd.quantize.target_coreml:coreml_w8a8_w8", "rdcd.validate.runtimes:CoreMLRunner", _coreml_here),
    Target("openvino", "openvino", (".xml",), "rdcd.export.targets:openvino_target",
           "rdcd.quantize.target_openvino:openvino_int8", "rdcd.validate.runtimes:OpenVINORunner", _openvino_here),
    Target("tensorrt", "tensorrt", (".engine", ".plan"), "rdcd.export.targets:tensorrt_target",
           "rdcd.quantize.target_onnx:tensorrt_int8", "rdcd.validate.runtimes:TensorRTRunner", _tensorrt_here),
)
#: every target, in :data:`rdcd.artifact.TARGETS` order (export and quantize run them in this order: the others
#: are converted from, built from or checked against ONNX); a target of the layout without an entry fails here
_BY_NAME = {t.name: t for t in _TARGETS}
REGISTRY: dict[str, Target] = {name: _BY_NAME[name] for name in TARGETS}

#: runtime name -> its target (``--runtime`` choices)
BY_RUNTIME: dict[str, Target] = {t.runtime: t for t in REGISTRY.values()}
#: every runtime name (``--runtime`` takes these or ``auto``)
RUNTIMES: tuple[str, ...] = tuple(BY_RUNTIME)


def new_artifact(target: str, precision: str, size: int, output: Output, *, batch: int | str = "batch",
                 name: str | None = None, path: str | None = None, **fields) -> Artifact:
    """The one way a stage starts a manifest row: ``target`` at ``precision``, named and placed by the layout
    (unless ``name``/``path`` say otherwise), run by the target's runtime, taking ``size`` px (as ``target`` takes
    inputs: :meth:`~rdcd.artifact.Input.of`), status ok."""
    return Artifact(name or artifact_name(target, precision), target, precision, path or layout_path(target, precision),
                    REGISTRY[target].runtime, Input.of(target, size, batch), output, **fields)


def for_file(suffix: str) -> Target | None:
    """The target whose runner loads files ending in ``suffix`` (``.onnx`` -> onnx)."""
    return next((t for t in REGISTRY.values() if suffix.lower() in t.suffixes), None)
