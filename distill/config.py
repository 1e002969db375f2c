"""The settings of one training run (:class:`TrainConfig`) and their checks.

``validate`` refuses, with one line, every value the trainer cannot use; the command line already
rejects negative counts and sizes at parse time (``rdcd.cli.positive_int`` and friends), this
catches what a parser type cannot (lower bounds above 1, open intervals, combinations) and the
same values when :class:`TrainConfig` is built in Python.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from rdcd.distill import augment
from rdcd.distill.heads import HeadConfig
from rdcd.errors import RdcdError

#: Settings that may differ between a run and its ``--resume`` (everything else must match). A larger
#: ``max_steps`` / ``epochs`` extends a run (finished or not); the cosine schedule then spans the new length.
RESUMABLE_CHANGES = {"out", "resume", "ckpt_every", "workers", "device", "threads", "eval_benchmark", "eval_every",
                     "eval_at_start", "log_every", "cache", "progress", "max_steps", "epochs", "export_momentum"}

BN_MODES = ("train", "frozen")

#: float settings that must be finite and > 0 (flag, field)
_POSITIVE = (("--moco-temp", "moco_temp"), ("--rsd-temp", "rsd_temp"), ("--infonce-temp", "infonce_temp"))


@dataclasses.dataclass
class TrainConfig:
    train_dir: str | list[str] = ""  # one folder or several
    out: str = ""
    exclude_benchmark: str | list[str] | None = None  # benchmark folder(s) whose source images are left out
    max_images: int | None = None  # a deterministic subset of the training images (sha1 of the names)
    mode: str = "rdcd"  # rdcd | baseline
    recipe: str = "small"
    backbone: str = "efficientnet_lite0"
    dim: int = 128
    input_size: int = 224
    pretrained: bool = True
    backbone_weights: str | None = None  # a timm ImageNet checkpoint file for the backbone (verified)
    teacher: str = "sscd-onnx"
    teacher_size: int | None = None  # default: the student's input size (the paper's teacher sees the same tensor)
    batch_size: int = 32  # global, across processes
    lr: float | None = None  # absolute; default base_lr * batch_size / 256
    base_lr: float = 1.0
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-6
    epochs: int = 100
    max_steps: int | None = None
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    clip_grad: float | None = None
    bn: str = "train"  # train: batch statistics, running statistics updated | frozen: eval mode, ImageNet's kept
    train_blocks: int | None = None  # fine-tune only the last N backbone stages (+ its head conv); None: all
    head_steps: int = 0  # rdcd: head distillation on cached features before the full steps (rdcd.distill.heads)
    heads: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(HeadConfig()))
    backbone_lr_mult: float = 1.0  # backbone lr = lr x this (the random heads learn at the full lr)
    queue_size: int = 2048  # MoCo key queue
    rsd_queue_size: int = 4096  # teacher-feature queue
    moco_momentum: float = 0.99
    moco_temp: float = 0.07
    rsd_temp: float = 0.04
    rsd_weight: float = 1.0
    moco_weight: float = 1.0
    hn_weight: float = 5.0
    hn_ramp_steps: int = 0  # the hard-negative weight ramps linearly from 0 over these steps
    moco_momentum_end: float | None = None  # cosine schedule of the momentum to this value (None: constant)
    feature_weight: float = 0.0  # + weight x (1 - cos(student 512-d, teacher)) on view A
    rsd_positive: bool = False  # the current teacher feature as the first RSD column
    export_momentum: str = "auto"  # auto: the momentum encoder when it scores higher on eval_benchmark | never | always
    infonce_temp: float = 0.05  # baseline
    entropy_weight: float = 30.0  # baseline
    canvas: int | None = None  # PIL-stage canvas size; default: the view size
    overlays: bool = True
    aug: dict = dataclasses.field(default_factory=lambda: augment.AugConfig().to_dict())
    cache: str | None = None
    cache_views: int = 4
    ckpt_every: int = 500
    workers: int = 2
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA, off on CPU
    seed: int = 0
    threads: int | None = None
    eval_benchmark: str | None = None
    eval_every: int = 0
    eval_at_start: bool = False
    log_every: int = 10
    progress: bool | None = None  # rich progress bar; None: when stderr is a terminal
    resume: bool = False

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
        if self.mode not in ("rdcd", "baseline"):
            raise RdcdError(f"unknown --mode {self.mode!r}: use rdcd or baseline")
        checks = [("--dim", self.dim, 1), ("--input-size", self.input_size, 32), ("--batch-size", self.batch_size, 2),
                  ("--queue-size", self.queue_size, 1), ("--rsd-queue-size", self.rsd_queue_size, 1),
                  ("--ckpt-every", self.ckpt_every, 1), ("--epochs", self.epochs, 1), ("--cache-views", self.cache_views, 1),
                  ("--log-every", self.log_every, 1), ("--workers", self.workers, 0), ("--seed", self.seed, 0),
                  ("--head-steps", self.head_steps, 0), ("--hn-ramp-steps", self.hn_ramp_steps, 0),
                  ("--eval-every", self.eval_every, 0)]
        optional = [("--teacher-size", self.teacher_size, 32), ("--max-steps", self.max_steps, 0 if self.head_steps else 1),
                    ("--warmup-steps", self.warmup_steps, 0), ("--train-blocks", self.train_blocks, 0),
                    ("--max-images", self.max_images, 1), ("--canvas", self.canvas, 32), ("--threads", self.threads, 1)]
        for flag, value, low in checks + [c for c in optional if c[1] is not None]:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RdcdError(f"{flag} must be an integer, got {value!r}")
            if value < low:
                raise RdcdError(f"{flag} must be at least {low}, got {value}")
        for f in dataclasses.fields(self):  # every number: finite (no nan / inf from a config or the parser)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RdcdError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for flag, value in (("--lr", self.lr), ("--base-lr", self.base_lr)) + tuple(
                (flag, getattr(self, name)) for flag, name in _POSITIVE):
            if value is not None and not value > 0:
                raise RdcdError(f"{flag} must be a positive number, got {value}")
        for flag, value in (("--backbone-lr-mult", self.backbone_lr_mult), ("--weight-decay", self.weight_decay),
                            ("--warmup-epochs", self.warmup_epochs), ("--rsd-weight", self.rsd_weight),
                            ("--moco-weight", self.moco_weight), ("--hn-weight", self.hn_weight),
                            ("--feature-weight", self.feature_weight), ("--entropy-weight", self.entropy_weight),
                            ("--sgd-momentum", self.sgd_momentum)):
            if not value >= 0:
                raise RdcdError(f"{flag} must be >= 0, got {value}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise RdcdError(f"--clip-grad must be a positive number, got {self.clip_grad}")
        if not 0 <= self.moco_momentum < 1:
            raise RdcdError(f"--moco-momentum must be in [0, 1), got {self.moco_momentum}")
        if self.export_momentum not in ("auto", "never", "always"):
            raise RdcdError(f"--export-momentum must be auto, never or always, got {self.export_momentum!r}")
        if self.bn not in BN_MODES:
            raise RdcdError(f"unknown --bn {self.bn!r}: use one of {', '.join(BN_MODES)}")
        if self.head_steps and self.mode != "rdcd":
            raise RdcdError("--head-steps needs --mode rdcd (the heads learn from cached teacher features)")
        if self.head_steps and self.cache_views < 2:
            raise RdcdError("--head-steps needs --cache-views of at least 2 (MoCo contrasts two cached views of an image)")
        if self.moco_momentum_end is not None and not 0 <= self.moco_momentum_end < 1:
            raise RdcdError(f"--moco-momentum-end must be in [0, 1), got {self.moco_momentum_end}")
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
