"""What rdcd-quantize checks before any work, and where its temporaries live.

* argparse types for its numbers (``--max-drop`` in [0, 1), NaN refused), the options of ``quantize``;
* the export folder: writable, the leftovers of killed runs (``kill -9``) removed;
* the FP32 ONNX model: a readable model, not random bytes, an empty file or a truncated copy;
* the work folder, named with :func:`rdcd.fsutil.temp_prefix`, which also holds the temporaries of the
  libraries (ONNX Runtime's, NNCF's and Core ML Tools' ``tempfile`` use), so nothing is left behind.

No torch here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

from rdcd import cli
from rdcd.errors import RdcdError
from rdcd.fsutil import sha256, temp_prefix
from rdcd.errors import printable
from rdcd.quantize.onnx_ptq import ENGINES, METHODS

log = logging.getLogger(__name__)

WORK = "quantize-work"


#: argparse ``type=`` of ``--max-drop``: a µAP drop in [0, 1)
drop_fraction = cli.number(float, 0.0, "a µAP drop in [0, 1)", below=1.0)


#: the values :class:`rdcd.quantize.QuantizeRecipe` takes (``rdcd-quantize``'s choices)
METHOD_CHOICES = ("auto", *METHODS)
ENGINE_CHOICES = ("auto", *ENGINES)
REDUCE_RANGES = ("auto", "first", "all", "none")


def check_options(method: str, reduce_range: str, engine: str, max_drop: float) -> None:
    """The options of :func:`rdcd.quantize.quantize` (the API, also used by ``rdcd-export --int8``)."""
    if method not in METHOD_CHOICES:
        raise RdcdError(f"unknown calibration method {method!r}: choose from {', '.join(METHOD_CHOICES)}")
    if reduce_range not in REDUCE_RANGES:
        raise RdcdError(f"reduce_range must be {', '.join(REDUCE_RANGES)}, not {reduce_range!r}")
    if engine not in ENGINE_CHOICES:
        raise RdcdError(f"unknown engine {engine!r}: choose from {', '.join(ENGINE_CHOICES)}")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and 0 <= max_drop < 1):
        raise RdcdError(f"--max-drop must be in [0, 1), got {max_drop}")


def prepare_export_dir(directory: str | os.PathLike) -> Path:
    """Prove ``directory`` writable and remove the temporaries of killed rdcd runs in it."""
    return cli.writable_dir(directory, "export folder", clean=True)


@contextlib.contextmanager
def work_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """A temporary work folder in ``directory`` (``.quantize-work.rdcd-<pid>.*``), removed on exit; while it
    exists the libraries' temporary files go there too, so a later run removes them after a ``kill -9``."""
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=temp_prefix(WORK), dir=directory) as work:
        tempfile.tempdir = work
        try:
            yield Path(work)
        finally:
            tempfile.tempdir = previous


def check_onnx(path: str | os.PathLike, recorded_sha256: str | None = None) -> Path:
    """``path`` is a readable ONNX model that ONNX Runtime loads and runs on uint8 NHWC input (the export contract),
    or RdcdError naming the file."""
    path = Path(path)
    name = printable(path)
    hint = "re-run rdcd-export --target onnx"
    if not path.is_file():
        raise RdcdError(f"FP32 ONNX model {name} is not a file: {hint}")
    if path.stat().st_size == 0:
        raise RdcdError(f"FP32 ONNX model {name} is empty (0 bytes): {hint}")
    try:
        import onnx
        import onnxruntime  # noqa: F401 - both needed: one line naming the missing one

        from rdcd.validate.runtimes import OnnxRuntimeRunner
    except ImportError as exc:
        from rdcd.errors import MissingDependency

        raise MissingDependency(exc.name or "onnx", "pip install 'rdcd[onnx]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
        if not (proto.graph.node and proto.graph.input and proto.graph.output):
            raise ValueError("no graph (nodes, inputs and outputs) in the file")
        onnx.checker.check_model(proto)
        OnnxRuntimeRunner(path, threads=1, reference=True)  # the runner every stage uses: loads, takes uint8
    except MemoryError:
        raise
    except RdcdError as exc:  # the runner's own line (no input named image of uint8, say)
        raise RdcdError(f"FP32 ONNX model {name}: {exc}: {hint}") from None
    except Exception as exc:  # onnx, protobuf and onnxruntime raise many types for a damaged file
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        changed = ""
        if recorded_sha256 and sha256(path) != recorded_sha256:
            changed = "; it has changed since rdcd-export wrote it (sha256 differs from the manifest's)"
        raise RdcdError(f"FP32 ONNX model {name} is not a readable ONNX model ({type(exc).__name__}: {why}){changed}: "
                        f"{hint}") from None
    return path
