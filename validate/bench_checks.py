"""``rdcd-bench`` checks made after the model is loaded and before anything is allocated or timed: ``--size``
against a model's fixed input size, and ``--batch-size`` against the memory this machine has. **No torch.**"""

from __future__ import annotations

import os
from pathlib import Path

from rdcd.errors import RdcdError

#: Peak memory of one image through a descriptor CNN, in multiples of its float32 input tensor (input, the
#: widest early feature maps and their ping-pong copies; EfficientNet-Lite0 / MobileNet need about 30x).
ACTIVATION_FACTOR = 48
#: Share of the available memory a bench may plan to use (the runtime, Python and the OS need the rest).
USABLE_SHARE = 0.6


def check_fixed_size(model: Path, size: int | None, fixed: int | None, where: str = "--size") -> None:
    """``size`` (from ``where``) against the input size the model file fixes (:func:`~rdcd.validate.runtimes.static_input_size`)."""
    if not (size and fixed and size != fixed):
        return
    if where == "--size":
        raise RdcdError(f"--size {size} does not match {model.name}, whose input size is fixed at {fixed} x {fixed}: "
                        f"pass --size {fixed} or leave --size out")
    raise RdcdError(f"{model.name} takes {fixed} x {fixed} inputs, but its {where} says {size}: the file is not the "
                    f"artifact that manifest describes (re-export it, or pass --size {fixed})")


def batch_bytes(batch: int, size: int) -> int:
    """Estimated peak memory of a batch: uint8 inputs (up to 8 batches of real images), the float32 copy the
    runtime makes and the activations."""
    per_image = size * size * 3
    return batch * per_image * (8 + 4 * ACTIVATION_FACTOR)


def available_bytes() -> int | None:
    """Memory this process can still use: MemAvailable, capped by a cgroup limit (containers); None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                avail = min(avail, max(0, int(limit) - int(Path(usage_f).read_text().strip())))
            break
        except (OSError, ValueError):
            continue
    return avail


def check_batch_memory(batch: int, size: int, model: Path) -> None:
    """Refuse a batch that would not fit (one line with the largest that would), instead of being OOM-killed."""
    avail = available_bytes()
    if avail is None:
        return
    need, usable = batch_bytes(batch, size), int(avail * USABLE_SHARE)
    if need > usable:
        fits = max(1, usable // batch_bytes(1, size))
        raise RdcdError(f"--batch-size {batch} at {size} x {size} needs about {need / 2**30:.1f} GiB for {model.name} "
                        f"(estimate), but only {avail / 2**30:.1f} GiB of memory is available: use --batch-size {fits} "
                        f"or less")
