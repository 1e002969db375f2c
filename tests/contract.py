"""Harness of the contract tests (``tests/test_contract_*.py``): run a real command, check its contract.

Every command keeps: exit 0 success, 1 a gate failed, 2 bad usage or bad input (one line
``<prog>: error: ...``, no traceback), 130 / 143 after SIGINT / SIGTERM; never 3 (an internal
error is a bug), never a half-written output or a temporary left behind.

``run_cli`` runs the installed console script (``.venv/bin/rdcd-*``) in a subprocess, so exit codes,
stderr, signals and resource limits are the real ones. ``Case`` rows make the modules table-driven.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ": error: " in ln or "internal error" in ln]


@dataclasses.dataclass
class Case:
    """One row: ``argv`` (a callable of the test's paths, or a list), the exit code and a message fragment."""

    id: str
    argv: Callable[[dict], Sequence[str]] | Sequence[str]
    code: int = 2
    says: str = ""
    #: paths (relative to the test's tmp dir) that must not exist afterwards: no partial output
    absent: Sequence[str] = ()

    def args(self, paths: dict) -> list[str]:
        argv = self.argv(paths) if callable(self.argv) else self.argv
        return [str(a) for a in argv]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", RDCD_DEBUG="")
    e.pop("RDCD_DEBUG")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(prog: str, argv: Sequence[str], *, timeout: float = 600, fsize: int | None = None,
            cwd: Path | None = None, **extra_env) -> Result:
    """Run ``prog`` (e.g. ``rdcd-validate``); ``fsize`` caps every file it writes (bytes), so writing past
    it fails like a full disk (EFBIG; SIGXFSZ is ignored as a shell with ``ulimit -f`` would)."""
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    p = subprocess.run([str(BIN / prog), *map(str, argv)], capture_output=True, text=True,
                       errors="backslashreplace", timeout=timeout, env=env(**extra_env),
                       preexec_fn=limit, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


def start_cli(prog: str, argv: Sequence[str], log: Path, **extra_env) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen([str(BIN / prog), *map(str, argv)], stdout=fh, stderr=subprocess.STDOUT,
                            env=env(**extra_env))


def wait_for(predicate: Callable[[], bool], timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode} before the condition held")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def assert_contract(r: Result, code: int, says: str = "", prog: str | None = None) -> None:
    """Exit ``code``; for 1/2 exactly one error line (containing ``says``), never a traceback."""
    detail = f"exit {r.code}, stderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, detail
    assert "internal error" not in r.stderr, detail
    assert r.code == code, detail
    if code in (1, 2):
        lines = r.error_lines
        assert len(lines) == 1, detail
        if prog:
            assert lines[0].startswith(f"{prog}: error: "), detail
        if says:
            assert says.lower() in lines[0].lower(), f"expected {says!r} in the error line; {detail}"


def leftovers(root: Path) -> list[Path]:
    """Temporaries rdcd writes (``.<name>.rdcd-<pid>.*``, ``*.tmp*``) still present under ``root``."""
    return [p for p in Path(root).rglob(".*") if ".rdcd-" in p.name or ".tmp" in p.name]


def non_utf8_name(folder: Path, stem: bytes = b"caf\xe9", suffix: bytes = b".jpg") -> Path:
    """A real JPEG whose file name is not valid UTF-8 (Latin-1 bytes), as found on old archives."""
    import numpy as np
    from PIL import Image

    path = os.fsdecode(os.path.join(os.fsencode(folder), stem + suffix))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path, "JPEG")
    return Path(path)


def unwritable_dir(tmp: Path) -> Path:
    """A folder path no process can create or write, for root too: its parent is a regular file."""
    blocker = tmp / "not-a-folder"
    blocker.write_text("a file where a folder is expected\n")
    return blocker / "out"
