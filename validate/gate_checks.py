"""What the gate checks before it evaluates anything (minutes of work): its settings, its outputs, the bench
JSONs to merge, and that the manifest has something to gate. No torch here."""

from __future__ import annotations

import math

from rdcd import cli
from rdcd.errors import GateFailed, RdcdError


def check_gate_inputs(a, manifest) -> list[dict]:
    """Raise before any evaluation; returns the loaded ``--bench-json`` records."""
    from rdcd.validate import report as rep
    from rdcd.manifest import DROP_TYPES, QUANTIZED, TARGETS

    if not (math.isfinite(a.max_drop) and a.max_drop >= 0):
        raise RdcdError(f"--max-drop must be a finite number >= 0, not {a.max_drop}")
    if a.drop_type not in DROP_TYPES:  # the command line's choices; GateConfig built in Python is checked here
        raise RdcdError(f"--drop-type must be {' or '.join(DROP_TYPES)}, not {a.drop_type!r}")
    unknown = [t for t in a.require if t not in TARGETS]
    if unknown:
        raise RdcdError(f"--require {', '.join(map(str, unknown))}: not a target ({', '.join(TARGETS)})")
    for name, low in (("k", 1), ("batch_size", 1), ("threads", 1), ("latency_iters", 1), ("warmup", 0)):
        value = getattr(a, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RdcdError(f"--{name.replace('_', '-')} must be an integer >= {low}, not {value!r}")
    if a.score_norm:
        from rdcd.validate.search import ScoreNorm

        ScoreNorm.parse(a.score_norm)
    if a.report:
        rep.require_plotting()
        cli.writable_dir(a.report, "--report", clean=True)
    devices = [rep.load_bench_json(f) for f in a.bench_json]
    for d in devices:  # a bench JSON that matches nothing (or another file of the same name) fails now
        rep.match_rows([art.to_dict() for art in manifest.artifacts], d, base=manifest.dir)
    if not a.allow_empty and not any(art.quantized for art in manifest.artifacts):
        raise GateFailed(f"nothing to gate: {manifest.path} has no INT8 artifact (precision "
                         f"{', '.join(QUANTIZED)}); pass --allow-empty to evaluate it anyway")
    return devices
