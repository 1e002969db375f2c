"""Parity of exported artifacts with the PyTorch model, on real images. No torch in this module.

Default images: the photos scikit-image ships (the same list as the demo benchmark), resized per
the model's :class:`~rdcd.preprocess.PreprocessSpec`. FP32/FP16 artifacts must reach a cosine
similarity of :data:`THRESHOLD` on every image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from rdcd.errors import ImageReadError, MissingDependency, RdcdError
from rdcd.imageio import list_images
from rdcd.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

#: min cosine similarity of descriptors required of FP32 / FP16 artifacts
THRESHOLD = 0.999
#: at most this many parity images (sorted by name)
MAX_IMAGES = 32
GATED_PRECISIONS = ("fp32", "fp16")


def default_image_paths() -> list[Path]:
    try:
        import skimage
    except ImportError:
        raise MissingDependency("scikit-image", "it provides the default parity photos; or pass --parity-images DIR") from None
    from rdcd.validate.demo import SKIMAGE_PHOTOS

    data = Path(skimage.__file__).parent / "data"
    paths = [data / name for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    if not paths:
        raise RdcdError(f"no scikit-image photos found in {data}: pass --parity-images DIR")
    return paths


def image_paths(directory: str | os.PathLike | None = None, limit: int = MAX_IMAGES) -> list[Path]:
    """The parity image files: ``directory`` (first ``limit`` by name) or scikit-image's photos."""
    if directory is None:
        return default_image_paths()[:limit]
    paths = list_images(directory)
    if not paths:
        raise RdcdError(f"no images in --parity-images {directory}")
    return paths[:limit]


def load_images(paths: list[Path], spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """uint8 NHWC batch of the readable images (unreadable ones are skipped with a warning)."""
    arrays, names = [], []
    for p in paths:
        try:
            arrays.append(spec.load(p))
            names.append(p.name)
        except ImageReadError as exc:
            log.warning("parity: skipping %s", exc)
    if not arrays:
        raise RdcdError(f"none of the {len(paths)} parity images could be read")
    return np.stack(arrays), names


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise RdcdError(f"descriptor shapes differ: {a.shape} vs {b.shape}")
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def parity(reference: np.ndarray, output: np.ndarray, reference_name: str = "pytorch-fp32",
           runtime: str | None = None) -> dict:
    """``{"reference", "min_cos", "mean_cos", "images"}`` (NaN outputs count as cosine -1)."""
    out = np.asarray(output, dtype=np.float64)
    cos = cosine(reference, out)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    rec = {"reference": reference_name, "min_cos": round(float(cos.min()), 6), "mean_cos": round(float(cos.mean()), 6),
           "images": int(len(cos)), "threshold": THRESHOLD}
    if runtime:
        rec["runtime"] = runtime
    return rec


def passes(record: dict, precision: str) -> bool:
    """Whether a parity record passes for ``precision`` (quantized artifacts are reported, not gated here)."""
    return precision not in GATED_PRECISIONS or record["min_cos"] >= THRESHOLD
