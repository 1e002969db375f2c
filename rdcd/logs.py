"""Library logs in a file, rdcd's own messages on the console.

NNCF (per-node INFO lines, rich progress bars), ONNX Runtime (ANSI-coloured C++ warnings), Core ML
Tools, OpenVINO, PyTorch and Python ``warnings`` would otherwise flood a command's output and hide
rdcd's own warnings. :func:`keep_library_logs` sends their Python logging to one file (opened on
first use, appended to), captures ``warnings`` there too, and lowers ONNX Runtime's C++ logger to
errors (its C++ messages cannot be redirected from Python). :func:`library_stdout` redirects what a
library prints to stdout (NNCF's progress bars) into the same file. No torch here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Iterator

LIBRARIES = ("nncf", "openvino", "onnxruntime", "onnx_ir", "onnxscript", "coremltools", "torch", "py.warnings", "faiss",
             "faiss.loader")
_state: dict[str, Path | None] = {"path": None}


def keep_library_logs(path: str | os.PathLike | None) -> Path | None:
    """Route library logging to ``path`` (``None``: leave logging as it is; its folder must exist). Returns
    the file's path."""
    if path is None:
        return None
    from rdcd.errors import RdcdError

    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise RdcdError(f"cannot write the library log {path}: {exc.strerror or exc}") from None
    for mod in ("nncf",):  # NNCF configures its logger when imported: import first, then take it over
        with contextlib.suppress(Exception):
            importlib.import_module(mod)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
            if isinstance(h, logging.FileHandler) and h is not handler:
                h.close()
        lg.addHandler(handler)
        lg.propagate = False  # levels stay the libraries' own (raising torch's to INFO makes dynamo chatty)
    logging.captureWarnings(True)
    with contextlib.suppress(Exception):
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # errors only
    _state["path"] = path
    return path


def library_log_path() -> Path | None:
    return _state["path"]


@contextlib.contextmanager
def library_stdout() -> Iterator[None]:
    """While active, stdout goes to the library log (when one is set): for progress bars printed by a library."""
    path = _state["path"]
    if path is None:
        yield
        return
    with open(path, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        yield
