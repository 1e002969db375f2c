"""The one check of a settings dataclass against its fields' metadata (:class:`~rdcd.distill.config.TrainConfig`,
:class:`~rdcd.distill.heads.HeadConfig`): ``min`` (an integer lower bound), ``check`` (``positive``, ``nonneg``,
``unit`` = [0, 1), ``fraction`` = [0, 1]), ``choices``; every float finite. Messages name the field's option."""

from __future__ import annotations

import dataclasses
import math

from rdcd.errors import RdcdError

CHECKS = {"positive": (lambda v: v > 0, "a positive number"), "nonneg": (lambda v: v >= 0, ">= 0"),
          "unit": (lambda v: 0 <= v < 1, "in [0, 1)"), "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]")}


def flag(f: dataclasses.Field) -> str:
    """The option that sets field ``f`` (its ``flag`` metadata, else ``--field-name``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_fields(settings, minimum: dict[str, int] | None = None) -> None:
    """Raise :class:`RdcdError` (one line) for the first field of ``settings`` outside its metadata's bounds;
    ``minimum`` overrides a field's ``min`` (a bound that depends on another setting)."""
    for f in dataclasses.fields(settings):
        value, name = getattr(settings, f.name), flag(f)
        if value is None and f.default is None:
            continue
        low = (minimum or {}).get(f.name, f.metadata.get("min"))
        if low is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RdcdError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise RdcdError(f"{name} must be at least {low}, got {value}")
        if isinstance(value, float) and not math.isfinite(value):  # no nan / inf from a config or the parser
            raise RdcdError(f"{name} must be a finite number, got {value}")
        check = f.metadata.get("check")
        if check is not None and not CHECKS[check][0](value):
            raise RdcdError(f"{name} must be {CHECKS[check][1]}, got {value}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise RdcdError(f"unknown {name} {value!r}: use one of {', '.join(map(str, choices))}")
