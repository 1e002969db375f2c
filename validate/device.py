"""What machine a measurement ran on (CPU, board, Jetson power mode, load), read without extra packages.
**No torch**: the bench, the gate and the sweep record it beside their numbers."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def device_info() -> dict:
    """What machine this is, as far as it can be read without extra packages."""
    info = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = Path("/proc/device-tree/model")
    if model.exists():  # Jetson and other ARM boards
        info["board"] = model.read_text(errors="ignore").strip("\x00 \n")
    nvp = Path("/etc/nvpmodel.conf")
    if nvp.exists():
        info["power_mode"] = _jetson_power_mode()
    if platform.system() == "Darwin":
        info["mac_ver"] = platform.mac_ver()[0]
    return info


def _jetson_power_mode() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
            return " ".join(out.split())
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def load_average() -> float | None:
    """The 1-minute load average when the OS reports one: other work on the machine skews latency."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
