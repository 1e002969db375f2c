"""Training images, views and the deterministic, resumable, distributed batch order."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rdcd.distill.augment import AugConfig, make_canvas, name_key, view_rng
from rdcd.errors import ImageReadError, RdcdError
from rdcd.imageio import list_images, read_rgb

log = logging.getLogger(__name__)

#: view tags mixed into the seeds: view A (teacher + student), view B (momentum student / 2nd view)
VIEW_A, VIEW_B = 1, 2


def subset_images(paths: Sequence[Path], n: int) -> list[Path]:
    """A deterministic subset of ``n`` of ``paths`` (``--max-images``): the first by sha1 of the file names,
    kept in their scan order."""
    import hashlib

    keep = set(sorted(paths, key=lambda p: hashlib.sha1(f"rdcd-train:{p.name}".encode()).hexdigest())[:n])
    return [p for p in paths if p in keep]


def scan_images(train_dir: "str | os.PathLike | Sequence[str | os.PathLike]", exclude: set[str] | None = None,
                workers: int = 4, recursive: bool = False) -> list[Path]:
    """Readable images of ``train_dir`` (one folder or several) minus ``exclude`` (file names); unreadable
    ones are skipped with a warning. Raises :class:`RdcdError` when nothing usable is left."""
    dirs = [train_dir] if isinstance(train_dir, (str, os.PathLike)) else list(train_dir)
    paths, seen = [], set()
    for d in dirs:
        found = list_images(d, recursive=recursive)
        if not found:
            raise RdcdError(f"no images in {d} (looked for jpg, png, webp, ... files)")
        for p in found:  # a folder given twice (or nested in another) must not become its own hard negative
            if p.resolve() not in seen:
                seen.add(p.resolve())
                paths.append(p)
    train_dir = ", ".join(map(str, dirs))
    if exclude:
        kept = [p for p in paths if p.name not in exclude]
        log.info("left out %d benchmark images of %d", len(paths) - len(kept), len(paths))
        paths = kept
        if not paths:
            raise RdcdError(f"every image of {train_dir} belongs to the excluded benchmark")
    good: list[Path] = []
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for p, err in zip(paths, pool.map(_check, paths)):
            if err is None:
                good.append(p)
            else:
                log.warning("skipping unreadable training image: %s", err)
    if not good:
        raise RdcdError(f"none of the {len(paths)} images in {train_dir} can be read")
    return good


def _check(path: Path) -> str | None:
    try:
        im = read_rgb(path)
        if min(im.size) < 2:
            return f"{path}: image too small ({im.width}x{im.height})"
    except ImageReadError as exc:
        return str(exc)
    return None


def image_key(path: Path) -> str:
    """Cache key of an image: name, size and modification time (a changed file gets new entries)."""
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


class ViewDataset:
    """Item ``(index, epoch)`` -> two augmented canvases (PIL stage) and their tensor-stage parameters.

    View A is what teacher and student see; view B is the momentum encoder's (rdcd) or the second
    view (baseline). With ``cache_views`` = K, view A is one of K fixed views per image (slot chosen
    per epoch), so the teacher features of those views can be cached; view B always changes.
    """

    def __init__(self, paths: Sequence[Path], canvas: int, seed: int, aug: AugConfig = AugConfig(),
                 cache_views: int = 0, overlays: bool = True):
        self.paths = list(paths)
        self.names = [p.name for p in self.paths]
        self.canvas, self.seed, self.aug = canvas, seed, aug
        self.cache_views = cache_views
        self.overlays = overlays

    def __len__(self) -> int:
        return len(self.paths)

    def slot(self, index: int, epoch: int) -> int:
        """Which of the K cached views of image ``index`` epoch ``epoch`` uses (-1: no cache)."""
        if not self.cache_views:
            return -1
        return int(view_rng(self.seed, self.names[index], 0, epoch).integers(0, self.cache_views))

    def view_a_rng(self, index: int, epoch: int) -> np.random.Generator:
        if self.cache_views:
            return view_rng(self.seed, self.names[index], VIEW_A, 1_000_000 + self.slot(index, epoch))
        return view_rng(self.seed, self.names[index], VIEW_A, epoch)

    def load(self, index: int):
        try:
            return read_rgb(self.paths[index])
        except ImageReadError as exc:  # changed on disk since the scan: use a flat grey image, say so
            log.warning("unreadable training image during training, replaced by grey: %s", exc)
            from PIL import Image

            return Image.new("RGB", (self.canvas, self.canvas), (128, 128, 128))

    def view(self, index: int, rng: np.random.Generator, im=None):
        im = self.load(index) if im is None else im
        return make_canvas(im, rng, self.canvas, self.aug, overlays=self.overlays)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        import torch

        index, epoch = item
        im = self.load(index)
        a, pa = self.view(index, self.view_a_rng(index, epoch), im)
        b, pb = self.view(index, view_rng(self.seed, self.names[index], VIEW_B, epoch), im)
        return {"index": index, "slot": self.slot(index, epoch), "key": name_key(self.names[index]),
                "view_a": torch.from_numpy(a), "params_a": torch.from_numpy(pa),
                "view_b": torch.from_numpy(b), "params_b": torch.from_numpy(pb)}


class CacheViewDataset:
    """Item ``(index, slot)`` -> view A canvas of that cache slot (the teacher-cache pass)."""

    def __init__(self, base: ViewDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base) * max(1, self.base.cache_views)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        import torch

        index, slot = item
        rng = view_rng(self.base.seed, self.base.names[index], VIEW_A, 1_000_000 + slot)
        a, pa = self.base.view(index, rng)
        return {"index": index, "slot": slot, "view_a": torch.from_numpy(a), "params_a": torch.from_numpy(pa)}


def steps_per_epoch(n_images: int, global_batch: int) -> int:
    return n_images // global_batch


class EpochBatches:
    """This rank's batches of one epoch, from batch ``start`` on: a permutation seeded by (seed, epoch),
    cut into global batches (the last partial one dropped), each split evenly across ranks."""

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        if global_batch % world:
            raise RdcdError(f"--batch-size {global_batch} must be a multiple of the number of processes ({world})")
        self.n, self.gb, self.world, self.rank = n, global_batch, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start
        self.per_rank = global_batch // world

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.n, self.gb) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 7]).permutation(self.n)
        for j in range(self.start, steps_per_epoch(self.n, self.gb)):
            chunk = perm[j * self.gb: (j + 1) * self.gb]
            mine = chunk[self.rank * self.per_rank: (self.rank + 1) * self.per_rank]
            yield [(int(i), self.epoch) for i in mine]


class Collate:
    """Stack items; with ``sizes`` set, also run the tensor stage here (in the data-loader worker, used
    on CPU so that augmentation overlaps the training step): views A and B become float tensors
    ``x_a`` (one per size in ``sizes[0]``) and ``x_b`` (``sizes[1]``)."""

    def __init__(self, view_size: int, aug: AugConfig, sizes: tuple[list[int], list[int]] | None = None):
        self.view_size, self.aug, self.sizes = view_size, aug, sizes

    def __call__(self, items: list[dict]) -> dict:
        from torch.utils.data import default_collate

        from rdcd.distill.augment import apply_tensor_stage

        batch = default_collate(items)
        if self.sizes is not None:
            sizes_a, sizes_b = self.sizes
            batch["x_a"] = apply_tensor_stage(batch.pop("view_a"), batch.pop("params_a"), self.view_size, sizes_a,
                                              self.aug)
            if sizes_b:
                batch["x_b"] = apply_tensor_stage(batch.pop("view_b"), batch.pop("params_b"), self.view_size,
                                                  sizes_b, self.aug)
        return batch


def worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)
