"""Student initialisation from a user's timm ImageNet checkpoint (``--backbone-weights``), verified.

No model hub is reachable here, so only EfficientNet-Lite0 has built-in offline weights
(:func:`rdcd.model.load_pretrained_backbone`). For the other backbones a user may pass a timm
checkpoint file (safetensors, or a torch state dict loaded with ``weights_only=True``) holding the
full ImageNet classifier; it is checked the same way as the built-in init: real photos shipped by
scikit-image must land in the right ImageNet classes (cat 281-285, espresso/cup 967/968).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdcd.errors import RdcdError



def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise RdcdError(f"--backbone-weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors of many kinds
        raise RdcdError(f"--backbone-weights: cannot read {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RdcdError(f"--backbone-weights: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def classify_photos(model: nn.Module, mean, std) -> dict[str, Any]:
    """:func:`rdcd.model.classify_photos` at 224 px with the given normalisation."""
    from rdcd.model import classify_photos as classify
    from rdcd.preprocess import PreprocessSpec

    return classify(model, PreprocessSpec(size=224, mean=mean, std=std))


def init_from_file(student: nn.Module, backbone: str, path: str | os.PathLike) -> dict[str, Any]:
    """Load a timm ImageNet checkpoint into ``student.backbone`` after checking it classifies real photos."""
    import timm

    from rdcd.model import backbone_info

    info = backbone_info(backbone)
    state = load_state_dict_file(path)
    classifier = timm.create_model(info.timm_name, pretrained=False)
    try:
        missing, unexpected = classifier.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).split("\n")[1].strip() if "\n" in str(exc) else str(exc)
        raise RdcdError(f"--backbone-weights {path} does not fit timm {info.timm_name}: {first}") from None
    if missing or unexpected:
        raise RdcdError(f"--backbone-weights {path} does not fit timm {info.timm_name}: "
                        f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    check = classify_photos(classifier, info.mean, info.std)
    if not check["ok"]:
        raise RdcdError(f"--backbone-weights {path} misclassifies real photos ({check}): wrong weights, or "
                        "weights for another input normalisation")
    head = {k for k in classifier.state_dict() if k not in student.backbone.state_dict()}
    missing, _ = student.backbone.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if missing:
        raise RdcdError(f"--backbone-weights {path} left {len(missing)} backbone tensors unset, e.g. {missing[:3]}")
    return {**check, "source": str(path)}
