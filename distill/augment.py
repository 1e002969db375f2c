"""SSCD's "advanced" augmentations, split into a per-image PIL stage and a batched tensor stage.

SSCD (``sscd/transforms/settings.py``, ADVANCED) applies, in order: horizontal flip (p 0.5),
rot90 (p 0.05), text overlay (p 0.1), emoji overlay (p 0.2), free rotation (p 0.05), random
resized crop, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5, radius 1-5 px at
224) and JPEG (p 0.2, quality 0-100). Here:

* :func:`make_canvas` (data-loader workers, PIL): the image is stretched to a square canvas (the
  deployment preprocessing stretches too), then flip, rot90 and the AugLy-backed overlays of
  :mod:`rdcd.edits` with SSCD's probabilities and ranges. Every random choice of both stages is
  drawn here, from one generator seeded by (run seed, image name, view), so a view can be rebuilt
  bit for bit: the teacher-feature cache relies on it.
* :func:`apply_tensor_stage` (training device, batched, kornia): free rotation, random resized
  crop, colour jitter (torchvision's definitions), grayscale, blur and JPEG with the parameters
  drawn above, then an antialiased resize to each requested size: the teacher and the student
  get the same view, each at its own resolution. On a GPU this keeps data loading off the
  critical path (the workers only decode, resize and overlay).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

#: Layout of the per-view parameter vector filled by :func:`make_canvas`.
PARAMS = ("angle", "x0", "y0", "x1", "y1", "brightness", "contrast", "saturation", "hue", "gray",
          "blur_sigma", "jpeg_quality")
P = {name: i for i, name in enumerate(PARAMS)}


@dataclasses.dataclass(frozen=True)
class AugConfig:
    """SSCD ADVANCED probabilities and ranges (sizes in pixels refer to a 224-pixel view)."""

    p_flip: float = 0.5
    p_rot90: float = 0.05
    p_text: float = 0.1
    text_size: tuple[float, float] = (0.1, 0.3)
    text_opacity: tuple[float, float] = (0.1, 1.0)
    p_emoji: float = 0.2
    emoji_size: tuple[float, float] = (0.1, 0.5)
    emoji_opacity: tuple[float, float] = (0.7, 1.0)
    p_rotate: float = 0.05  # free rotation by a uniform integer angle in [0, 359]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_jitter: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_radius: tuple[float, float] = (1.0, 5.0)
    p_jpeg: float = 0.2
    jpeg_quality: tuple[int, int] = (0, 100)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AugConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def name_key(name: str) -> int:
    """A stable 32-bit integer for an image name (seeds must not depend on list positions)."""
    return zlib.crc32(name.encode("utf-8"))


def view_rng(seed: int, name: str, *tags: int) -> np.random.Generator:
    """The generator for one view of one image; the same arguments give the same view."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, name_key(name),
                                                         *[int(t) & 0xFFFFFFFF for t in tags]]))


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _crop_box(rng: np.random.Generator, size: int, cfg: AugConfig) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box on a ``size`` x ``size`` canvas (10 tries, then centre crop)."""
    area = size * size
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= size and 0 < h <= size:
            x = int(rng.integers(0, size - w + 1))
            y = int(rng.integers(0, size - h + 1))
            return float(x), float(y), float(x + w), float(y + h)
    return 0.0, 0.0, float(size), float(size)  # square canvas: in-ratio centre crop is the whole canvas


def make_canvas(im: Image.Image, rng: np.random.Generator, canvas: int, cfg: AugConfig = AugConfig(),
                overlays: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """PIL stage of one view: returns (uint8 canvas HxWx3, float32 parameters for the tensor stage).

    The draws happen in a fixed order whatever is applied, so that each random choice depends only
    on the generator's seed.
    """
    from rdcd import edits

    flip = rng.random() < cfg.p_flip
    rot90 = int(rng.integers(1, 4)) if rng.random() < cfg.p_rot90 else 0
    text = rng.random() < cfg.p_text
    emoji = rng.random() < cfg.p_emoji
    edit_seed = int(rng.integers(0, 2 ** 62))
    angle = float(rng.integers(0, 360)) if rng.random() < cfg.p_rotate else 0.0
    x0, y0, x1, y1 = _crop_box(rng, canvas, cfg)
    jitter = rng.random() < cfg.p_jitter
    b = _uniform(rng, (max(0.0, 1 - cfg.brightness), 1 + cfg.brightness))
    c = _uniform(rng, (max(0.0, 1 - cfg.contrast), 1 + cfg.contrast))
    s = _uniform(rng, (max(0.0, 1 - cfg.saturation), 1 + cfg.saturation))
    h = _uniform(rng, (-cfg.hue, cfg.hue))
    if not jitter:
        b = c = s = 1.0
        h = 0.0
    gray = 1.0 if rng.random() < cfg.p_gray else 0.0
    sigma = _uniform(rng, cfg.blur_radius) if rng.random() < cfg.p_blur else 0.0
    quality = float(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)) if rng.random() < cfg.p_jpeg else -1.0

    im = im if im.mode == "RGB" else im.convert("RGB")
    if im.size != (canvas, canvas):
        im = im.resize((canvas, canvas), Image.BILINEAR)
    if flip:
        im = ImageOps.mirror(im)
    if rot90:
        im = im.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[rot90 - 1])
    if overlays and (text or emoji):
        r = random.Random(edit_seed)
        if text:
            im = _try_overlay(edits.overlay_text, im, r, font_size=cfg.text_size, opacity=cfg.text_opacity)
        if emoji:
            im = _try_overlay(edits.overlay_emoji, im, r, size=cfg.emoji_size, opacity=cfg.emoji_opacity)
        if im.size != (canvas, canvas):
            im = im.resize((canvas, canvas), Image.BILINEAR)
    params = np.array([angle, x0, y0, x1, y1, b, c, s, h, gray, sigma, quality], np.float32)
    return np.array(im, dtype=np.uint8), params


def _try_overlay(fn, im: Image.Image, r: random.Random, **kw) -> Image.Image:
    """Apply an AugLy overlay; a glyph the font cannot lay out (PIL's "raqm_layout() failed") leaves
    the image as it is, as SSCD's own text overlay does. Deterministic: the same seed fails the same way."""
    try:
        return fn(im, r, **kw)
    except (OSError, RuntimeError, ValueError) as exc:
        log.debug("overlay %s skipped: %s", fn.__name__, exc)
        return im


def _blur_kernel(sigma_max: float) -> int:
    return 2 * int(math.ceil(3 * sigma_max)) + 1


def apply_tensor_stage(canvas, params, view_size: int, out_sizes: Sequence[int], cfg: AugConfig = AugConfig()):
    """Batched kornia stage. ``canvas``: uint8 [B,S,S,3]; ``params``: float [B, len(PARAMS)].

    Returns one float tensor [B,3,s,s] in [0, 1] per entry of ``out_sizes``: the same view, each
    resized (antialiased) from the ``view_size`` crop.
    """
    import torch
    import torch.nn.functional as F
    from kornia.color import rgb_to_grayscale
    from kornia.enhance import (adjust_contrast_with_mean_subtraction, adjust_hue,
                                adjust_saturation_with_gray_subtraction, jpeg_codec_differentiable)
    from kornia.filters import gaussian_blur2d
    from kornia.geometry.transform import crop_and_resize, rotate

    from rdcd.preprocess import to_float_nchw

    p = params.to(canvas.device, torch.float32)
    x = to_float_nchw(canvas)
    n = x.shape[0]
    rot = p[:, P["angle"]] != 0
    if bool(rot.any()):
        x = x.clone()
        x[rot] = rotate(x[rot], p[rot, P["angle"]])
    x0, y0 = p[:, P["x0"]], p[:, P["y0"]]
    x1, y1 = p[:, P["x1"]] - 1, p[:, P["y1"]] - 1  # kornia boxes are inclusive pixel positions
    boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                         torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1)
    x = crop_and_resize(x, boxes, (view_size, view_size), align_corners=True)
    jit = (p[:, P["brightness"]] != 1) | (p[:, P["contrast"]] != 1) | (p[:, P["saturation"]] != 1) | (p[:, P["hue"]] != 0)
    if bool(jit.any()):  # torchvision ColorJitter definitions, fixed order
        xj = x[jit]
        xj = (xj * p[jit, P["brightness"]].view(-1, 1, 1, 1)).clamp_(0, 1)
        xj = adjust_contrast_with_mean_subtraction(xj, p[jit, P["contrast"]])
        xj = adjust_saturation_with_gray_subtraction(xj, p[jit, P["saturation"]])
        xj = adjust_hue(xj, p[jit, P["hue"]] * 2 * math.pi)
        x = x.clone()
        x[jit] = xj.clamp(0, 1)
    gray = p[:, P["gray"]] > 0
    if bool(gray.any()):
        x = x.clone()
        x[gray] = rgb_to_grayscale(x[gray]).expand(-1, 3, -1, -1)
    scale = view_size / 224.0
    blur = p[:, P["blur_sigma"]] > 0
    if bool(blur.any()):
        sig = (p[blur, P["blur_sigma"]] * scale).unsqueeze(1).expand(-1, 2).contiguous()
        k = _blur_kernel(cfg.blur_radius[1] * scale)
        k = min(k, 2 * (view_size // 2) - 1)
        x = x.clone()
        x[blur] = gaussian_blur2d(x[blur], (k, k), sig)
    jpeg = p[:, P["jpeg_quality"]] >= 0
    if bool(jpeg.any()):
        q = p[jpeg, P["jpeg_quality"]].clamp(1, 100)
        x = x.clone()
        x[jpeg] = jpeg_codec_differentiable(x[jpeg].clamp(0, 1), q).clamp(0, 1)
    outs = []
    for s in out_sizes:
        outs.append(x if s == view_size else F.interpolate(x, size=(s, s), mode="bilinear", antialias=True,
                                                           align_corners=False).clamp_(0, 1))
    assert all(o.shape[0] == n for o in outs)
    return outs
