"""The settings of one training run (:class:`TrainConfig`): every default, help text and lower bound in
one place, the field itself. ``rdcd-distill``'s options are generated from these fields
(:func:`rdcd.distill.cli.build_parser`), a recipe (:data:`RECIPES`) overrides only what differs, and
:func:`from_options` turns parsed options into a config.

The config stays flat (one level of fields): ``checkpoint.pt``'s ``config``, ``train_config.json`` and
``config.json``'s ``training`` record it as it is, and ``--resume`` compares it field by field, so runs
written before keep loading. The fields are grouped (``data``, ``model``, ``optimisation``, ``losses``,
``head stage``, ``run``) by their metadata, which orders ``--help``.

``validate`` refuses, with one line, every value the trainer cannot use; the command line already
rejects negative counts and sizes at parse time (``rdcd.cli.positive_int`` and friends), this
catches what a parser type cannot (lower bounds above 1, open intervals, combinations) and the
same values when :class:`TrainConfig` is built in Python.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

from rdcd.distill import augment, losses
from rdcd.distill.fields import check_fields
from rdcd.distill.heads import HeadConfig
from rdcd.errors import RdcdError

#: Settings that may differ between a run and its ``--resume`` (everything else must match). A larger
#: ``max_steps`` / ``epochs`` extends a run (finished or not); the cosine schedule then spans the new length.
RESUMABLE_CHANGES = {"out", "resume", "ckpt_every", "workers", "device", "threads", "eval_benchmark", "eval_every",
                     "eval_at_start", "log_every", "cache", "progress", "max_steps", "epochs", "export_momentum"}

MODES = ("rdcd", "baseline")
BN_MODES = ("train", "frozen")
EXPORT_MOMENTUM = ("auto", "never", "always")

#: Recipes: what each one changes from the field defaults (``small`` is the defaults: CPU-sized queues of
#: 2,048 keys and 4,096 teacher features, global batch 32; ``paper`` is RDCD's queues of 65,536 and batch 256).
RECIPES: dict[str, dict[str, Any]] = {
    "small": {},
    "paper": {"batch_size": 256, "queue_size": 65536, "rsd_queue_size": 65536},
}
RECIPE_FIELDS = frozenset(k for r in RECIPES.values() for k in r)

#: The head stage's settings that are the full steps' own (HeadConfig field -> TrainConfig field).
HEAD_SHARED = {"steps": "head_steps", "seed": "seed", "moco_temp": "moco_temp", "rsd_temp": "rsd_temp",
               "momentum": "moco_momentum", "rsd_positive": "rsd_positive"}

GROUPS = ("data", "model", "optimisation", "losses",
          "head stage (rdcd: heads trained on cached features before the full steps)", "run")


def opt(default=None, help: str | None = None, *, group: str, factory=None, **meta):  # noqa: A002
    """A :class:`TrainConfig` field with its command-line option. ``meta``: ``min`` (int lower bound, also
    picks the parser type), ``check`` (floats: :data:`rdcd.distill.fields.CHECKS`), ``flag``,
    ``choices``, ``metavar``, ``action``, ``required``; ``cli=False``: no option."""
    meta = {"help": help, "group": group, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


D, M, O, L, H, R = GROUPS


@dataclasses.dataclass
class TrainConfig:
    # field order = the on-disk order of earlier runs; the group of each (--help) is in its metadata
    train_dir: str | list[str] = opt("", "folder of training images (unlabeled); repeat it to train on several "
                                     "folders", group=D, action="append", required=True)
    out: str = opt("", "run directory (default ./runs/<timestamp>)", group=R)
    exclude_benchmark: str | list[str] | None = opt(
        None, "leave out the images listed in BENCH/sources.csv (a benchmark built from the same folder)",
        group=D, action="append", metavar="BENCH")
    max_images: int | None = opt(None, "train on a fixed subset of N images (chosen by sha1 of the file names) of "
                                 "all --train-dir", group=D, min=1, metavar="N")
    mode: str = opt("rdcd", "rdcd: RSD + MoCo + hard negatives from the teacher; baseline: SSCD InfoNCE + entropy "
                    "only", group=M, choices=MODES)
    recipe: str = opt("small", "defaults for the settings below", group=M, choices=tuple(sorted(RECIPES)))
    backbone: str = opt("efficientnet_lite0", "efficientnet_lite0 (offline ImageNet init), efficientnet_b0, "
                        "mobilenetv3_large_100, fastvit_t12 or any timm model", group=M)
    dim: int = opt(128, "descriptor size (the paper: 64, 128, 256)", group=M, min=1)
    input_size: int = opt(224, "student input size", group=M, min=32)
    pretrained: bool = opt(True, "random init", group=M, flag="--no-pretrained")
    backbone_weights: str | None = opt(None, "timm ImageNet checkpoint (.safetensors or .pth state dict) for "
                                       "backbones without offline weights; checked on real photos before training",
                                       group=M, metavar="FILE")
    teacher: str = opt("sscd-onnx", "sscd-onnx (SSCD int8 ONNX in ONNX Runtime) | PATH.pt (SSCD TorchScript) | "
                       "PATH.onnx | timm:NAME", group=M)
    teacher_size: int | None = opt(None, "teacher input size; it sees the student's view at this size (default: "
                                   "--input-size)", group=M, min=32)
    batch_size: int = opt(32, "global batch size across processes", group=O, min=2)
    lr: float | None = opt(None, "absolute peak learning rate (overrides --base-lr)", group=O, check="positive")
    base_lr: float = opt(1.0, "peak lr at batch 256, scaled linearly", group=O, check="positive")
    sgd_momentum: float = opt(0.9, group=O, check="nonneg")
    weight_decay: float = opt(1e-6, group=O, check="nonneg")
    epochs: int = opt(100, "epochs", group=O, min=1)
    max_steps: int | None = opt(None, "stop after this many steps; the schedule then spans min(epochs, max-steps)",
                                group=O, min=0)  # at least 1 without a head stage (validate)
    warmup_epochs: float = opt(5.0, "linear warm-up", group=O, check="nonneg")
    warmup_steps: int | None = opt(None, "warm-up in steps (overrides --warmup-epochs)", group=O, min=0)
    clip_grad: float | None = opt(None, "clip the gradient norm (default: off)", group=O, check="positive")
    bn: str = opt("train", "BatchNorm in the full steps: train (batch statistics; running statistics re-estimated "
                  "on the training views) or frozen (eval mode: ImageNet's running statistics kept). Default: "
                  "frozen when the head stage runs, else train", group=O, choices=BN_MODES, cli_default=None)
    train_blocks: int | None = opt(None, "full steps fine-tune only the last N backbone stages and its head conv "
                                   "(default: all)", group=O, min=0)
    head_steps: int = opt(0, "steps of head distillation on cached backbone + teacher features of --cache-views "
                          "views per image, the backbone frozen with its ImageNet BN statistics (0: off). Needs a "
                          "feature cache (--cache, default <out>/cache); the full steps then read the teacher's "
                          "features of those K fixed views too", group=H, min=0)
    heads: dict = opt(help="head-stage settings (rdcd.distill.heads.HeadConfig; options --head-*)", group=H,
                      cli=False, factory=lambda: dataclasses.asdict(HeadConfig()))
    backbone_lr_mult: float = opt(1.0, "backbone lr = lr x this; the randomly initialised heads use the full lr",
                                  group=O, check="nonneg")
    queue_size: int = opt(2048, "MoCo key queue", group=L, min=1)
    rsd_queue_size: int = opt(4096, "teacher-feature queue for RSD", group=L, min=1)
    moco_momentum: float = opt(losses.MOCO_MOMENTUM, group=L, check="unit")
    moco_temp: float = opt(losses.MOCO_TEMP, group=L, check="positive")
    rsd_temp: float = opt(losses.RSD_TEMP, group=L, check="positive")
    rsd_weight: float = opt(1.0, group=L, check="nonneg")
    moco_weight: float = opt(1.0, group=L, check="nonneg")
    hn_weight: float = opt(losses.HN_WEIGHT, "hard-negative loss weight", group=L, check="nonneg")
    hn_ramp_steps: int = opt(0, "ramp the hard-negative weight linearly from 0 over N steps (0: full weight at "
                             "once)", group=L, min=0)
    moco_momentum_end: float | None = opt(None, "cosine schedule of the momentum encoder from --moco-momentum to "
                                          "this (default: constant)", group=L, check="unit")
    feature_weight: float = opt(0.0, "+ weight x (1 - cosine) between the student's 512-d feature and the "
                                "teacher's", group=L, check="nonneg")
    rsd_positive: bool = opt(False, "the current teacher feature as the first RSD column", group=L)
    export_momentum: str = opt("auto", "save the momentum encoder instead of the student: auto = when it scores "
                               "higher on --eval-benchmark (use a validation benchmark for that), never, always",
                               group=R, choices=EXPORT_MOMENTUM)
    infonce_temp: float = opt(0.05, "baseline InfoNCE temperature", group=L, check="positive")
    entropy_weight: float = opt(30.0, "baseline entropy (KoLeo) weight", group=L, check="nonneg")
    canvas: int | None = opt(None, "size of the square canvas the PIL stage works on (default: the view size)",
                             group=D, min=32)
    overlays: bool = opt(True, "leave out the text and emoji overlays (they need AugLy)", group=D, flag="--no-overlays")
    aug: dict = opt(help="augmentation settings (rdcd.distill.augment.AugConfig)", group=D, cli=False,
                    factory=lambda: augment.AugConfig().to_dict())
    cache: str | None = opt(None, "teacher-feature cache folder (K fixed views per image; for a slow teacher on "
                            "CPU)", group=R, metavar="DIR")
    cache_views: int = opt(4, "K, views per image in the cache", group=R, min=1)
    ckpt_every: int = opt(500, "checkpoint every N steps", group=R, min=1)
    workers: int = opt(2, "data-loader processes per training process", group=D, min=0)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)", group=R)
    amp: bool | None = opt(None, "mixed precision (default: on with CUDA, off on CPU)", group=O)
    seed: int = opt(0, group=O, min=0)
    threads: int | None = opt(None, "torch / ONNX Runtime threads per process", group=R, min=1)
    eval_benchmark: str | None = opt(None, "evaluate on this benchmark at the end", group=R, metavar="BENCH")
    eval_every: int = opt(0, "also evaluate every N steps", group=R, min=0)
    eval_at_start: bool = opt(False, "also evaluate the initial student", group=R)
    log_every: int = opt(10, "log a line every N steps when there is no progress bar", group=R, min=1)
    progress: bool | None = opt(None, "rich progress bar (default: when stderr is a terminal)", group=R)
    resume: bool = opt(False, "continue the run in --out from its checkpoint", group=R)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def t_size(self) -> int:
        return self.teacher_size or self.input_size

    @property
    def view_size(self) -> int:
        return max(self.input_size, self.t_size) if self.mode == "rdcd" else self.input_size

    @property
    def canvas_size(self) -> int:
        return self.canvas or self.view_size

    def validate(self) -> None:
        # bounds, ranges and choices from the fields' metadata (a run without a head stage needs a step)
        check_fields(self, {"max_steps": 1} if not self.head_steps else None)
        if self.head_steps and self.mode != "rdcd":
            raise RdcdError("--head-steps needs --mode rdcd (the heads learn from cached teacher features)")
        if self.head_steps and self.cache_views < 2:
            raise RdcdError("--head-steps needs --cache-views of at least 2 (MoCo contrasts two cached views of an image)")
        if not self.out:
            raise RdcdError("no --out run folder given")
        self.head_config().validate()

    def head_config(self) -> HeadConfig:
        fields = {f.name for f in dataclasses.fields(HeadConfig)}
        return HeadConfig(**{k: v for k, v in self.heads.items() if k in fields})

    @property
    def cache_dir(self) -> str | None:
        """The feature cache: ``cache``, or ``<out>/cache`` when the head stage needs one."""
        return self.cache or (str(Path(self.out) / "cache") if self.head_steps and self.mode == "rdcd" else None)


def from_options(values: dict[str, Any], heads: dict[str, Any] | None = None) -> TrainConfig:
    """A config from parsed options (``rdcd-distill``'s, or any mapping of field names): ``None`` for a
    recipe setting takes the recipe's value (else the field default); ``bn`` left out is ``frozen`` when the
    head stage runs, else ``train``; one ``train_dir`` / ``exclude_benchmark`` is stored as a string;
    ``heads`` holds the HeadConfig settings of the ``--head-*`` options (the shared ones,
    :data:`HEAD_SHARED`, come from the full steps' settings); no ``out``: ``runs/<timestamp>``."""
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    v = {k: values[k] for k in names if k in values}
    recipe = RECIPES[v.get("recipe") or "small"]
    for k in RECIPE_FIELDS:
        if v.get(k) is None:
            v[k] = recipe.get(k, names[k].default)
    if v.get("bn") is None:
        v["bn"] = "frozen" if v.get("head_steps") else "train"
    for k in ("train_dir", "exclude_benchmark"):
        if isinstance(v.get(k), (list, tuple)) and len(v[k]) == 1:
            v[k] = v[k][0]
    v["out"] = v.get("out") or f"runs/{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    shared = {h: v.get(t, names[t].default) for h, t in HEAD_SHARED.items()}
    if v.get("moco_momentum_end") is not None:
        shared["momentum_end"] = v["moco_momentum_end"]
    v["heads"] = dataclasses.asdict(HeadConfig(**{**(heads or {}), **shared}))
    return TrainConfig(**v)
