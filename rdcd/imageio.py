"""Image reading that survives the odd files found in real copy-detection data.

Every stage reads images through :func:`read_rgb`: EXIF orientation is applied, CMYK, 16-bit,
float, bilevel, palette and alpha images become 8-bit RGB (transparent areas composited on
white), animated or multi-page files give their first frame, and anything that cannot be decoded
(zero-byte, truncated, not an image, a decompression bomb) raises :class:`ImageReadError`
naming the file. No torch here: the runtime runners and the bench use it on devices.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from rdcd.errors import ImageReadError, RdcdError, printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Refuse images with more pixels than this (PIL's own guard is 2 x 89.5 MP and only warns below).
DEFAULT_MAX_PIXELS = 80_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False
_log = logging.getLogger("rdcd.imageio")


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB PIL image, or raise :class:`ImageReadError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as exc:
        raise ImageReadError(path, exc.strerror or str(exc)) from None
    if path.is_dir():
        raise ImageReadError(path, "is a directory")
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageReadError(path, f"{w}x{h} pixels exceeds the limit of {max_pixels} "
                                               "(decompression-bomb guard)")
                if w == 0 or h == 0:
                    raise ImageReadError(path, f"degenerate size {w}x{h}")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                return to_rgb(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"decompression-bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            msg = "truncated file"
        raise ImageReadError(path, msg) from None


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Normalise any PIL mode to 8-bit RGB, applying EXIF orientation first."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF block: keep the pixels as stored
        pass
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        elif mode.startswith("I;16"):
            hi = 65535.0
        else:  # 32-bit int: usually a 16-bit PNG decoded as 'I'
            hi = 65535.0 if a.size and a.max() > 255 else 255.0
        a = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "CMYK":
        return im.convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def read_array(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``read_rgb`` as a HxWx3 uint8 array."""
    return np.asarray(read_rgb(path, max_pixels=max_pixels), dtype=np.uint8)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def has_utf8_name(path: str | os.PathLike) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def list_images(directory: str | os.PathLike, recursive: bool = False,
                skipped: list[Path] | None = None) -> list[Path]:
    """Image files in ``directory`` (by extension), sorted; an error if the folder is missing.

    A file whose name is not valid UTF-8 cannot become an id in a CSV or a manifest: it is skipped
    with one warning naming it (undecodable bytes shown as ``\\xNN``), and appended to ``skipped``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RdcdError(f"image folder not found: {printable(directory)}")
    it: Iterable[Path] = directory.rglob("*") if recursive else directory.iterdir()
    found = []
    for p in it:
        if not (is_image_name(p.name) and p.is_file()):
            continue
        if not has_utf8_name(p.relative_to(directory)):
            _log.warning("skipping %s: its file name is not valid UTF-8 (rename it to use it)", printable(p))
            if skipped is not None:
                skipped.append(p)
            continue
        found.append(p)
    return sorted(found)
