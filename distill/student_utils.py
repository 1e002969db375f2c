"""The student during training: the forward DDP wraps, train / frozen-BN modes, freezing the lower backbone
stages, the learning-rate schedule and a fingerprint of weights (for the backbone-feature cache)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from torch import nn

from rdcd.errors import RdcdError


class Features(nn.Module):
    """DDP hooks ``forward``: expose ``Student.features`` (feature, descriptor) as the forward."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x):
        return self.student.features(x)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from peak/warmup to peak over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def train_mode(model: nn.Module, bn: str = "train", frozen: set[int] | None = None) -> None:
    """Train mode; with ``bn="frozen"`` the BatchNorm layers stay in eval mode (ImageNet running statistics
    used and kept: a short fine-tune otherwise overwrites them with the augmented views' statistics within
    ~30 steps, most of its µAP loss). Modules in ``frozen`` (ids; untrained backbone stages) stay in eval."""
    model.train()
    for m in model.modules():
        if (bn == "frozen" and isinstance(m, nn.modules.batchnorm._BatchNorm)) or (frozen and id(m) in frozen):
            m.eval()


def freeze_lower_stages(student: nn.Module, train_blocks: int | None) -> set[int]:
    """Freeze all but the last ``train_blocks`` stages of the backbone (and its head conv/BN); return the
    ids of the frozen modules (kept in eval mode)."""
    if train_blocks is None:
        return set()
    bb = student.backbone
    blocks = getattr(bb, "blocks", None)
    if blocks is None:
        raise RdcdError(f"--train-blocks: backbone {type(bb).__name__} has no .blocks to count from")
    if train_blocks > len(blocks):
        raise RdcdError(f"--train-blocks {train_blocks}: {type(bb).__name__} has only {len(blocks)} stages")
    keep = {id(m) for b in list(blocks)[len(blocks) - train_blocks:] for m in b.modules()} if train_blocks else set()
    for name in ("conv_head", "bn2"):
        if hasattr(bb, name):
            keep |= {id(m) for m in getattr(bb, name).modules()}
    frozen = set()
    for m in bb.modules():  # every module with its own parameters or buffers (timm's BatchNormAct2d has children)
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if id(m) not in keep and own:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            frozen.add(id(m))
    return frozen


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def initial_student(cfg, ctx, feat_dim: int) -> tuple[nn.Module, dict[str, Any]]:
    """The student before training (seeded: the same random heads for the same seed) and what was checked
    about its init: a ``--backbone-weights`` file, or the offline ImageNet weights (verified on real
    photos on rank 0; a broken init is refused), or a random init."""
    import torch

    from rdcd.model import BACKBONES, StudentConfig, build_student, verify_pretrained

    scfg = StudentConfig(backbone=cfg.backbone, dim=cfg.dim, feat_dim=feat_dim, input_size=cfg.input_size)
    torch.manual_seed(cfg.seed)
    student = build_student(scfg, pretrained=cfg.pretrained and not cfg.backbone_weights)
    checked: dict[str, Any] = {"requested": cfg.pretrained}
    if cfg.backbone_weights:
        from rdcd.distill.init import init_from_file

        checked.update(init_from_file(student, cfg.backbone, cfg.backbone_weights))
    elif cfg.pretrained:
        info = BACKBONES.get(cfg.backbone)
        if info is not None and info.offline_weights:
            check = verify_pretrained(cfg.backbone) if ctx.is_main else None
            check = ctx.broadcast_object(check)
            if not check["ok"]:
                raise RdcdError(f"pretrained {cfg.backbone} weights misclassify real photos ({check}): refusing to "
                                "train from a broken init (use --no-pretrained to start from scratch)")
            checked.update(check, source=info.offline_weights)
        else:
            checked.update(ok=False, source=None, note=f"no offline ImageNet weights for {cfg.backbone}: random init")
    return student, checked
