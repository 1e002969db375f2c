"""The preprocessing contract shared by training, export, quantization, validation and devices.

A model's input is the image resized (stretched) to ``size`` x ``size`` with PIL's antialiased
bilinear filter, as **uint8 RGB NHWC**. Normalisation (``mean``/``std`` on the 0..1 scale) lives
inside every model (PyTorch wrapper, ONNX graph, Core ML, OpenVINO), so camera frames go straight
in and no runtime can disagree on it. No torch here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from rdcd.imageio import read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: TF-trained EfficientNet-Lite weights expect inputs scaled to [-1, 1].
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

RESIZE_RULE = "stretch to size x size, PIL bilinear with antialiasing, RGB uint8 NHWC"


def to_float_nchw(batch_nhwc_uint8, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
    """The one uint8 -> float conversion: uint8 RGB NHWC -> float32 NCHW ``(x / 255 - mean) / std`` (the
    defaults give [0, 1]). A numpy array gives a numpy array; a torch tensor (found by duck typing: no torch
    import here) gives a tensor on its device, cast before the transpose, which is the graph every exported
    model holds (:class:`rdcd.model.DeployModel`). Both sides give the same numbers on the same batch."""
    if hasattr(batch_nhwc_uint8, "permute"):  # torch
        x = batch_nhwc_uint8.float().permute(0, 3, 1, 2) / 255.0
        if tuple(mean) != (0.0, 0.0, 0.0) or tuple(std) != (1.0, 1.0, 1.0):
            x = (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
        return x
    x = np.asarray(batch_nhwc_uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # exact for the defaults
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch-bilinear"

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"input size {self.size} is too small")
        if self.resize != "stretch-bilinear":  # the one resize resize_pil applies (and every graph assumes)
            raise ValueError(f"unsupported resize {self.resize!r}: rdcd models take 'stretch-bilinear' ({RESIZE_RULE})")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def resize_pil(self, im: Image.Image) -> np.ndarray:
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Read ``path`` and return the model input for it, HxWx3 uint8."""
        return self.resize_pil(read_rgb(path))

    def load_batch(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        return np.stack([self.load(p) for p in paths]) if paths else np.zeros((0, self.size, self.size, 3), np.uint8)

    def normalize(self, batch_nhwc_uint8: np.ndarray) -> np.ndarray:
        """Float NCHW normalised input (what the network inside the graph sees); for reference only."""
        return to_float_nchw(batch_nhwc_uint8, self.mean, self.std)

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "rule": RESIZE_RULE, "layout": "NHWC", "dtype": "uint8", "color": "RGB"}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """The spec a manifest / model metadata records; a malformed one is bad input (:class:`RdcdError`)."""
        from rdcd.errors import RdcdError

        try:
            return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                       resize=d.get("resize", "stretch-bilinear"))
        except (KeyError, TypeError, ValueError) as exc:
            raise RdcdError(f"malformed preprocessing {str(d)[:80]}: {exc}") from None
