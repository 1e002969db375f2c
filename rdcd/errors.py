"""User-facing errors: each becomes one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations


class RdcdError(Exception):
    """Bad input or an environment problem the user can fix. Exit code 2."""

    exit_code = 2


class GateFailed(RdcdError):
    """A quality gate did not hold (INT8 drop too large, parity too low). Exit code 1."""

    exit_code = 1


class ImageReadError(RdcdError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
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
