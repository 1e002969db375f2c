"""Which input an exported artifact takes: the one answer for every command that runs one (``rdcd-validate eval``
and ``gate``, ``rdcd-bench``, ``rdcd-index``, ``rdcd-quantize``). **No torch.**

In order: ``--size`` when given (rdcd-bench, rdcd-index), the export manifest's row
(:meth:`rdcd.manifest.Manifest.spec`), the ``rdcd.*`` metadata rdcd-export writes into an ONNX file, the model's
static input shape, then a default size (``rdcd-validate eval --size``). Whatever answers is checked against a
static input shape, so a manifest or flag that contradicts the file is bad input, never a wrong run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from rdcd.errors import RdcdError
from rdcd.manifest import Artifact, Manifest
from rdcd.preprocess import PreprocessSpec
from rdcd.validate.bench_checks import check_fixed_size
from rdcd.validate.runtimes import static_input_size


@dataclasses.dataclass
class ArtifactInput:
    """An artifact's preprocessing, where its size came from, and the manifest row describing it (if any)."""

    spec: PreprocessSpec
    source: str  # "--size", "manifest.json", "ONNX metadata" or "model input shape"
    manifest: Manifest | None = None
    row: Artifact | None = None


def pick_row(rows: list[Artifact], runtime: str | None) -> Artifact | None:
    """Of the manifest rows naming one file, the one run by ``runtime`` (an INT8 QDQ file is listed both as the
    onnxruntime artifact and as the TensorRT engine's input)."""
    same = [r for r in rows if r.runtime == runtime]
    return (same or rows or [None])[0]


def onnx_metadata(path: Path, runner=None) -> dict[str, str]:
    """The ONNX file's metadata: from the runner's onnxruntime session (devices have no ``onnx``), else the file."""
    session = getattr(runner, "session", None)
    if session is not None and hasattr(session, "get_modelmeta"):
        return dict(session.get_modelmeta().custom_metadata_map or {})
    if path.suffix != ".onnx":
        return {}
    try:
        import onnx
    except ImportError:
        return {}
    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - a damaged file: its runner reports it
        return {}


def metadata_spec(meta: dict[str, str]) -> PreprocessSpec | None:
    """The preprocessing recorded in a model's metadata: rdcd-export's ``rdcd.preprocess``, else a size alone
    (``rdcd.input_size``, or a third-party file's ``input_size``); None when none of them reads."""
    try:
        return PreprocessSpec.from_dict(json.loads(meta["rdcd.preprocess"]))
    except (KeyError, ValueError, TypeError, RdcdError):  # absent or unreadable: a size alone may still say
        pass
    for key in ("rdcd.input_size", "input_size"):
        try:
            return PreprocessSpec(size=int(meta[key]))
        except (KeyError, ValueError, TypeError):
            continue
    return None


def artifact_input(path: str | os.PathLike, runner=None, size: int | None = None, manifest: Manifest | None = None,
                   row: Artifact | None = None, default_size: int | None = None) -> ArtifactInput:
    """What ``path`` takes (see the module docstring). ``runner``: the loaded model, for its static shape and
    metadata; ``manifest``/``row``: the row already at hand (else the manifest beside ``path`` is read);
    ``size``: a size asked for (wins); ``default_size``: one for an artifact that records none (``rdcd-validate
    eval --size``, which also sizes the teacher and the untrained students of the same run)."""
    path = Path(path)
    if manifest is None:
        manifest, rows = Manifest.beside(path)
        row = pick_row(rows, getattr(runner, "name", None))
    fixed = static_input_size(runner) if runner is not None else None
    recorded, where = (manifest.spec(row) if manifest is not None else None), "manifest.json"
    if recorded is None:
        recorded, where = metadata_spec(onnx_metadata(path, runner)), "ONNX metadata"
    if size:
        check_fixed_size(path, int(size), fixed)
        spec = dataclasses.replace(recorded, size=int(size)) if recorded else PreprocessSpec(size=int(size))
        return ArtifactInput(spec, "--size", manifest, row)
    if recorded is not None:
        check_fixed_size(path, recorded.size, fixed, where)
        return ArtifactInput(recorded, where, manifest, row)
    if fixed:
        return ArtifactInput(PreprocessSpec(size=fixed), "model input shape", manifest, row)
    if default_size:
        return ArtifactInput(PreprocessSpec(size=int(default_size)), "--size", manifest, row)
    raise RdcdError(f"cannot tell the input size of {path.name}: no manifest.json beside it, no size in its "
                    "metadata or input shape; pass --size")
