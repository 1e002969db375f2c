"""DISC2021-style image edits (the transformations copies go through), on PIL images.

Used to build benchmarks (:mod:`rdcd.validate.demo`) and by the training augmentations
(text and emoji overlays of SSCD's "advanced" set). AugLy 1.0.0, the library DISC2021 was made
with, provides the overlays (its bundled fonts, twemoji images and screenshot templates); the
edits it breaks on current numpy/Pillow (perspective transform, meme format) and the simple ones
are written here with PIL. Every edit takes ``(image, rng)`` and is deterministic given the rng.
No torch here.
"""

from __future__ import annotations

import functools
import glob
import io
import os
import random
import string
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from rdcd.errors import MissingDependency

Edit = Callable[[Image.Image, random.Random], Image.Image]


@functools.lru_cache(maxsize=1)
def _augly():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import augly.image as imaugs
            import augly.utils as au
    except ImportError as exc:
        raise MissingDependency("augly", f"pip install augly==1.0.0 ({exc})") from None
    return imaugs, au


@functools.lru_cache(maxsize=1)
def emoji_paths() -> list[str]:
    _, au = _augly()
    paths = sorted(glob.glob(os.path.join(au.EMOJI_DIR, "*", "*.png")))
    if not paths:
        raise MissingDependency("augly emoji assets", f"no PNG under {au.EMOJI_DIR}")
    return paths


@functools.lru_cache(maxsize=1)
def font_paths() -> list[str]:
    """AugLy's bundled Latin fonts (those with a character map), for text overlays."""
    _, au = _augly()
    fonts = sorted(p for p in glob.glob(os.path.join(au.FONTS_DIR, "*.ttf"))
                   if os.path.exists(p[:-4] + ".pkl"))
    latin = [p for p in fonts if not any(s in os.path.basename(p) for s in ("Noto", "Dingbat", "Entypo"))]
    return latin or fonts


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")


# ------------------------------------------------------------------------------ single edits
def crop(im, rng):
    w, h = im.size
    frac = rng.uniform(0.35, 0.9)
    cw, ch = max(8, int(w * frac ** 0.5 * rng.uniform(0.85, 1.15))), max(8, int(h * frac ** 0.5 * rng.uniform(0.85, 1.15)))
    cw, ch = min(cw, w), min(ch, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


def hflip(im, rng):
    return ImageOps.mirror(im)


def rotate(im, rng):
    angle = rng.choice([-1, 1]) * rng.uniform(5, 40)
    return im.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=rng.choice([(0, 0, 0), (255, 255, 255)]))


def rot90(im, rng):
    return im.transpose(rng.choice([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]))


def blur(im, rng):
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0)))


def jpeg(im, rng, quality: int | None = None):
    buf = io.BytesIO()
    _rgb(im).save(buf, format="JPEG", quality=quality or rng.randint(8, 45))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def colour(im, rng):
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.5, 1.5))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.5, 1.6))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.0, 2.0))
    if rng.random() < 0.5:  # hue rotation
        hsv = np.asarray(_rgb(im).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + rng.randint(20, 235)) % 256
        im = Image.fromarray(hsv, "HSV").convert("RGB")
    return im


def grayscale(im, rng):
    return ImageOps.grayscale(im).convert("RGB")


def overlay_text(im, rng, font_size: tuple[float, float] = (0.1, 0.3), opacity: tuple[float, float] = (0.5, 1.0)):
    imaugs, _ = _augly()
    n = rng.randint(4, 12)
    text = [rng.randrange(32, 127) for _ in range(n)]  # AugLy indexes the font's character map
    kw = dict(font_size=rng.uniform(*font_size), opacity=rng.uniform(*opacity),
              color=tuple(rng.randint(0, 255) for _ in range(3)), x_pos=rng.uniform(0, 0.6), y_pos=rng.uniform(0, 0.8))
    fonts = font_paths()
    for font in [rng.choice(fonts)] + fonts[:2]:  # a rare glyph can fail in libraqm's layout: try another font
        try:
            return _rgb(imaugs.overlay_text(im, text=text, font_file=font, **kw))
        except OSError:
            continue
    return _rgb(im)


def overlay_emoji(im, rng, size: tuple[float, float] = (0.15, 0.5), opacity: tuple[float, float] = (0.7, 1.0)):
    imaugs, _ = _augly()
    s = rng.uniform(*size)
    return _rgb(imaugs.overlay_emoji(im, emoji_path=rng.choice(emoji_paths()), opacity=rng.uniform(*opacity),
                                     emoji_size=s, x_pos=rng.uniform(0, 1 - s), y_pos=rng.uniform(0, 1 - s)))


def paste_onto(im, rng, background: Image.Image | None = None):
    """Paste the image, scaled down, onto another image (a distractor or a flat colour)."""
    if background is None:
        background = Image.new("RGB", (rng.randint(300, 700), rng.randint(300, 700)),
                               tuple(rng.randint(0, 255) for _ in range(3)))
    bg = _rgb(background).copy()
    scale = rng.uniform(0.4, 0.8)
    w = max(8, int(bg.width * scale))
    h = max(8, int(w * im.height / im.width))
    if h > bg.height:
        h = int(bg.height * 0.9)
        w = max(8, int(h * im.width / im.height))
    fg = _rgb(im).resize((w, h), Image.BILINEAR)
    bg.paste(fg, (rng.randint(0, bg.width - w), rng.randint(0, bg.height - h)))
    return bg


