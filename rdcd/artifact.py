"""The typed rows of ``manifest.json``: :class:`Artifact` with its :class:`Input`, :class:`Output`,
:class:`ProducedBy` and :class:`Accuracy`, and the export directory's layout (:data:`LAYOUT`). No torch here.

Every stage builds rows as these dataclasses and reads them back through :class:`rdcd.manifest.Manifest`;
``to_dict``/``from_dict`` are the only places where a row meets JSON. Keys this version does not know (a
newer rdcd, a hand edit) are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8", "w8a8", "w8")
STATUSES = ("ok", "not_checkable", "failed")
#: how the commands show a status
STATUS_ICON = {"ok": "✅", "not_checkable": "❎", "failed": "❌"}
#: the precisions of quantized artifacts (what the INT8 gate judges)
QUANTIZED = ("int8", "w8a8", "w8")

#: where each artifact lives in an export directory: ONNX at the top (``model.onnx`` is the contract every
#: runtime starts from), every other target in its own folder as ``model-<precision>.<ext>``
LAYOUT = {
    ("onnx", "fp32"): "model.onnx",
    ("onnx", "int8"): "model.int8.onnx",
    ("coreml", "fp32"): "coreml/model-fp32.mlpackage",
    ("coreml", "fp16"): "coreml/model-fp16.mlpackage",
    ("coreml", "w8a8"): "coreml/model-w8a8.mlpackage",
    ("coreml", "w8"): "coreml/model-w8.mlpackage",
    ("openvino", "fp32"): "openvino/model-fp32.xml",
    ("openvino", "fp16"): "openvino/model-fp16.xml",
    ("openvino", "int8"): "openvino/model-int8.xml",
    ("tensorrt", "fp16"): "tensorrt/model-fp16.engine",
    ("tensorrt", "int8"): "tensorrt/model-int8.engine",
}
#: every target, in export order (LAYOUT's): ONNX first, the other targets are converted from it or checked
#: against it; :data:`rdcd.targets.REGISTRY` follows this order
TARGETS = tuple(dict.fromkeys(target for target, _ in LAYOUT))
#: the W8A8 simulation (PyTorch + coremltools.optimize.torch) saved beside its package
COREML_SIMULATION = "coreml/model-w8a8.simulation"


def layout_path(target: str, precision: str) -> str:
    """The path (relative to the export directory) of ``target`` at ``precision``."""
    try:
        return LAYOUT[(target, precision)]
    except KeyError:
        raise ValueError(f"no {precision} artifact is defined for {target}") from None


def artifact_name(target: str, precision: str) -> str:
    return f"{target}-{precision}"


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` has the type a field is annotated with (``int`` is not ``bool``; a float field
    takes an int; a nested row takes an object)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, _Row):
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        args = typing.get_args(hint)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "dict"
    return "object" if isinstance(hint, type) and issubclass(hint, _Row) else getattr(hint, "__name__", str(hint))


class _Row:
    """``from_dict``/``to_dict`` for the dataclasses below: known keys become fields (nested rows through
    ``_NESTED``), checked against the field's annotation; unknown keys go to ``extra``; ``None`` fields and an
    empty ``extra`` are not written."""

    _NESTED: dict[str, type] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = ""):
        """The row of ``data``; a field of the wrong type is a :class:`ValueError` naming it (``where``: its parent)."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key, value in kwargs.items():
            if not _matches(value, hints[key]):
                found = json.dumps(value, default=str)[:40]
                raise ValueError(f"{where}{key} must be {_type_name(hints[key])}, found {found}")
        for key, typ in cls._NESTED.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = typ.from_dict(kwargs[key], f"{where}{key}.")
        try:
            return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})
        except TypeError as exc:  # a required field missing
            raise ValueError(f"{where}{str(exc).split('() ')[-1]}") from None
        except ValueError as exc:  # __post_init__'s checks
            raise ValueError(f"{where}{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or v is None:
                continue
            out[f.name] = v.to_dict() if isinstance(v, _Row) else v
        out.update(self.extra)
        return out


@dataclass
class Input(_Row):
    """What an artifact takes: ``name`` uint8 RGB ``layout`` images of ``size`` [H, W]; ``shape`` with its batch
    (``"batch"`` dynamic, ``1`` fixed, ``"1..8"`` a TensorRT profile)."""

    name: str = "image"
    layout: str = "NHWC"
    dtype: str = "uint8"
    size: list[int] | int | None = None  # [H, W] (older manifests: one number)
    shape: list | None = None
    kind: str | None = None  # Core ML: "image" (an image input, not a tensor)
    color: str | None = None
    note: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def square(cls, size: int, batch: int | str = "batch", **kw) -> "Input":
        return cls(size=[size, size], shape=[batch, size, size, 3], **kw)

    @classmethod
    def of(cls, target: str, size: int, batch: int | str = "batch") -> "Input":
        """What ``target``'s artifacts take: a uint8 NHWC tensor, except Core ML's one RGB image (``ct.ImageType``)."""
        if target == "coreml":
            return cls.square(size, 1, kind="image", color="RGB", note="Core ML image input; batch 1")
        return cls.square(size, batch)

    @property
    def side(self) -> int | None:
        """The square side in pixels (``size`` may be written ``[s, s]`` or ``s``)."""
        s = self.size
        return int(s[0]) if isinstance(s, list) and s else (int(s) if isinstance(s, int) else None)



@dataclass
class Output(_Row):
    """What it returns: ``name`` float32 [batch, ``dim``], L2-normalised."""

    name: str = "descriptor"
    dim: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ProducedBy(_Row):
    """How it was made: the tool, the package versions, its options and the command that ran it."""

    tool: str = ""
    versions: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    command: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Accuracy(_Row):
    """µAP of a quantized artifact on a benchmark against its FP32 reference (``drop`` = fp32 − int8, µAP points)."""

    fp32_micro_ap: float
    micro_ap: float
    drop: float
    benchmark: str | None = None
    ground_truth_sha256: str | None = None
    runtime: str | None = None
    simulated: bool = False
    max_drop: float | None = None  # the budget it was judged against (µAP points)
    drop_ci95: list[float] | None = None  # paired bootstrap over queries
    threads: int | None = None
    fp32_runtime: str | None = None  # where the reference µAP was measured, when not the artifact's runtime
    simulated_micro_ap: float | None = None
    prediction_micro_ap: float | None = None  # TensorRT: the QDQ model's µAP in ONNX Runtime
    note: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.drop_ci95 is not None and len(self.drop_ci95) != 2:
            raise ValueError(f"drop_ci95 must be [low, high], found {self.drop_ci95}")

    def over(self, default: float | None = None) -> bool:
        """Whether the drop exceeds the budget it was judged against (``default`` where the row records none)."""
        budget = default if self.max_drop is None else self.max_drop
        return budget is not None and self.drop > budget


@dataclass
class Artifact(_Row):
    """One row of ``manifest.json``: one model file (or package) for one runtime."""

    name: str
    target: str
    precision: str
    path: str  # relative to the export directory (absolute for reference_only rows)
    runtime: str
    input: Input
    output: Output
    produced_by: ProducedBy = field(default_factory=ProducedBy)
    status: str = "ok"
    reason: str | None = None  # why not checkable / why failed
    reference: str | None = None  # the FP32 counterpart accuracy deltas are taken against
    parity: dict | None = None  # cosine vs the PyTorch model on real photos
    accuracy: Accuracy | None = None
    checks: dict | None = None  # what was verified besides parity
    calibration: dict | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    content_sha256: str | None = None  # several files (OpenVINO .xml + .bin): over their sha256s
    seconds: float | None = None  # export + checks, wall time
    reference_only: bool | None = None  # recorded at an absolute path, never copied
    deployment_target: str | None = None  # Core ML minimum deployment target
    weights_file: str | None = None  # OpenVINO .bin
    build: dict | None = None  # TensorRT engine build settings, where one was built
    qdq: dict | None = None  # the Q/DQ structure of a quantized ONNX model
    qdq_source: str | None = None  # TensorRT INT8: the QDQ model the engine is (to be) built from
    qdq_sha256: str | None = None
    engine_built: bool | None = None
    engine_path: str | None = None  # manifests before engines were built: path = QDQ model, this = engine
    command: str | None = None  # TensorRT INT8: its trtexec line
    tensorrt_reference: str | None = None
    fallback_layers: list[str] | None = None  # layers kept in float by the fallback loop
    fake_quantize_ops: int | None = None  # OpenVINO INT8
    mlpackage: dict | None = None  # Core ML W8A8/W8 package details
    simulation: dict | None = None  # Core ML W8A8: where its PyTorch simulation is saved
    extra: dict = field(default_factory=dict)

    _NESTED = {"input": Input, "output": Output, "produced_by": ProducedBy, "accuracy": Accuracy}

    def __post_init__(self):
        for key, allowed in (("target", TARGETS), ("precision", PRECISIONS), ("status", STATUSES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED

    def mark(self, status: str, reason: str | None = None) -> "Artifact":
        """Set the status (and its reason); returns the row."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}")
        self.status, self.reason = status, reason
        return self

    def clear_files(self) -> None:
        """Forget the recorded hashes and sizes (the manifest fills them from the files when the row is upserted)."""
        self.sha256 = self.size_bytes = self.content_sha256 = None
