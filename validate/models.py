"""Resolve what a user names as a model into (embedder, preprocessing spec, label).

* ``teacher`` / ``sscd-onnx``: the offline SSCD teacher (288 x 288); a ``.pt`` TorchScript path works too
* ``sscd-distilled``: the MobileNetV4 peer shipped beside the teacher (a baseline to beat, never an init)
* ``pdq``: the PDQ hash baseline
* a training run directory or ``.safetensors`` file: the PyTorch student (imports torch)
* ``student:BACKBONE[:DIM]``: an untrained student (offline ImageNet init where available)
* an exported artifact (``.onnx``, ``.xml``, ``.engine``, ``.mlpackage``): its runtime, with the input
  :func:`rdcd.validate.artifact_input.artifact_input` gives (the export manifest beside it, the ONNX metadata,
  the fixed input shape, else ``size``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rdcd.errors import RdcdError
from rdcd.preprocess import PreprocessSpec


def _student_spec(spec: str) -> tuple[str, int]:
    """``student:BACKBONE[:DIM]`` -> (backbone, dim); a bad spec is one clear error."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[1].strip():
        raise ValueError(f"{spec!r}: expected student:BACKBONE[:DIM], e.g. student:efficientnet_lite0:128")
    dim = 128
    if len(parts) == 3:
        try:
            dim = int(parts[2])
        except ValueError:
            raise ValueError(f"{spec!r}: the descriptor size {parts[2]!r} is not an integer") from None
        if dim < 1:
            raise ValueError(f"{spec!r}: the descriptor size must be a positive integer, not {dim}")
    return parts[1], dim


def model_spec(text: str) -> str:
    """argparse ``type=`` for ``--model``: the ``student:BACKBONE[:DIM]`` form is checked at parse time."""
    import argparse

    if text.startswith("student:"):
        try:
            _student_spec(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    elif not text.strip():
        raise argparse.ArgumentTypeError("an empty model name")
    return text


def resolve_model(spec: str, size: int | None = None, runtime: str = "auto", threads: int | None = None,
                  device: str = "cpu") -> tuple[Callable, PreprocessSpec, str]:
    if spec in ("teacher", "sscd-onnx") or spec.endswith((".pt", ".torchscript")):
        from rdcd.teacher import build_teacher

        t = build_teacher(spec, size=size, device=device, threads=threads)
        return t.embed_uint8, PreprocessSpec(size=t.size), f"SSCD teacher ({t.kind}, {t.dim}-d)"
    if spec == "sscd-distilled":  # the MobileNetV4 peer shipped with the teacher: a baseline to beat, nothing more
        from rdcd.teacher import OnnxTeacher, sscd_onnx_path

        t = OnnxTeacher(sscd_onnx_path().with_name("sscd_distilled.onnx"), size=size or 224, threads=threads)
        return t.embed_uint8, PreprocessSpec(size=t.size), f"sscd_distilled peer (MobileNetV4, {t.dim}-d)"
    if spec == "pdq":
        from rdcd.validate.baselines import PDQ_SPEC, PDQEmbedder

        return PDQEmbedder(), PDQ_SPEC, PDQEmbedder.name
    if spec.startswith("student:"):
        from rdcd.model import StudentConfig, TorchEmbedder, build_student

        try:
            backbone, dim = _student_spec(spec)
        except ValueError as exc:
            raise RdcdError(str(exc)) from None
        cfg = StudentConfig(backbone=backbone, dim=dim, input_size=size or 224)
        import torch

        torch.manual_seed(0)
        student = build_student(cfg, pretrained=True).eval()
        return TorchEmbedder(student, device), cfg.preprocess(), f"untrained {cfg.backbone} ({cfg.dim}-d)"
    path = Path(spec)
    if not path.exists():
        raise RdcdError(f"model not found: {spec}")
    if (path.is_dir() and path.suffix != ".mlpackage") or path.suffix == ".safetensors":
        from rdcd.model import TorchEmbedder, load_config, load_student

        student = load_student(path)
        cfg = load_config(path)
        return TorchEmbedder(student, device), student.config.preprocess(), f"pytorch {cfg['model']['backbone']}"
    from rdcd.validate.artifact_input import artifact_input
    from rdcd.validate.runtimes import load_runner

    runner = load_runner(path, runtime=runtime, threads=threads)
    return runner, artifact_input(path, runner, default_size=size).spec, f"{runner.name} {path.name}"
