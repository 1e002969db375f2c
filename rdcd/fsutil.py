"""Atomic file writing and hashing: an interrupted run never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it into place atomically.

    Works for files and for directories (``.mlpackage``, OpenVINO folders): whatever the caller
    creates at the temporary path replaces ``path`` in one rename. On error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.stem), suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise FileNotFoundError(f"nothing was written to {tmp_path}")
        if tmp_path.is_file():
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get normal permissions
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            if tmp_path.is_dir():
                shutil.rmtree(tmp_path, ignore_errors=True)
            else:
                tmp_path.unlink()


#: Every temporary rdcd writes next to its outputs is named ``.<what>.rdcd-<pid>.<random>``, so a later
#: run can tell the leftovers of a killed process (``kill -9``, power loss) from a live one's work.
_TEMP_MARK = ".rdcd-"


def temp_prefix(what: str) -> str:
    """Prefix for a temporary file or folder (``tempfile.mkstemp/TemporaryDirectory(prefix=...)``)."""
    return f".{what}{_TEMP_MARK}{os.getpid()}."


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporaries of rdcd processes that no longer run; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in (directory.rglob(".*") if recursive else directory.glob(".*")):
        pid = _owner_pid(p.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _owner_pid(name: str) -> int | None:
    if not name.startswith(".") or _TEMP_MARK not in name:
        return None
    head = name.rsplit(_TEMP_MARK, 1)[1].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON text rdcd writes (numpy scalars and arrays, paths included)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json_text(obj))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file rdcd reads (manifest, report, bench result, index): its value, or one line naming the file
    (:class:`~rdcd.errors.RdcdError`, exit 2) when it is not JSON or cannot be read."""
    from rdcd.errors import RdcdError

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RdcdError(f"malformed {path}: {exc}") from None
    except OSError as exc:
        raise RdcdError(f"cannot read {path}: {exc.strerror or exc}") from None


def _json_default(obj: Any):
    import numpy as np

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of every file in a directory (sorted relative paths and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def size_bytes(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def artifact_files(path: str | os.PathLike) -> list[Path]:
    """The files a model artifact consists of: an OpenVINO ``.xml`` needs its ``.bin`` (same name)."""
    path = Path(path)
    bin_ = path.with_suffix(".bin")
    return [path, bin_] if path.suffix == ".xml" and bin_.is_file() else [path]


def artifact_sha256(path: str | os.PathLike) -> str:
    """The content key of an artifact: its sha256, or for several files (OpenVINO ``.xml`` + ``.bin``) the
    sha256 over their sha256s, so two IRs with the same graph but other weights differ."""
    files = artifact_files(path)
    if len(files) == 1:
        return sha256(files[0])
    return hashlib.sha256("".join(sha256(f) for f in files).encode()).hexdigest()
