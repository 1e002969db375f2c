"""Teacher-feature cache: teacher features of K fixed augmented views per image, keyed by
(image, augmentation seed), so that epochs re-use them when the teacher is the bottleneck (CPU).

Layout: ``CACHE_DIR/teacher-<fingerprint>/{index.json, feats.npy, done.npy}``. The fingerprint
hashes everything a feature depends on besides the image and the view slot (teacher, its input
size, the view and canvas sizes, the augmentation settings, the run seed, K); ``index.json`` maps
image keys (name, size, mtime) to rows, ``feats.npy`` is float16 [rows, K, dim], ``done.npy``
marks the computed entries. Files are replaced atomically at every flush, so a killed pass keeps
what it had flushed and the next run only computes what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from rdcd.errors import RdcdError
from rdcd.fsutil import write_bytes, write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def fingerprint_id(fingerprint: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **fingerprint}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class TeacherCache:
    def __init__(self, root: str | os.PathLike, fingerprint: dict, keys: Sequence[str], views: int, dim: int,
                 prefix: str = "teacher"):
        if views < 1:
            raise RdcdError(f"--cache-views must be at least 1, got {views}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / f"{prefix}-{fingerprint_id(fingerprint)}"
        self.views, self.dim = int(views), int(dim)
        index: dict[str, int] = {}
        feats = np.zeros((0, self.views, self.dim), np.float16)
        done = np.zeros((0, self.views), bool)
        if (self.dir / "index.json").exists():
            try:
                meta = json.loads((self.dir / "index.json").read_text())
                index = {str(k): int(v) for k, v in meta["rows"].items()}
                feats = np.load(self.dir / "feats.npy")
                done = np.load(self.dir / "done.npy")
                if feats.shape[1:] != (self.views, self.dim) or len(done) != len(feats) or len(index) > len(feats):
                    raise ValueError(f"shapes {feats.shape} / {done.shape} do not match")
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                log.warning("ignoring unreadable teacher cache %s (%s): rebuilding it", self.dir, exc)
                index, feats, done = {}, np.zeros((0, self.views, self.dim), np.float16), np.zeros((0, self.views), bool)
        new = [k for k in dict.fromkeys(keys) if k not in index]
        for k in new:
            index[k] = len(index)
        if len(index) > len(feats):
            extra = len(index) - len(feats)
            feats = np.concatenate([feats, np.zeros((extra, self.views, self.dim), np.float16)])
            done = np.concatenate([done, np.zeros((extra, self.views), bool)])
        self.index, self.feats, self.done = index, feats, done
        self.rows = np.array([index[k] for k in keys], dtype=np.int64)  # image position -> row

    def missing(self) -> list[tuple[int, int]]:
        """(image position, slot) pairs still to compute, in order."""
        todo = ~self.done[self.rows]
        return [(int(i), int(s)) for i, s in zip(*np.nonzero(todo))]

    def fill(self, items: Sequence[tuple[int, int]], feats: np.ndarray) -> None:
        for (i, s), f in zip(items, feats):
            self.feats[self.rows[i], s] = f.astype(np.float16)
            self.done[self.rows[i], s] = True

    def flush(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, arr in (("feats.npy", self.feats), ("done.npy", self.done)):
            buf = io.BytesIO()
            np.save(buf, arr)
            write_bytes(self.dir / name, buf.getvalue())
        write_json(self.dir / "index.json", {"version": CACHE_VERSION, "fingerprint": self.fingerprint,
                                              "views": self.views, "dim": self.dim, "rows": self.index})

    def complete(self) -> bool:
        return bool(self.done[self.rows].all())

    def lookup(self, positions, slots):
        """Teacher features [n, dim] (torch float32, re-normalised after the float16 round trip)."""
        import torch
        import torch.nn.functional as F

        pos = np.asarray(positions, dtype=np.int64)
        sl = np.asarray(slots, dtype=np.int64)
        if not self.done[self.rows[pos], sl].all():
            raise RdcdError("teacher cache is missing entries it should have (was the cache folder changed "
                            "during training?)")
        return F.normalize(torch.from_numpy(self.feats[self.rows[pos], sl].astype(np.float32)), dim=1)


def build_cache(caches: "TeacherCache | Sequence[TeacherCache]",
                compute: Callable[[list[tuple[int, int]]], Iterable[tuple[list, "np.ndarray | list[np.ndarray]"]]],
                chunk: int, rank: int = 0, world: int = 1, gather: Callable | None = None) -> int:
    """Compute every entry missing from any of ``caches`` (one pass for all: e.g. teacher features and
    the student backbone's features of the same views), ``chunk`` entries per rank and round;
    ``compute(items)`` yields (items, features) batches, features one array per cache. ``gather``
    (all_gather_object) shares each round's results so that every rank ends with the full caches;
    rank 0 writes them after every round. Returns entries computed."""
    caches = [caches] if isinstance(caches, TeacherCache) else list(caches)
    todo = sorted(set().union(*(c.missing() for c in caches)))
    done = 0
    per_round = chunk * world
    for start in range(0, len(todo), per_round):
        mine = todo[start + rank * chunk: start + (rank + 1) * chunk]
        outs = []
        for items, feats in (compute(mine) if mine else []):
            feats = feats if isinstance(feats, (list, tuple)) else [feats]
            outs.append((list(items), [np.asarray(f, np.float16) for f in feats]))
        results = gather(outs) if gather is not None and world > 1 else [outs]
        for part in results:
            for items, feats in part:
                for c, f in zip(caches, feats):
                    c.fill(items, f)
                done += len(items)
        if rank == 0:
            for c in caches:
                c.flush()
    return done