def screenshot(im, rng):
    imaugs, au = _augly()
    template = rng.choice(["web.png", "mobile.png"])
    return _rgb(imaugs.overlay_onto_screenshot(
        im, template_filepath=os.path.join(au.SCREENSHOT_TEMPLATES_DIR, template), crop_src_to_fit=rng.random() < 0.5))


def pad(im, rng):
    w, h = im.size
    colour_ = tuple(rng.randint(0, 255) for _ in range(3))
    l, r = int(w * rng.uniform(0, 0.4)), int(w * rng.uniform(0, 0.4))
    t, b = int(h * rng.uniform(0, 0.4)), int(h * rng.uniform(0, 0.4))
    return ImageOps.expand(_rgb(im), border=(l, t, r, b), fill=colour_)


def perspective(im, rng, strength: float = 0.25):
    """Random projective warp (AugLy's perspective_transform is broken on numpy >= 1.24)."""
    w, h = im.size
    d = strength
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
    # coefficients mapping output (dst) coordinates back to input (src) coordinates
    A, B = [], []
    for (x, y), (u, v) in zip(dst, src):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y]); B.append(u)
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y]); B.append(v)
    coeffs = np.linalg.lstsq(np.asarray(A, float), np.asarray(B, float), rcond=None)[0]
    xs, ys = [p[0] for p in dst], [p[1] for p in dst]
    ow, oh = int(max(xs) - min(xs)), int(max(ys) - min(ys))
    shift = (min(xs), min(ys))
    # account for the translation of the output canvas
    a, b, c, d_, e, f, g, hh = coeffs
    c2 = a * shift[0] + b * shift[1] + c
    f2 = d_ * shift[0] + e * shift[1] + f
    den = g * shift[0] + hh * shift[1] + 1
    coeffs2 = [a / den, b / den, c2 / den, d_ / den, e / den, f2 / den, g / den, hh / den]
    return _rgb(im).transform((max(ow, 8), max(oh, 8)), Image.PERSPECTIVE, coeffs2, Image.BILINEAR,
                              fillcolor=rng.choice([(0, 0, 0), (255, 255, 255)]))


def meme(im, rng):
    """A caption bar above the image (AugLy's meme_format is broken on Pillow >= 10)."""
    im = _rgb(im)
    bar = int(im.height * rng.uniform(0.15, 0.35))
    out = Image.new("RGB", (im.width, im.height + bar), (255, 255, 255))
    out.paste(im, (0, bar))
    draw = ImageDraw.Draw(out)
    font = ImageFont.truetype(rng.choice(font_paths()), max(8, int(bar * 0.5)))
    words = "".join(rng.choice(string.ascii_letters + "  ") for _ in range(rng.randint(8, 20)))
    draw.text((int(im.width * 0.05), int(bar * 0.2)), words, fill=(0, 0, 0), font=font)
    return out


def downscale(im, rng):
    f = rng.uniform(0.2, 0.6)
    return im.resize((max(8, int(im.width * f)), max(8, int(im.height * f))), Image.BILINEAR)


def aspect(im, rng):
    f = rng.uniform(0.6, 1.6)
    return im.resize((max(8, int(im.width * f)), im.height), Image.BILINEAR)


def pixelize(im, rng):
    f = rng.uniform(0.1, 0.3)
    small = im.resize((max(4, int(im.width * f)), max(4, int(im.height * f))), Image.BILINEAR)
    return small.resize(im.size, Image.NEAREST)


def noise(im, rng):
    a = np.asarray(_rgb(im)).astype(np.float32)
    g = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(8, 30), a.shape)
    return Image.fromarray(np.clip(a + g, 0, 255).astype(np.uint8))


#: Edits sampled to make benchmark queries (name -> function).
EDITS: dict[str, Edit] = {
    "crop": crop, "hflip": hflip, "rotate": rotate, "rot90": rot90, "blur": blur, "jpeg": jpeg,
    "colour": colour, "grayscale": grayscale, "text": overlay_text, "emoji": overlay_emoji,
    "paste": paste_onto, "screenshot": screenshot, "pad": pad, "perspective": perspective,
    "meme": meme, "downscale": downscale, "aspect": aspect, "pixelize": pixelize, "noise": noise,
}


def random_edit_chain(im: Image.Image, rng: random.Random, n_min: int = 1, n_max: int = 3,
                      backgrounds: list[Image.Image] | None = None) -> tuple[Image.Image, list[str]]:
    """Apply 1-3 distinct random edits then a re-encoding, as DISC2021 queries went through."""
    names = rng.sample(sorted(EDITS), rng.randint(n_min, n_max))
    im = _rgb(im)
    for name in names:
        if name == "paste" and backgrounds:
            im = paste_onto(im, rng, rng.choice(backgrounds))
        else:
            im = EDITS[name](im, rng)
        im = _rgb(im)
    im = jpeg(im, rng, quality=rng.randint(50, 95))
    return im, names
