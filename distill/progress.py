"""Progress of a training run: the rich progress bar (off a terminal, log lines replace it), ETA text and
the ``metrics.jsonl`` log (rank 0, one JSON object a line)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def show_progress(cfg, ctx) -> bool:
    """A progress bar: ``cfg.progress``, or by default when stderr is a terminal (``RDCD_PROGRESS=1``
    forces it); rank 0 only."""
    show = cfg.progress
    if show is None:
        show = sys.stderr.isatty() or os.environ.get("RDCD_PROGRESS") == "1"
    return bool(show and ctx.is_main)


def progress_bar(show: bool, extra: bool = True):
    """A rich progress bar (losses, img/s, ETA); disabled unless ``show``."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        cols.append(TextColumn("{task.fields[info]}"))
    return Progress(*cols, disable=not show, console=Console(stderr=True), transient=False)


def hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (opened on the first record; only where ``enabled``)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._fh = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", buffering=1)
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
