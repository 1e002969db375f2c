"""``manifest.json``: the description of every artifact in an export directory, read and written only through
:class:`Manifest` (typed rows: :class:`rdcd.artifact.Artifact`). No torch here.

Schema (version 1)::

    {
      "schema": 1,
      "rdcd_version": "0.1.0",
      "created": "2026-11-23T12:00:00Z",
      "source": {"kind": "student" | "teacher", "checkpoint": "runs/x", "sha256": "...", "model": {...}, "label": "..."},
      "preprocess": {"size": 224, "mean": [...], "std": [...], "resize": "stretch-bilinear", ...},
      "tensorrt": {"batch": 8},                     # optional: engine profile batch 1..8 (optimised for 8), recorded
                                                    # by rdcd-export --target tensorrt, reused by rdcd-quantize
      "artifacts": [
        {
          "name": "onnx-fp32",                      # unique within the manifest
          "target": "onnx" | "tensorrt" | "coreml" | "openvino",
          "precision": "fp32" | "fp16" | "int8" | "w8a8" | "w8",
          "path": "model.onnx",                     # relative to the export directory
          "runtime": "onnxruntime",                 # what runs it
          "input":  {"name": "image", "layout": "NHWC", "dtype": "uint8", "size": [224, 224], "shape": ["batch", 224, 224, 3]},
          "output": {"name": "descriptor", "dim": 128},
          "produced_by": {"tool": "...", "versions": {...}, "options": {...}, "command": "..."},
          "reference": "onnx-fp32",                 # FP32 counterpart for accuracy deltas (quantized artifacts)
          "status": "ok" | "not_checkable" | "failed",
          "reason": "...",                          # why not checkable / why failed
          "parity": {"reference": "pytorch-fp32", "min_cos": 0.9999, "mean_cos": 0.99999, "images": 16},
          "sha256": "...", "size_bytes": 123,
          # optional, written by rdcd-export:
          "checks": {...},                          # what was verified besides parity (I/O contract, Core ML
                                                    # spec + MIL program + converted torch program, FP16 engine input)
          "reference_only": true,                   # recorded by reference at an absolute path, never copied
          "deployment_target": "iOS16",             # Core ML minimum deployment target
          "build": {...},                           # TensorRT engine build settings, where one was built
          "content_sha256": "...",                  # OpenVINO: over the .xml and .bin sha256s (size_bytes counts both)
          # TensorRT INT8 (rdcd-quantize's tensorrt-int8): "path" is the engine, tensorrt/model-int8.engine
          "qdq_source": "tensorrt/model-int8.onnx",  # the QDQ model the engine is (to be) built from
          "qdq_sha256": "...", "engine_built": false,  # built by rdcd-quantize here, or not (file absent)
          "command": "trtexec ...",                 # its trtexec line (TensorRT <= 10; produced_by.options has the 11 one)
        }
      ],
      "notes": {"parity": "...", "parity_images": ["astronaut.png", ...]}   # optional
    }

Paths follow :data:`rdcd.artifact.LAYOUT` (ONNX at the top, every other target in its folder as
``model-<precision>.<ext>``); manifests written before INT8 artifacts moved there (``openvino-int8/model.xml``,
``model.w8a8.mlpackage``) load unchanged, their rows carrying their own paths.

``status`` "not_checkable" also covers artifacts that could not be *built* here (a TensorRT engine
without a GPU: ``path`` names the engine ``tensorrt/build_engine.sh`` writes, the file is absent,
``reason`` says why; the gate runs the engine once it exists). A row never says "ok" for a file that
does not exist. Manifests written before rdcd-quantize built engines have ``tensorrt-int8`` with
``path`` = the QDQ model and ``engine_path`` = the engine: the gate reads that ``path`` as the QDQ source.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rdcd import __version__
from rdcd.artifact import (COREML_SIMULATION, LAYOUT, PRECISIONS, QUANTIZED, STATUSES, TARGETS, Accuracy, Artifact, Input,
                           Output, ProducedBy, _Row, artifact_name, layout_path)
from rdcd.errors import RdcdError
from rdcd.fsutil import read_json, write_json

__all__ = ["MANIFEST", "TARGETS", "PRECISIONS", "QUANTIZED", "STATUSES", "LAYOUT", "COREML_SIMULATION", "MAX_DROP", "DROP_TYPES",
           "Accuracy", "Artifact", "Input", "Output", "ProducedBy", "Source", "Manifest", "artifact_name",
           "layout_path", "now", "package_versions", "validate"]

MANIFEST = "manifest.json"
SCHEMA = 1
#: The µAP an INT8 artifact may lose against its FP32 reference by default: one budget for rdcd-quantize's
#: float fallback, the gate and the demo.
MAX_DROP = 0.005
#: how a budget is read: µAP points (absolute) or a share of the FP32 µAP (relative, NNCF's DropType.RELATIVE)
DROP_TYPES = ("absolute", "relative")
REQUIRED = ("name", "target", "precision", "path", "input", "output", "produced_by", "status")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def package_versions(*names: str) -> dict[str, str]:
    """The installed versions of ``names`` (those installed), for an artifact's ``produced_by.versions``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class Source(_Row):
    """The model an export directory was made from."""

    kind: str = "student"  # "student" | "teacher"
    label: str | None = None
    checkpoint: str | None = None  # the training run (students)
    sha256: str | None = None  # of its weights
    path: str | None = None
    backbone: str | None = None
    dim: int | None = None
    model: dict | None = None  # the student config (+ "whitening" when rdcd-export --whiten-on folded one in)
    extra: dict = field(default_factory=dict)

    @property
    def whitening(self) -> dict | None:
        w = (self.model or {}).get("whitening")
        return w if isinstance(w, dict) else None


