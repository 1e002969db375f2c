"""Up-front checks of ``rdcd-distill``: everything that can be wrong with the outputs and the benchmarks
fails here, with one line, before the images are scanned, the teacher loaded or the cache built."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rdcd import cli
from rdcd.errors import RdcdError, printable

log = logging.getLogger("rdcd.distill")


def check_outputs(cfg, is_main: bool = True) -> None:
    """``--out`` and the cache folder are writable (created if needed); the temporaries a killed run
    (``kill -9``) left there are removed."""
    folders = {"--out": cfg.out, **({"--cache": cfg.cache_dir} if cfg.cache_dir else {})}
    for what, d in folders.items():
        cli.writable_dir(d, what, clean=is_main)
    for d in folders.values():
        Path(d).mkdir(parents=True, exist_ok=True)


def _benches(value) -> list[str]:
    return [value] if isinstance(value, (str, os.PathLike)) else list(value or [])


def excluded_sources(benches) -> set[str]:
    """File names of the source images the ``--exclude-benchmark`` benchmarks were built from (their
    ``sources.csv``, read by :func:`rdcd.validate.demo.used_sources`, which must exist here); any problem
    with one is an error naming it."""
    from rdcd.validate.demo import used_sources

    names: set[str] = set()
    for bench in _benches(benches):
        path = Path(bench) / "sources.csv"
        flag = f"--exclude-benchmark {printable(bench)}"
        if not Path(bench).is_dir():
            raise RdcdError(f"{flag}: no such benchmark folder")
        if not path.is_file():
            raise RdcdError(f"{flag}: no sources.csv there "
                            "(a benchmark built by rdcd-validate build-demo lists its source images in it)")
        try:
            names |= used_sources(bench)
        except RdcdError as exc:
            raise RdcdError(f"{flag}: {exc}") from None
    return names


def check_eval_benchmark(bench) -> None:
    """``--eval-benchmark`` is a DISC-layout benchmark (references/, queries/, ground truth) with images."""
    if not bench:
        return
    from rdcd.benchmark import load_benchmark

    try:
        b = load_benchmark(bench)
    except RdcdError as exc:
        raise RdcdError(f"--eval-benchmark {printable(bench)}: {exc}") from None
    if not len(b.queries.paths) or not len(b.references.paths):
        raise RdcdError(f"--eval-benchmark {printable(bench)}: no query or no reference images")
    if not b.gt_pairs:
        raise RdcdError(f"--eval-benchmark {printable(bench)}: its ground truth lists no matching pair, so "
                        "micro-AP is undefined")


def check_train_dirs(train_dir) -> None:
    for d in _benches(train_dir):
        if not Path(d).is_dir():
            raise RdcdError(f"--train-dir {printable(d)}: no such folder" if not Path(d).exists() else
                            f"--train-dir {printable(d)}: not a folder")


def check_inputs(train_dir, exclude_benchmark, eval_benchmark) -> set[str]:
    """The input folders and benchmarks (cheap: no torch needed); returns the file names to leave out."""
    check_train_dirs(train_dir)
    exclude = excluded_sources(exclude_benchmark)
    check_eval_benchmark(eval_benchmark)
    return exclude


def check(cfg, is_main: bool = True, exclude: set[str] | None = None) -> set[str]:
    """All up-front checks, inputs first (so that a bad one creates no output folder) unless the caller
    already ran :func:`check_inputs` and passes its ``exclude``; returns the file names to leave out."""
    if exclude is None:
        exclude = check_inputs(cfg.train_dir, cfg.exclude_benchmark, cfg.eval_benchmark)
    check_outputs(cfg, is_main)
    return exclude
