"""Shared command-line plumbing: one-line errors, exit codes 0 / 1 (gate failed) / 2 (bad usage or input)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from rdcd.errors import RdcdError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with a single line on bad usage (argparse already uses 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point, turning known failures into one line on stderr and an exit code."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "rdcd"
    try:
        code = main(argv)
        return 0 if code is None else int(code)
    except RdcdError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug, not a user error: keep the traceback only when asked
        if os.environ.get("RDCD_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (set RDCD_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 3


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss", "faiss.loader", "nncf", "coremltools", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
