"""Descriptor extraction: read images (threaded), resize per the spec, run any embedder in batches.

An *embedder* is any callable taking a uint8 RGB NHWC batch and returning [batch, d] descriptors:
the runtime runners, the PyTorch wrapper, the teacher, or PDQ. No torch here.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from typing import Callable, Sequence

import numpy as np

from rdcd.errors import ImageReadError, RdcdError
from rdcd.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

Embedder = Callable[[np.ndarray], np.ndarray]


def progress_bar(description: str, total: int, disable: bool | None = None):
    """A rich progress bar (silent when stderr is not a terminal unless RDCD_PROGRESS=1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if disable is None:
        import sys

        disable = not (sys.stderr.isatty() or os.environ.get("RDCD_PROGRESS") == "1")
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=disable, transient=True)
    return prog, prog.add_task(description, total=total)


def load_images(paths: Sequence[os.PathLike], spec: PreprocessSpec, workers: int = 4,
                skip_bad: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode and resize images; return (batch, indices that loaded). Bad files raise unless skip_bad."""
    out: list[np.ndarray | None] = [None] * len(paths)
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(spec.load, p): i for i, p in enumerate(paths)}
        for fut in cf.as_completed(futs):
            i = futs[fut]
            try:
                out[i] = fut.result()
            except ImageReadError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping %s", exc)
    ok = [i for i, a in enumerate(out) if a is not None]
    arr = np.stack([out[i] for i in ok]) if ok else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    return arr, ok


def extract(embedder: Embedder, paths: Sequence[os.PathLike], spec: PreprocessSpec, batch_size: int = 32,
            description: str = "descriptors", skip_bad: bool = False, workers: int = 4,
            log_every: int = 0, logger: logging.Logger | None = None) -> tuple[np.ndarray, list[int]]:
    """Descriptors for ``paths`` as float32 [n_ok, d] plus the indices that were readable. ``log_every``: also
    one log line per that many images on ``logger`` (for logs without a terminal: counts, unreadable, rate)."""
    import time
    from pathlib import Path

    feats, kept, bad, t0, next_log = [], [], 0, time.perf_counter(), log_every
    prog, task = progress_bar(description, len(paths))
    with prog:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start: start + batch_size]
            batch, ok = load_images(chunk, spec, workers=workers, skip_bad=skip_bad)
            bad += len(chunk) - len(ok)
            if len(ok):
                emb = np.asarray(embedder(batch), dtype=np.float32)
                if emb.ndim != 2 or emb.shape[0] != len(ok):
                    raise RdcdError(f"the model returned shape {emb.shape} for a batch of {len(ok)}")
                if not np.all(np.isfinite(emb)):
                    raise RdcdError(f"the model returned non-finite descriptors for {chunk[ok[0]]}")
                feats.append(emb)
                kept.extend(start + i for i in ok)
            prog.advance(task, len(chunk))
            done = start + len(chunk)
            if log_every and len(paths) > log_every and (done >= next_log or done == len(paths)):
                rate = done / max(time.perf_counter() - t0, 1e-9)
                (logger or log).info("%s: %d/%d images, %d unreadable, %.1f img/s", description, done, len(paths),
                                     bad, rate)
                next_log += log_every
    if not feats:
        where = f" in {Path(paths[0]).parent}" if len(paths) else ""
        raise RdcdError(f"no readable images among {len(paths)}{where}")
    return np.concatenate(feats), kept
