"""Build a DISC2021-layout benchmark from real photos and DISC-style edits.

Sources: ``skimage`` (the photos scikit-image ships, cut into non-overlapping tiles so that there
are more distinct references; always available, used by the tests) or a folder of images, from
which a deterministic held-out subset is drawn (the same rule :mod:`rdcd.distill` uses to leave
those images out of training). Each source image gets one role: reference (some of them with
edited copies as queries), negative (edited copies as queries that must match nothing), or
training (background set for whitening and score normalisation). ``sources.csv`` records every
source file used, its role and the edits applied. No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from pathlib import Path

from PIL import Image

from rdcd.edits import random_edit_chain
from rdcd.errors import ImageReadError, RdcdError
from rdcd.benchmark import write_csv
from rdcd.fsutil import atomic_path, write_json
from rdcd.imageio import list_images, read_rgb

log = logging.getLogger(__name__)

#: Photos in scikit-image's data folder that need no download (motorcycle_right, a near-duplicate
#: of motorcycle_left, is left out on purpose).
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
                  "ihc.png", "rocket.jpg", "retina.jpg", "motorcycle_left.png", "moon.png", "grass.png", "gravel.png",
                  "brick.png", "clock_motion.png", "page.png", "text.png", "color.png", "logo.png", "cell.png",
                  "horse.png", "phantom.png", "chessboard_RGB.png", "microaneurysms.png")


@dataclasses.dataclass
class DemoConfig:
    source: str = "skimage"  # "skimage" or a folder of images
    holdout: int = 0  # with a folder: use this many held-out images (0 = all)
    extra: tuple[tuple[str, int], ...] = ()  # more (folder, holdout) sources, mixed into the same roles
    reference_share: float = 0.5
    positive_share: float = 0.6  # share of references that get edited copies
    negative_share: float = 0.2
    queries_per_ref: int = 1
    tile: int = 256  # skimage: cut photos into at most 2 x 2 tiles of at least this size
    seed: int = 0


def holdout_key(name: str) -> str:
    """Deterministic order for held-out selection: the sha1 of the file name."""
    return hashlib.sha1(name.encode()).hexdigest()


def holdout_names(folder: str | os.PathLike, count: int) -> list[Path]:
    """The ``count`` images of ``folder`` held out for benchmarks (first by sha1 of the name)."""
    paths = list_images(folder)
    return sorted(paths, key=lambda p: holdout_key(p.name))[:count] if count else paths


def _skimage_images(tile: int) -> list[tuple[str, Image.Image]]:
    try:
        import skimage
    except ImportError:
        raise RdcdError("the skimage demo source needs scikit-image: pip install scikit-image") from None
    root = Path(skimage.__file__).parent / "data"
    out = []
    for name in SKIMAGE_PHOTOS:
        path = root / name
        if not path.exists():
            continue
        im = read_rgb(path)
        nx, ny = min(2, max(1, im.width // tile)), min(2, max(1, im.height // tile))
        if nx * ny == 1:
            out.append((f"skimage:{name}", im))
            continue
        tw, th = im.width // nx, im.height // ny
        for j in range(ny):
            for i in range(nx):
                out.append((f"skimage:{name}#{i},{j}", im.crop((i * tw, j * th, (i + 1) * tw, (j + 1) * th))))
    return out


def _folder_images(folder: str, holdout: int) -> list[tuple[str, Image.Image]]:
    out = []
    for p in holdout_names(folder, holdout):
        try:
            out.append((str(p), read_rgb(p)))
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
    return out


CONFIG = "demo_config.json"


def recorded_config(bench: str | os.PathLike) -> dict | None:
    """The :class:`DemoConfig` a benchmark was built with (``None`` for older or foreign benchmarks)."""
    import json

    try:
        return json.loads((Path(bench) / CONFIG).read_text())
    except (OSError, ValueError):
        return None


def _config_dict(config: DemoConfig) -> dict:
    import json

    d = dataclasses.asdict(config)
    if config.source != "skimage":  # the same folder however it was named
        d["source"] = str(Path(config.source).resolve())
    d["extra"] = [[str(Path(f).resolve()), n] for f, n in config.extra]
    return json.loads(json.dumps(d))  # tuples as lists, as they read back


def build_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), force: bool = False) -> Path:
    """Write a benchmark to ``out_dir`` (atomically: a half-built benchmark never appears).

    An existing benchmark is reused when it was built with the same ``config``; one built with other
    settings is an error unless ``force`` (then it is replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        if (out_dir / "ground_truth.csv").exists():
            recorded = recorded_config(out_dir)
            if recorded != _config_dict(config):
                why = "with other settings" if recorded is not None else f"by an older rdcd (no {CONFIG})"
                raise RdcdError(f"{out_dir} was built {why}: delete it or use --force to rebuild it")
            log.info("benchmark already at %s", out_dir)
            return out_dir
        raise RdcdError(f"{out_dir} exists and is not a benchmark (use --force to replace it)")
    images = _skimage_images(config.tile) if config.source == "skimage" else _folder_images(config.source, config.holdout)
    for folder, count in config.extra:
        images += _folder_images(folder, count)
    if len(images) < 8:
        raise RdcdError(f"need at least 8 readable source images, found {len(images)} in {config.source}")
    rng = random.Random(config.seed)
    order = list(range(len(images)))
    rng.shuffle(order)
    n_ref = max(2, int(round(len(images) * config.reference_share)))
    n_neg = max(1, int(round(len(images) * config.negative_share)))
    refs, negs, train = order[:n_ref], order[n_ref: n_ref + n_neg], order[n_ref + n_neg:]
    positives = refs[: max(1, int(round(n_ref * config.positive_share)))]
    backgrounds = [images[i][1] for i in train] or [images[i][1] for i in negs]

    with atomic_path(out_dir, suffix="") as tmp:
        for sub in ("references", "queries", "training"):
            (tmp / sub).mkdir(parents=True)
        gt: list[tuple[str, str]] = []
        src: list[tuple[str, str, str, str]] = []
        qn = 0
        for k, i in enumerate(refs):
            rid = f"R{k:06d}"
            name, im = images[i]
            im.save(tmp / "references" / f"{rid}.jpg", quality=95)
            src.append(("reference", rid, name, ""))
        for k, i in enumerate(train):
            tid = f"T{k:06d}"
            images[i][1].save(tmp / "training" / f"{tid}.jpg", quality=95)
            src.append(("training", tid, images[i][0], ""))
        jobs = [(i, refs.index(i)) for i in positives for _ in range(config.queries_per_ref)] + [(i, None) for i in negs]
        for i, ref_k in jobs:
            qid = f"Q{qn:05d}"
            qn += 1
            edited, names = random_edit_chain(images[i][1], rng, backgrounds=backgrounds)
            edited.save(tmp / "queries" / f"{qid}.jpg", quality=90)
            gt.append((qid, "" if ref_k is None else f"R{ref_k:06d}"))
            src.append(("query" if ref_k is not None else "negative", qid, images[i][0], "+".join(names)))
        write_csv(tmp / "ground_truth.csv", ("query_id", "reference_id"), gt)
        write_csv(tmp / "sources.csv", ("role", "id", "source", "edits"), src)
        write_json(tmp / CONFIG, _config_dict(config))
    log.info("benchmark written to %s: %d references, %d queries (%d negative), %d training",
             out_dir, len(refs), qn, len(negs), len(train))
    return out_dir


def used_sources(bench: str | os.PathLike) -> set[str]:
    """Source image file names a benchmark was built from (its ``sources.csv``, column ``source``; to keep
    them out of training and calibration); none without that file. A file without that column, a row
    without a source, not UTF-8 or not CSV is a one-line error."""
    import csv

    from rdcd.errors import printable

    path = Path(bench) / "sources.csv"
    if not path.exists():
        return set()
    names: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, strict=True)
            if not reader.fieldnames or "source" not in reader.fieldnames:
                raise RdcdError(f"{printable(path)} has no 'source' column "
                                f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
            for n, row in enumerate(reader, start=2):
                src = (row.get("source") or "").strip()
                if not src:
                    raise RdcdError(f"{printable(path)} line {n} has an empty 'source'")
                names.add(Path(src).name)
    except UnicodeDecodeError:
        raise RdcdError(f"{printable(path)} is not UTF-8 text") from None
    except csv.Error as exc:
        raise RdcdError(f"{printable(path)}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise RdcdError(f"cannot read {printable(path)}: {exc.strerror or exc}") from None
    return names
