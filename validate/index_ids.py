"""The faiss backend's label -> reference id table, compact enough for millions of references. **No torch.**

faiss stores an int64 label per vector; the index folder maps labels to reference ids in ``ids.npz``:
``labels`` (int64, ascending) and ``ids`` (the ids' UTF-8 bytes as a fixed-width ``S`` array), read with
``allow_pickle=False``. In memory the table is the same two arrays - about ``8 + len(longest id)`` bytes per
reference, where two Python dicts of a million ids took ~200 MB - and a search maps its labels back with
one ``searchsorted``. The id -> label dict that ``add`` needs (duplicate checks, ``--replace``) is built only
when asked for. Indexes written before ``ids.npz`` (``ids.json``: ``{"labels": [...], "ids": [...]}``) still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from rdcd.errors import RdcdError

IDS_FILE = "ids.npz"
LEGACY_IDS_FILE = "ids.json"


class IdTable:
    def __init__(self, labels: np.ndarray | None = None, ids: np.ndarray | None = None):
        self.labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
        self.ids = np.asarray(ids if ids is not None else [], dtype="S")
        if len(self.labels) != len(self.ids):
            raise RdcdError(f"id table: {len(self.labels)} labels but {len(self.ids)} ids")
        if len(self.labels) > 1 and not np.all(np.diff(self.labels) > 0):
            order = np.argsort(self.labels, kind="stable")
            self.labels, self.ids = self.labels[order], self.ids[order]
        self._label_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def next_label(self) -> int:
        return int(self.labels[-1]) + 1 if len(self.labels) else 0

    # -- lookups
    def label_of(self) -> dict[str, int]:
        """id -> label (built on first use: ``add`` checks new ids against it)."""
        if self._label_of is None:
            self._label_of = {i.decode("utf-8"): int(lab) for i, lab in zip(self.ids, self.labels)}
        return self._label_of

    def ids_of(self, labels: np.ndarray) -> list[str | None]:
        """The id of each label (``None`` for faiss's -1 "no result" and for labels not in the table)."""
        labels = np.asarray(labels, dtype=np.int64)
        if not len(self.labels):
            return [None] * len(labels)
        pos = np.clip(np.searchsorted(self.labels, labels), 0, len(self.labels) - 1)
        found = (self.labels[pos] == labels) & (labels >= 0)
        return [self.ids[p].decode("utf-8") if ok else None for p, ok in zip(pos.tolist(), found.tolist())]

    # -- changes
    def append(self, ids: Sequence[str]) -> np.ndarray:
        """Give ``ids`` fresh labels after the last one; returns the labels."""
        new = np.arange(self.next_label, self.next_label + len(ids), dtype=np.int64)
        enc = np.asarray([i.encode("utf-8") for i in ids], dtype="S")
        self.labels = np.concatenate([self.labels, new])
        self.ids = np.concatenate([self.ids.astype(np.result_type(self.ids, enc)), enc]) if len(self.ids) else enc
        if self._label_of is not None:
            self._label_of.update(zip(ids, new.tolist()))
        return new

    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Drop ``ids`` (all must be present); returns their labels."""
        table = self.label_of()
        gone = np.asarray([table.pop(i) for i in ids], dtype=np.int64)
        keep = ~np.isin(self.labels, gone)
        self.labels, self.ids = self.labels[keep], self.ids[keep]
        return gone

    # -- files
    def save(self, folder: Path) -> None:
        with open(folder / IDS_FILE, "wb") as fh:
            np.savez(fh, labels=self.labels, ids=self.ids)

    @classmethod
    def load(cls, folder: Path) -> "IdTable":
        path = folder / IDS_FILE
        try:
            if path.is_file():
                with np.load(path, allow_pickle=False) as data:
                    return cls(data["labels"], data["ids"])
            legacy = folder / LEGACY_IDS_FILE
            if legacy.is_file():
                table = json.loads(legacy.read_text())
                return cls([int(v) for v in table["labels"]], [str(v).encode("utf-8") for v in table["ids"]])
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise RdcdError(f"cannot read the id table of index {folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        raise RdcdError(f"index {folder} is incomplete: {IDS_FILE} is missing")
