"""``manifest.json``: the description of every artifact in an export directory. No torch here.

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
from pathlib import Path
from typing import Any

from rdcd import __version__
from rdcd.errors import RdcdError
from rdcd.fsutil import write_json

MANIFEST = "manifest.json"
#: in export order: ONNX first (the other targets are converted from it or checked against it)
TARGETS = ("onnx", "coreml", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "w8a8", "w8")
STATUSES = ("ok", "not_checkable", "failed")
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


def io_spec(size: int, dim: int, input_name: str = "image", output_name: str = "descriptor",
            batch: int | str = "batch") -> tuple[dict, dict]:
    return ({"name": input_name, "layout": "NHWC", "dtype": "uint8", "size": [size, size],
             "shape": [batch, size, size, 3]},
            {"name": output_name, "dim": dim})


def validate(data: Any, where: str | os.PathLike = MANIFEST) -> None:
    """The one check of a manifest's structure (every stage loads through :meth:`Manifest.load`).

    Raises :class:`RdcdError` naming the file and the first problem: not an object, ``artifacts``
    not a list, an entry that is not an object, a missing or mistyped field, an unknown target,
    precision or status, a duplicate name, a ``reference`` to no artifact.
    """
    def bad(msg: str):
        raise RdcdError(f"malformed {where}: {msg}")

    if not isinstance(data, dict):
        bad(f"expected a JSON object, found {type(data).__name__}")
    arts = data.get("artifacts")
    if not isinstance(arts, list):
        bad("no 'artifacts' list")
    for key in ("source", "preprocess"):
        if key in data and not isinstance(data[key], dict):
            bad(f"'{key}' must be an object")
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
        if not isinstance(art["input"], dict) or not isinstance(art["output"], dict):
            bad(f"artifact {name!r}: input/output must be objects")
        size = art["input"].get("size")
        if size is not None and not (_positive_int(size) or (isinstance(size, list) and len(size) == 2
                                                             and all(_positive_int(v) for v in size))):
            bad(f"artifact {name!r}: input size must be [H, W] of positive integers, found {json.dumps(size)}")
        dim = art["output"].get("dim")
        if dim is not None and not _positive_int(dim):
            bad(f"artifact {name!r}: output dim must be a positive integer, found {json.dumps(dim)}")
    for art in arts:
        ref = art.get("reference")
        if ref is not None and ref not in names:
            bad(f"artifact {art['name']!r} names reference {ref!r}, which is not in the manifest")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class Manifest:
    def __init__(self, directory: str | os.PathLike, data: dict[str, Any] | None = None):
        self.dir = Path(directory)
        self.data = data or {"schema": 1, "rdcd_version": __version__, "created": now(), "source": {},
                             "preprocess": {}, "artifacts": []}

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.data["artifacts"]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise RdcdError(f"export directory not found: {directory}")
        if not path.exists():
            raise RdcdError(f"no {MANIFEST} in {directory}: run rdcd-export first")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RdcdError(f"malformed {path}: {exc}") from None
        validate(data, path)
        return cls(directory, data)

    @classmethod
    def load_or_new(cls, directory: str | os.PathLike) -> "Manifest":
        return cls.load(directory) if (Path(directory) / MANIFEST).exists() else cls(directory)

    def get(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.artifacts if a["name"] == name), None)

    def resolve(self, art: dict[str, Any]) -> Path:
        return self.dir / art["path"]

    def upsert(self, art: dict[str, Any]) -> dict[str, Any]:
        """Add an artifact, replacing one of the same name; fills sha256 (of ``path``), size_bytes (of all its
        files) and, for several files (OpenVINO ``.xml`` + ``.bin``), content_sha256 when they exist."""
        missing = [k for k in REQUIRED if k not in art]
        if missing:
            raise ValueError(f"artifact {art.get('name')} lacks {missing}")
        if art["target"] not in TARGETS or art["precision"] not in PRECISIONS or art["status"] not in STATUSES:
            raise ValueError(f"bad target/precision/status in {art}")
        from rdcd.fsutil import artifact_files, artifact_sha256, sha256, size_bytes

        p = self.resolve(art)
        if p.exists():
            files = artifact_files(p)
            art.setdefault("sha256", sha256(p))
            art.setdefault("size_bytes", sum(size_bytes(f) for f in files))
            if len(files) > 1:  # the weights are covered by content_sha256
                art.setdefault("content_sha256", artifact_sha256(p))
        self.data["artifacts"] = [a for a in self.artifacts if a["name"] != art["name"]] + [art]
        return art

    def save(self) -> Path:
        self.data["updated"] = now()
        return write_json(self.path, self.data)
