"""Shared command-line plumbing: one-line errors and the exit codes every command keeps.

0 success · 1 a gate failed · 2 bad usage or bad input (including unwritable outputs and a full
disk) · 130 / 143 interrupted by SIGINT / SIGTERM (after saving what can be saved). Anything else
is a bug: 3 with ``internal error`` and a request to report it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rdcd.errors import Interrupted, RdcdError, printable
from rdcd.fsutil import remove_stale_temps, temp_prefix

#: errno values that mean the disk (or a file size limit) is full.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def plain_text(text: str | None) -> str | None:
    """Docstring markup (reST roles, ``literals``, **bold**, a trailing ``::``) as plain terminal text."""
    if not text:
        return text
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _STRONG.sub(r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with one line and a hint on bad usage (no usage block), and shows
    descriptions and help texts written as docstrings without their markup."""

    def __init__(self, *args, **kwargs):
        for key in ("description", "epilog"):
            kwargs[key] = plain_text(kwargs.get(key))
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = plain_text(kwargs["help"])
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind, minimum, what: str, below: float | None = None):
    """An argparse ``type=``: ``kind`` (int / float) >= ``minimum`` (and < ``below``), NaN refused; ``what``
    is the one-line message's wording."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value != value or value < minimum or (below is not None and not value < below):  # NaN too
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


#: argparse ``type=`` for counts, sizes and budgets: one check, one message, everywhere.
positive_int = number(int, 1, "a positive integer")
nonnegative_int = number(int, 0, "an integer >= 0")
nonnegative_float = number(float, 0.0, "a number >= 0")


def writable_dir(path: str | os.PathLike, what: str = "output folder", clean: bool = False) -> Path:
    """Prove that ``path`` is, or can be created as, a folder where files can be written - before any work
    starts, and creating nothing (a run refused later leaves no empty folder behind). With ``clean``, the
    temporaries that killed rdcd runs left in it (and beside it) are removed."""
    path = Path(path)
    shown = printable(path)
    if path.exists() and not path.is_dir():
        raise RdcdError(f"{what} {shown} exists and is not a folder")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise RdcdError(f"{what} {shown} is not writable: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-probe"), dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RdcdError(f"{what} {shown} is not writable: {_reason(exc)}") from None
    if clean:
        _clean(path, inside=True)
    return path


def writable_file(path: str | os.PathLike, what: str = "output file", clean: bool = False) -> Path:
    """Check that ``path`` can be (re)written as a file (see :func:`writable_dir`); creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise RdcdError(f"{what} {path} is a folder, not a file")
    writable_dir(path.parent, what=f"folder of the {what}")
    if clean:
        _clean(path, inside=False)
    return path


def _clean(path: Path, inside: bool) -> None:
    """Temporaries of killed runs beside ``path`` (atomic writes put them there) and, for a folder, in it."""
    removed = remove_stale_temps(path.parent, recursive=False) if path.parent.is_dir() else []
    if inside and path.is_dir():
        removed += remove_stale_temps(path)
    if removed:
        logging.getLogger("rdcd").info("removed %d leftover temporaries of interrupted runs near %s",
                                       len(removed), printable(path))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def _reason(exc: OSError) -> str:
    if exc.errno in FULL_ERRNOS:
        return "no space left on the device (disk full or file size limit)"
    if exc.errno in _DENIED:
        return "permission denied"
    return exc.strerror or str(exc)


def describe_os_error(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    name = printable(name) if name else ""
    if exc.errno in FULL_ERRNOS:
        return f"disk full while writing {name or 'output'}: free space and run again" \
               " (completed outputs are kept; nothing half-written is left)"
    if exc.errno in _DENIED:
        return f"cannot write {name or 'an output'}: permission denied"
    return f"{name + ': ' if name else ''}{exc.strerror or exc}"


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM raises like SIGINT does, so ``finally`` blocks and checkpoint handlers run."""
    def handler(signum, frame):
        raise Interrupted(signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point, turning known failures into one line on stderr and an exit code."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "rdcd"
    try:
        with signals_as_interrupts():
            code = main(argv)
        return 0 if code is None else int(code)
    except RdcdError as exc:
        if os.environ.get("RDCD_DEBUG") and exc.__cause__ is not None:  # the library failure behind the line
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        exc = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)  # Ctrl-C
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print(f"{prog}: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the environment (disk full, permissions, a vanished file), not a bug
        if os.environ.get("RDCD_DEBUG"):
            raise
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not a user error: keep the traceback only when asked
        if os.environ.get("RDCD_DEBUG"):
            raise
        print(f"{prog}: internal error (a bug, please report it): {type(exc).__name__}: {exc} "
              "(set RDCD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss", "faiss.loader", "nncf", "coremltools", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_targets(values: Sequence[str] | None, default: Sequence[str] | None = None) -> list[str] | None:
    """``--target`` values (repeatable, comma lists, ``all``) in :data:`rdcd.manifest.TARGETS` order; ``default``
    when none is given; an unknown name is an :class:`RdcdError` (exit 2)."""
    from rdcd.manifest import TARGETS

    if not values:
        return list(default) if default is not None else None
    wanted: set[str] = set()
    for value in values:
        for t in (v.strip().lower() for v in value.split(",")):
            if t == "all":
                wanted.update(TARGETS)
            elif t in TARGETS:
                wanted.add(t)
            elif t:
                raise RdcdError(f"unknown target {t!r}: choose from {', '.join(TARGETS)}, all")
    if not wanted:
        raise RdcdError("--target is empty")
    return [t for t in TARGETS if t in wanted]
