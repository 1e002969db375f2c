"""User-facing errors: each becomes one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import os


class RdcdError(Exception):
    """Bad input or an environment problem the user can fix. Exit code 2."""

    exit_code = 2


class GateFailed(RdcdError):
    """A quality gate did not hold (INT8 drop too large, parity too low). Exit code 1."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) as an exception: like Ctrl-C it passes ``except Exception`` so that
    ``finally`` blocks and checkpoint handlers run; the command exits 128 + the signal number."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def printable(path) -> str:
    """``path`` as text that can always be printed or written as UTF-8 (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class ImageReadError(RdcdError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, path, reason: str):
        self.path = printable(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class MissingDependency(RdcdError):
    """An optional runtime or library is not installed."""

    def __init__(self, package: str, hint: str | None = None):
        self.package = package
        msg = f"{package} is not installed"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class RuntimeUnavailable(RdcdError):
    """A runtime that cannot run on this machine (Core ML off macOS, TensorRT without a GPU).

    Reports list such artifacts as "not checkable here" with this message as the reason; they
    never count as passing.
    """
