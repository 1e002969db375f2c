"""``rdcd-distill``: train an RDCD student (or the contrastive-only baseline) from a frozen SSCD teacher.

Examples::

    rdcd-distill --train-dir ../shared/data/train-pool --exclude-benchmark runs/bench-pool \\
        --dim 128 --input-size 160 --teacher-size 224 --max-steps 1500 --cache runs/cache --out runs/rdcd-128
    torchrun --nproc-per-node 4 -m rdcd.distill.cli --recipe paper --train-dir DISC/train --out runs/paper
    rdcd-distill ... --out runs/rdcd-128 --resume          # continue after an interruption (Ctrl-C saves a checkpoint)
    rdcd-distill ... --out runs/rdcd-128 --max-steps 3000  # extend a finished run from its last checkpoint

Recipes set defaults that explicit flags override: ``small`` (default; CPU-sized queues of 2,048 keys and
4,096 teacher features, global batch 32) and ``paper`` (RDCD's: queues of 65,536, batch 256, 224 px,
100 epochs, 5 warm-up epochs, base lr 1.0 at batch 256).

The options are generated from the fields of :class:`rdcd.distill.config.TrainConfig` (and the
``--head-*`` ones from :class:`rdcd.distill.heads.HeadConfig`): each default, help text and bound is
written once, on its field.

Exit codes: 0 done (or nothing left to do), 1 training diverged (non-finite loss; the last good
checkpoint is kept), 2 bad usage or input (checked before any work; a full disk), 130 / 143 stopped
by SIGINT / SIGTERM after writing a checkpoint of the current step (continue with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from rdcd import cli
from rdcd.distill.config import GROUPS, RECIPE_FIELDS, RECIPES, TrainConfig, from_options

#: The HeadConfig fields with a ``--head-*`` option, and the group they are listed in.
_HEAD_OPTIONS = ("mode", "init", "hn_weight", "lr", "batch_size")
_HEAD_GROUP = GROUPS[4]


def _recipe_help(name: str) -> str:
    return "recipe " + ", ".join(f"{r} {RECIPES[r].get(name, _default(name))}" for r in sorted(RECIPES))


def _default(name: str):
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def _add_option(group, f: dataclasses.Field, dest: str, recipe: bool = False) -> None:
    """One option from a dataclass field: flag, parser type (from the annotation and ``min``), default
    (the field's; ``None`` for a recipe setting, filled in by :func:`rdcd.distill.config.from_options`)
    and help (+ the default)."""
    m = f.metadata
    kw: dict = {"dest": dest}
    default = m.get("cli_default", None if recipe else f.default)
    ann = str(f.type)
    helptext = m.get("help")
    shown = None
    if ann.startswith("bool"):
        if f.default is None:
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kw.update(action="store_false" if f.default else "store_true")
    else:
        if m.get("action"):
            kw["action"] = m["action"]
        if m.get("required"):
            kw["required"] = True
        else:
            kw["default"] = default
        if ann.startswith("int"):
            kw["type"] = cli.positive_int if m.get("min", 0) >= 1 else cli.nonnegative_int
        elif ann.startswith("float"):
            kw["type"] = cli.nonnegative_float
        for key in ("choices", "metavar"):
            if m.get(key) is not None:
                kw[key] = m[key]
        if recipe:
            shown = _recipe_help(f.name)
        elif f.default is not None and f.default != "" and not m.get("required") and \
                "default" not in (helptext or "").lower():
            shown = f"default {f.default}"
    if shown:
        helptext = f"{helptext} ({shown})" if helptext else shown
    group.add_argument(m.get("flag") or "--" + f.name.replace("_", "-"), help=helptext, **kw)


def build_parser() -> cli.ArgumentParser:
    from rdcd.distill.heads import HeadConfig

    p = cli.ArgumentParser(prog="rdcd-distill", description=__doc__.split("\n\n")[0],
                           epilog="See docs/reports/distill.md for a measured CPU run.",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            _add_option(groups[f.metadata["group"]], f, f.name, recipe=f.name in RECIPE_FIELDS)
        if f.name == "bn":
            groups[f.metadata["group"]].add_argument("--freeze-bn", action="store_true", help="same as --bn frozen")
    for f in dataclasses.fields(HeadConfig):
        if f.name in _HEAD_OPTIONS:
            _add_option(groups[_HEAD_GROUP], f, "head_" + f.name)
    groups["run"].add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    values = vars(a).copy()
    if values.pop("freeze_bn", False):
        values["bn"] = "frozen"
    return from_options(values, {k: values["head_" + k] for k in _HEAD_OPTIONS})


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cli.setup_logging(a.verbose)
    from rdcd.distill import preflight

    exclude = preflight.check_inputs(a.train_dir, a.exclude_benchmark, a.eval_benchmark)  # before torch loads
    from rdcd.distill import distill
    from rdcd.model import backbone_info

    backbone_info(a.backbone)  # unknown backbone: one line before anything heavy
    from rdcd.distill.checkpoint import AlreadyDone

    cfg = config_from_args(a)
    cfg.validate()
    import os

    try:
        result = distill(cfg, exclude)
    except AlreadyDone as done:
        if os.environ.get("RANK", "0") == "0":
            print(f"rdcd-distill: {done}", file=sys.stderr)
            print(json.dumps({"out": cfg.out, "steps": done.step, "already_done": True}))
        return 0
    if os.environ.get("RANK", "0") != "0":
        return 0
    summary = {"out": cfg.out, **{k: result["result"][k] for k in ("steps", "epochs", "train_img_per_s")}}
    if result["result"].get("eval"):
        summary["eval"] = result["result"]["eval"][-1]
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
