"""What ``rdcd-index`` reads: the model (artifact, runner, preprocessing, sha256), image folders (ids,
batched descriptors with progress, unreadable files skipped) and the gate's operating point. **No torch.**"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd.errors import RdcdError

log = logging.getLogger("rdcd.index")


# ------------------------------------------------------------------------------------------- models
def resolve_artifact(spec: str, name: str | None = None) -> Path:
    """The artifact file a ``--model`` names: the file itself, or a row of an export folder's manifest."""
    path = Path(spec)
    if not path.exists():
        raise RdcdError(f"model not found: {spec}")
    if not path.is_dir() or path.suffix == ".mlpackage":
        if name:
            raise RdcdError("--artifact selects a row of an export folder's manifest; --model is a file")
        return path
    from rdcd.manifest import MANIFEST, Manifest

    if not (path / MANIFEST).is_file():
        raise RdcdError(f"{path} is a folder without {MANIFEST}: pass an exported artifact or an export folder")
    manifest = Manifest.load(path)
    if name:
        pick = manifest.get(name)
        if pick is None or pick.status != "ok" or not manifest.resolve(pick).exists():
            why = "not in" if pick is None else "not usable (status or file) in"
            usable = [a.name for a in manifest if a.status == "ok" and manifest.resolve(a).exists()]
            raise RdcdError(f"artifact {name!r} is {why} {manifest.path}; usable: {', '.join(usable) or 'none'}")
    else:
        pick = manifest.default_artifact()
        if pick is None:
            raise RdcdError(f"no usable artifact in {manifest.path}")
    return manifest.resolve(pick)


def load_model(args) -> tuple[object, object, dict]:
    """(runner, PreprocessSpec, model record with sha256) for ``--model``."""
    from rdcd.fsutil import artifact_sha256
    from rdcd.validate.artifact_input import artifact_input
    from rdcd.validate.runtimes import load_runner

    path = resolve_artifact(args.model, getattr(args, "artifact", None))
    runner = load_runner(path, runtime=args.runtime, threads=args.threads)
    given = artifact_input(path, runner, args.size)
    manifest, entry, spec = given.manifest, given.row, given.spec
    record = {"path": str(path.resolve()), "name": path.name, "sha256": artifact_sha256(path),
              "artifact": entry.name if entry else None, "precision": entry.precision if entry else None,
              "runtime": getattr(runner, "name", args.runtime),
              "source_sha256": manifest.source.sha256 if manifest is not None else None}
    return runner, spec, record


def check_model(meta: dict, record: dict, spec) -> None:
    want = meta["model"]
    if record["sha256"] != want.get("sha256"):
        raise RdcdError(f"model {record['name']} (sha256 {record['sha256'][:12]}…) is not the model this index was "
                        f"built with ({want.get('name')}, sha256 {str(want.get('sha256'))[:12]}…): descriptors of "
                        f"different models are not comparable; use that model or build a new index")
    if int(meta["preprocess"].get("size", spec.size)) != spec.size:
        raise RdcdError(f"input size {spec.size} differs from the index's {meta['preprocess']['size']}: pass --size "
                        f"{meta['preprocess']['size']}")


# ------------------------------------------------------------------------------------------- images
def list_folder(folder: str, mode: str) -> tuple[list[Path], list[str]]:
    from rdcd.imageio import list_images

    root = Path(folder)
    paths = list_images(root, recursive=mode == "relpath")
    if not paths:
        nested = mode == "stem" and any(list_images(root, recursive=True))
        raise RdcdError(f"no images in {root}" + (" (only in subfolders: pass --ids relpath)" if nested else ""))
    ids = [p.stem if mode == "stem" else p.relative_to(root).with_suffix("").as_posix() for p in paths]
    first: dict[str, Path] = {}
    for p, i in zip(paths, ids):
        if i in first:
            raise RdcdError(f"two images have the id {i!r}: {first[i].name} and {p.name}")
        first[i] = p
    return paths, ids


def describe_folder(runner, spec, paths: Sequence[Path], ids: Sequence[str], batch_size: int, log_every: int,
                    what: str) -> tuple[list[str], np.ndarray, int]:
    """Descriptors of the readable images (unreadable ones: one warning each, counted), with progress."""
    from rdcd.validate.extract import extract

    feats, kept = extract(runner, paths, spec, batch_size, what, skip_bad=True, workers=2, log_every=log_every,
                          logger=log)
    return [ids[i] for i in kept], feats, len(paths) - len(kept)


# ---------------------------------------------------------------------------------------- threshold
def _report_path(p: Path) -> Path:
    return p / "report.json" if p.is_dir() else p


def _from_report(path: Path, sha: str) -> dict | None:
    from rdcd.validate.report import load_report

    _, rep = load_report(path)  # one line naming the file when it is not a readable gate report
    rows = [r for r in rep["artifacts"] if r.get("sha256") == sha]
    row = next((r for r in rows if isinstance(r.get("threshold_at_p90"), (int, float))), None)
    if row is None:
        return None
    settings = rep.get("settings") or {}
    if settings.get("whiten") or settings.get("score_norm"):
        raise RdcdError(f"{path}: the gate measured threshold_at_p90 on whitened / score-normalised scores, which "
                        f"this index does not compute: pass --threshold FLOAT")
    return {"threshold_at_p90": float(row["threshold_at_p90"]), "from": str(path), "artifact": row.get("name")}


def find_operating_point(model: dict, report: str | None = None) -> dict | None:
    """``threshold_at_p90`` the gate measured for this model: ``--report``, else a gate report beside the model."""
    if report:
        path = _report_path(Path(report))
        if not path.is_file():
            raise RdcdError(f"gate report not found: {path}")
        op = _from_report(path, model["sha256"])
        if op is None:
            raise RdcdError(f"{path} has no threshold_at_p90 for {model['name']} (sha256 {model['sha256'][:12]}…)")
        return op
    folder = Path(model["path"]).parent
    for cand in (folder / "report.json", folder / "report" / "report.json", folder.parent / "report.json"):
        if cand.is_file():
            try:
                op = _from_report(cand, model["sha256"])
            except RdcdError as exc:
                log.warning("ignoring %s for --threshold auto: %s", cand, exc)
                continue
            if op:
                return op
    return None


def resolve_threshold(value: str | None, meta: dict, model: dict, report: str | None) -> float | None:
    if value is None:
        return None
    if value != "auto":
        try:
            return float(value)
        except ValueError:
            raise RdcdError(f"--threshold must be auto or a number, not {value!r}") from None
    if meta["codes"] == "binary":
        raise RdcdError("--threshold auto is a float inner-product score; binary codes score 1 - 2*hamming/dim: "
                        "pass --threshold FLOAT")
    op = find_operating_point(model, report) if report else (meta.get("operating_point") or find_operating_point(model))
    if not op:
        raise RdcdError(f"--threshold auto: no measured operating point (threshold_at_p90) for {model['name']} in "
                        f"the index or a report.json beside the model: pass --report REPORT "
                        f"(rdcd-validate gate --report) or --threshold FLOAT")
    return float(op["threshold_at_p90"])
