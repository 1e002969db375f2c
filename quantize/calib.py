"""Calibration images: a folder of real images, counted in images, never silently replaced by random data.

The set is drawn deterministically (images ordered by the sha1 of ``"calib:" + name``, so a folder sorted by
category still gives a mixed sample), images used by the benchmark are left out, unreadable files are skipped
with a warning, and fewer readable images than asked for is an error that says how many were found.
No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from rdcd.errors import ImageReadError, RdcdError
from rdcd.imageio import list_images
from rdcd.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

#: The issue asks for at least 300 calibration images by default.
DEFAULT_CALIB_COUNT = 300


@dataclasses.dataclass
class CalibrationSet:
    images: np.ndarray  # uint8 NHWC at the model's input size
    paths: list[Path]
    skipped: list[str]  # "path: reason" of unreadable files
    excluded: int  # images left out because the benchmark uses them
    directory: Path
    bad_names: int = 0  # image files skipped because their names are not valid UTF-8


    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"dir": str(self.directory), "images": len(self), "skipped": len(self.skipped) + self.bad_names,
                "skipped_unreadable": len(self.skipped), "skipped_bad_names": self.bad_names,
                "excluded_benchmark_images": self.excluded, "size": int(self.images.shape[1])}

    def summary(self) -> str:
        """One line for the console: images used, files skipped and why."""
        why = [f"{n} {what}" for n, what in ((len(self.skipped), "unreadable"),
                                              (self.bad_names, "with a non-UTF-8 name")) if n]
        return (f"calibration: {len(self)} images from {self.directory}, {len(self.skipped) + self.bad_names} "
                f"skipped{' (' + ', '.join(why) + ')' if why else ''}")


def calibration_order(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: hashlib.sha1(f"calib:{p.name}".encode()).hexdigest())


def load_calibration(calib_dir: str | os.PathLike, spec: PreprocessSpec, count: int = DEFAULT_CALIB_COUNT,
                     exclude_names: Iterable[str] = (), recursive: bool = False) -> CalibrationSet:
    """Read exactly ``count`` readable images of ``calib_dir`` at ``spec.size``, or raise RdcdError."""
    if count < 1:
        raise RdcdError(f"--calib-count must be at least 1, got {count}")
    directory = Path(calib_dir)
    if not directory.exists():
        raise RdcdError(f"calibration folder not found: {directory}")
    if not directory.is_dir():
        raise RdcdError(f"calibration path is not a folder: {directory}")
    exclude = set(exclude_names)
    bad_names: list[Path] = []
    candidates = list_images(directory, recursive=recursive, skipped=bad_names)  # warns about non-UTF-8 names
    kept = [p for p in candidates if p.name not in exclude]
    excluded = len(candidates) - len(kept)
    if excluded:
        log.info("calibration: leaving out %d images of %s that the benchmark uses", excluded, directory)
    images, paths, skipped = [], [], []
    for p in calibration_order(kept):
        if len(images) == count:
            break
        try:
            images.append(spec.load(p))
            paths.append(p)
        except ImageReadError as exc:
            log.warning("calibration: skipping %s", exc)
            skipped.append(f"{p}: {exc.reason}")
    if not images:
        raise RdcdError(f"no readable calibration images in {directory} ({len(candidates)} image files, "
                        f"{len(skipped)} unreadable, {excluded} used by the benchmark): refusing to calibrate "
                        "(quantization scales must come from real images)")
    if len(images) < count:
        raise RdcdError(f"only {len(images)} readable calibration images in {directory} (asked for {count}; "
                        f"{len(skipped)} unreadable, {excluded} left out because the benchmark uses them): "
                        "add images or lower --calib-count")
    return CalibrationSet(np.stack(images), paths, skipped, excluded, directory, len(bad_names))
