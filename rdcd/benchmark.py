"""The DISC2021 benchmark layout.

::

    BENCH/
      references/      reference images; the id of an image is its file name without extension
      queries/         query images (edited copies of references, and distractors)
      training/        optional background images, for PCA-whitening and score normalisation
      ground_truth.csv query_id,reference_id   (an empty reference_id: the query has no match)

The ground truth may also be given elsewhere (``gt_path``). A malformed CSV, or ids that match no
file, raise :class:`RdcdError` with the file and line. No torch here.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence

from rdcd.errors import RdcdError
from rdcd.imageio import list_images

GT_NAMES = ("ground_truth.csv", "public_ground_truth.csv", "gt.csv")


@dataclasses.dataclass
class Split:
    ids: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class Benchmark:
    root: Path
    references: Split
    queries: Split
    training: Split | None
    gt_pairs: list[tuple[str, str]]  # (query_id, reference_id) true matches
    gt_path: Path

    @property
    def num_positives(self) -> int:
        return len(self.gt_pairs)

    def summary(self) -> dict:
        matched = {q for q, _ in self.gt_pairs}
        return {"references": len(self.references), "queries": len(self.queries),
                "queries_with_match": len(matched), "negative_queries": len(self.queries) - len(matched),
                "training": len(self.training) if self.training else 0, "true_pairs": self.num_positives}


def _split(folder: Path, required: bool) -> Split | None:
    if not folder.is_dir():
        if required:
            raise RdcdError(f"benchmark folder missing: {folder}")
        return None
    paths = list_images(folder)
    if required and not paths:
        raise RdcdError(f"no images in {folder}")
    ids = [p.stem for p in paths]
    seen: dict[str, Path] = {}
    for i, p in zip(ids, paths):
        if i in seen:
            raise RdcdError(f"duplicate image id {i!r} in {folder}: {seen[i].name} and {p.name}")
        seen[i] = p
    return Split(ids, paths)


def read_csv_rows(path: str | os.PathLike, columns: tuple[str, ...], min_columns: int | None = None,
                  header: str = "optional") -> list[tuple[int, list[str]]]:
    """Rows of a CSV whose header names ``columns``; returns (line number, cells).

    ``header``: ``"optional"`` (a first row naming ``columns`` is skipped) or ``"required"`` (the first row
    must name them: a foreign header such as ``query,reference`` is refused, never read as data). Quoted
    cells may hold commas, quotes and newlines. Raises a one-line :class:`RdcdError` for unreadable files,
    a wrong header, wrong column counts or bad encoding.
    """
    path = Path(path)
    if not path.is_file():
        raise RdcdError(f"CSV not found: {path}")
    min_columns = min_columns or len(columns)
    expected = ",".join(columns)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, strict=True)
            first, start = True, 1
            for row in reader:
                lineno, start = start, reader.line_num + 1  # the line the record starts on
                if not row or all(not c.strip() for c in row):
                    continue
                cells = [c.strip() for c in row]
                if first:
                    first = False
                    if [c.lower() for c in cells] == list(columns):
                        continue
                    if header == "required":
                        raise RdcdError(f"{path}:{lineno}: expected the header {expected}, got "
                                        f"{','.join(cells)[:80]!r}")
                if not (min_columns <= len(cells) <= len(columns)):
                    raise RdcdError(f"{path}:{lineno}: expected {len(columns)} columns "
                                    f"({expected}), got {len(cells)}: {','.join(cells)[:80]!r}")
                rows.append((lineno, cells + [""] * (len(columns) - len(cells))))
    except UnicodeDecodeError:
        raise RdcdError(f"{path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise RdcdError(f"{path}: malformed CSV: {exc}") from None
    if first and header == "required":
        raise RdcdError(f"{path} is empty: expected the header {expected}")
    return rows


def read_ground_truth(path: str | os.PathLike) -> tuple[list[tuple[str, str]], set[str]]:
    """Return (true pairs, every query id listed). Empty reference ids mark queries without a match.

    The header ``query_id,reference_id`` is required (as in DISC2021's ``public_ground_truth.csv``): a file
    with another first row would otherwise lose or invent a pair."""
    pairs: list[tuple[str, str]] = []
    listed: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for lineno, (q, r) in read_csv_rows(path, ("query_id", "reference_id"), min_columns=1, header="required"):
        if not q:
            raise RdcdError(f"{path}:{lineno}: empty query_id")
        listed.add(q)
        if r and (q, r) not in seen:
            seen.add((q, r))
            pairs.append((q, r))
    return pairs, listed


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a CSV atomically with the csv module (any id survives: commas, quotes, newlines)."""
    from rdcd.fsutil import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
    return Path(path)


def load_benchmark(root: str | os.PathLike, gt_path: str | os.PathLike | None = None) -> Benchmark:
    root = Path(root)
    if not root.is_dir():
        raise RdcdError(f"benchmark not found: {root}")
    refs = _split(root / "references", True)
    queries = _split(root / "queries", True)
    training = _split(root / "training", False)
    if gt_path is None:
        found = [root / n for n in GT_NAMES if (root / n).exists()]
        if not found:
            raise RdcdError(f"no ground truth in {root} (expected {GT_NAMES[0]})")
        gt_path = found[0]
    pairs, listed = read_ground_truth(gt_path)
    qids, rids = set(queries.ids), set(refs.ids)
    bad_q = sorted(listed - qids)
    if bad_q:
        raise RdcdError(f"{gt_path}: {len(bad_q)} query ids match no file in {root / 'queries'}, e.g. {bad_q[:3]}")
    bad_r = sorted({r for _, r in pairs} - rids)
    if bad_r:
        raise RdcdError(f"{gt_path}: {len(bad_r)} reference ids match no file in {root / 'references'}, "
                        f"e.g. {bad_r[:3]}")
    return Benchmark(root, refs, queries, training, pairs, Path(gt_path))