def validate(data: Any, where: str | os.PathLike = MANIFEST) -> None:
    """The one check of a manifest's structure (every stage loads through :meth:`Manifest.load`).

    Raises :class:`RdcdError` naming the file and the first problem: not an object, ``artifacts``
    not a list, an entry that is not an object, a missing or mistyped field, an unknown target,
    precision or status, a duplicate name, a ``reference`` to no artifact, an ``accuracy`` without numbers.
    """
    def bad(msg: str):
        raise RdcdError(f"malformed {where}: {msg}")

    if not isinstance(data, dict):
        bad(f"expected a JSON object, found {type(data).__name__}")
    arts = data.get("artifacts")
    if not isinstance(arts, list):
        bad("no 'artifacts' list")
    for key in ("source", "preprocess", "tensorrt", "notes"):
        if key in data and not isinstance(data[key], dict):
            bad(f"'{key}' must be an object")
    pre = data.get("preprocess") or {}
    if "size" in pre and not (_positive_int(pre["size"]) and pre["size"] >= 16):
        bad(f"preprocess size must be an integer >= 16, found {json.dumps(pre['size'])}")
    for key in ("mean", "std"):
        v = pre.get(key, [0, 0, 0])
        if not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)):
            bad(f"preprocess {key} must be 3 numbers, found {json.dumps(v)[:40]}")
    if pre.get("resize", "stretch-bilinear") != "stretch-bilinear":
        bad(f"preprocess resize {json.dumps(pre['resize'])[:40]} is not rdcd's 'stretch-bilinear'")
    batch = (data.get("tensorrt") or {}).get("batch", 1)
    if not _positive_int(batch):
        bad(f"tensorrt batch must be a positive integer, found {json.dumps(batch)}")
    names: set[str] = set()
    for i, art in enumerate(arts):
        if not isinstance(art, dict):
            bad(f"artifact {i} is {json.dumps(art)[:40]}, not an object")
        missing = [k for k in REQUIRED if k not in art]
        if missing:
            bad(f"artifact {i} lacks {', '.join(missing)}")
        name = art["name"]
        if not isinstance(name, str) or not name:
            bad(f"artifact {i} has no name")
        if name in names:
            bad(f"artifact name {name!r} appears twice")
        names.add(name)
        for key, allowed in (("target", TARGETS), ("precision", PRECISIONS), ("status", STATUSES)):
            if art[key] not in allowed:
                bad(f"artifact {name!r} has {key} {art[key]!r} (expected one of {', '.join(allowed)})")
        if not isinstance(art["path"], str) or not art["path"].strip():
            bad(f"artifact {name!r}: 'path' must be a non-empty string, found {json.dumps(art['path'])}")
        for key in ("input", "output", "produced_by"):
            if not isinstance(art[key], dict):
                bad(f"artifact {name!r}: {key} must be an object")
        size = art["input"].get("size")
        if size is not None and not (_positive_int(size) or (isinstance(size, list) and len(size) == 2
                                                             and all(_positive_int(v) for v in size))):
            bad(f"artifact {name!r}: input size must be [H, W] of positive integers, found {json.dumps(size)}")
        dim = art["output"].get("dim")
        if dim is not None and not _positive_int(dim):
            bad(f"artifact {name!r}: output dim must be a positive integer, found {json.dumps(dim)}")
        acc = art.get("accuracy")
        if acc is not None and not (isinstance(acc, dict) and all(_number(acc.get(k))
                                                                 for k in ("fp32_micro_ap", "micro_ap", "drop"))):
            bad(f"artifact {name!r}: accuracy must be an object with numbers fp32_micro_ap, micro_ap and drop")
    for art in arts:
        ref = art.get("reference")
        if ref is not None and ref not in names:
            bad(f"artifact {art['name']!r} names reference {ref!r}, which is not in the manifest")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _foreign(path: Path) -> bool:
    """A ``manifest.json`` that is JSON but not an export manifest (a web app's, a dataset's)."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):  # damaged: ours to report (Manifest.load)
        return False
    return not (isinstance(data, dict) and "artifacts" in data)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Manifest:
    """An export directory's ``manifest.json``: its :class:`Source`, preprocessing and typed :class:`Artifact` rows."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.schema, self.rdcd_version, self.created = SCHEMA, __version__, now()
        self.updated: str | None = None
        self.source = Source()
        self.preprocess: dict[str, Any] = {}
        self.tensorrt: dict[str, Any] | None = None  # {"batch": B}: the engines' profile 1..B
        self.notes: dict[str, Any] = {}
        self.artifacts: list[Artifact] = []
        self.extra: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, directory: str | os.PathLike, data: dict[str, Any], where: object = MANIFEST) -> "Manifest":
        validate(data, where)
        m = cls(directory)
        known = {"schema", "rdcd_version", "created", "updated", "source", "preprocess", "tensorrt", "notes",
                 "artifacts"}
        try:
            m.schema = data.get("schema", SCHEMA)
            m.rdcd_version = data.get("rdcd_version", "?")
            m.created, m.updated = data.get("created", ""), data.get("updated")
            m.source = Source.from_dict(data.get("source") or {}, "source.")
            m.preprocess = dict(data.get("preprocess") or {})
            m.tensorrt = data.get("tensorrt")
            m.notes = dict(data.get("notes") or {})
            from rdcd.targets import REGISTRY  # a row without its runtime (older manifests): its target's

            m.artifacts = [Artifact.from_dict({"runtime": REGISTRY[a["target"]].runtime, **a}, f"artifact {a['name']!r}: ")
                           for a in data["artifacts"]]
        except (TypeError, ValueError) as exc:  # a field of the wrong shape the structural check does not cover
            raise RdcdError(f"malformed {where}: {str(exc).splitlines()[0]}") from None
        m.extra = {k: v for k, v in data.items() if k not in known}
        return m

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise RdcdError(f"export directory not found: {directory}")
        if not path.exists():
            raise RdcdError(f"no {MANIFEST} in {directory}: run rdcd-export first")
        return cls.from_dict(directory, read_json(path), path)

    @classmethod
    def load_or_new(cls, directory: str | os.PathLike) -> "Manifest":
        return cls.load(directory) if (Path(directory) / MANIFEST).exists() else cls(directory)

    @classmethod
    def beside(cls, model: str | os.PathLike) -> tuple["Manifest | None", list[Artifact]]:
        """The export manifest describing the file ``model`` and its rows naming it: the manifest in its folder
        (rows by path, else by file name), else the one a folder up when a row names it by path (``coreml/…``);
        ``(None, [])`` when there is none. A ``manifest.json`` of something else (no ``artifacts``) is not one."""
        model = Path(model)
        resolved = model.resolve()
        for folder in (model.parent, model.parent.parent):
            if not (folder / MANIFEST).is_file() or _foreign(folder / MANIFEST):
                continue
            m = cls.load(folder)
            rows = [a for a in m.artifacts if m.resolve(a).resolve() == resolved]
            if folder == model.parent:
                return m, rows or [a for a in m.artifacts if Path(a.path).name == model.name]
            if rows:
                return m, rows
        return None, []

    # ------------------------------------------------------------------ queries
    def __iter__(self) -> Iterator[Artifact]:
        return iter(self.artifacts)

    def get(self, name: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.name == name), None)

    def resolve(self, art: Artifact) -> Path:
        return self.dir / art.path

    def usable(self, art: Artifact) -> bool:
        """Not failed, and its file is here."""
        return art.status != "failed" and self.resolve(art).exists()

    def find(self, target: str, precisions: tuple[str, ...] = ("fp32",)) -> Artifact | None:
        """The first usable ``target`` artifact, trying ``precisions`` in order (an FP32 reference: ``("fp32",)``)."""
        for prec in precisions:
            for art in self.artifacts:
                if art.target == target and art.precision == prec and self.usable(art):
                    return art
        return None

    def default_artifact(self) -> Artifact | None:
        """What a search runs when no row is named: ``onnx-fp32``, else any FP32 onnxruntime row, else the first
        row with status ok and its file."""
        ok = [a for a in self.artifacts if a.status == "ok" and self.resolve(a).exists()]
        return (next((a for a in ok if a.name == "onnx-fp32"), None)
                or next((a for a in ok if a.precision == "fp32" and a.runtime == "onnxruntime"), None)
                or (ok or [None])[0])

    def input_size(self, art: Artifact | None = None) -> int | None:
        """The one answer to "which input size does this artifact take": its ``input.size``, else the manifest's
        ``preprocess.size``; None when neither says."""
        size = art.input.side if art is not None else None
        if not size and "size" in self.preprocess:
            try:
                size = int(self.preprocess["size"])
            except (TypeError, ValueError):
                raise RdcdError(f"malformed {self.path}: preprocess size {self.preprocess['size']!r}") from None
        return size or None

    def spec(self, art: Artifact | None = None):
        """The :class:`~rdcd.preprocess.PreprocessSpec` of ``art`` (the manifest's preprocessing at the
        artifact's input size); None when the manifest records neither."""
        from rdcd.preprocess import PreprocessSpec

        size = self.input_size(art)
        if size is None:
            return None
        try:
            if {"mean", "std"} <= set(self.preprocess):
                return PreprocessSpec.from_dict({**self.preprocess, "size": size})
            return PreprocessSpec(size=size, resize=self.preprocess.get("resize", "stretch-bilinear"))
        except (TypeError, ValueError) as exc:
            where = f" for {art.name}" if art is not None else ""
            raise RdcdError(f"malformed {self.path}: bad preprocessing{where} ({exc})") from None

    @property
    def trt_batch(self) -> int | None:
        b = (self.tensorrt or {}).get("batch")
        return b if _positive_int(b) else None

    # ------------------------------------------------------------------ writing
    def upsert(self, art: Artifact) -> Artifact:
        """Add an artifact, replacing one of the same name; fills sha256 (of ``path``), size_bytes (of all its
        files) and, for several files (OpenVINO ``.xml`` + ``.bin``), content_sha256 when they exist."""
        if not isinstance(art, Artifact):
            raise TypeError(f"Manifest.upsert takes an Artifact, not {type(art).__name__}")
        from rdcd.fsutil import artifact_files, artifact_sha256, sha256, size_bytes

        p = self.resolve(art)
        if p.exists():
            files = artifact_files(p)
            art.sha256 = art.sha256 or sha256(p)
            art.size_bytes = art.size_bytes or sum(size_bytes(f) for f in files)
            if len(files) > 1:  # the weights are covered by content_sha256
                art.content_sha256 = art.content_sha256 or artifact_sha256(p)
        self.artifacts = [a for a in self.artifacts if a.name != art.name] + [art]
        return art

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": self.schema, "rdcd_version": self.rdcd_version, "created": self.created,
               "source": self.source.to_dict(), "preprocess": self.preprocess}
        if self.tensorrt is not None:
            out["tensorrt"] = self.tensorrt
        out["artifacts"] = [a.to_dict() for a in self.artifacts]
        if self.notes:
            out["notes"] = self.notes
        if self.updated:
            out["updated"] = self.updated
        return {**out, **self.extra}

    def save(self) -> Path:
        self.updated = now()
        data = self.to_dict()
        validate(data, self.path)  # never write what load would refuse
        return write_json(self.path, data)


def replace(art: Artifact, **changes) -> Artifact:
    """A copy of ``art`` with ``changes`` (its nested rows copied, not shared)."""
    return Artifact.from_dict({**art.to_dict(), **{k: v.to_dict() if isinstance(v, _Row) else v
                                                    for k, v in changes.items()}})
