"""The RDCD trainer (and its contrastive-only baseline), single process or under ``torchrun``.

One optimisation step (``mode="rdcd"``), per process, with a global batch split across ranks:

1. Both views of each image go through the kornia tensor stage on the training device. View A
   is produced at the student's input size and at the teacher's (same view); view B at the
   student's size.
2. Teacher features of view A (frozen teacher, or the teacher-feature cache); student
   ``(f, z) = student.features(view A)``; the momentum encoder (an EMA copy of the student,
   m = 0.99, updated before use, BN shuffled across ranks) encodes view B into keys.
3. loss = RSD(teacher, normalize(f); teacher queue, tau 0.04) + InfoNCE(z, key; key queue,
   tau 0.07) + 5 * hard-negative(z; key queue). Keys of the query's own image are not negatives.
4. Teacher features and keys, gathered from every rank, are enqueued (FIFO).

``mode="baseline"``: the same student sees both views and is trained with SSCD's InfoNCE over the
global batch (tau 0.05) + entropy regulariser (weight 30); no teacher, no momentum encoder.

Engineering: SGD (momentum 0.9) with linear warm-up then cosine decay, lr = base_lr x batch / 256
unless ``lr`` is given; AMP on GPU; DDP (gloo/nccl); rank 0 writes an atomic ``checkpoint.pt``
(:mod:`rdcd.distill.checkpoint`: also at the last step and on SIGINT / SIGTERM) every ``ckpt_every``
steps (student, momentum encoder, optimizer, scaler, queues, RNG states, config) and ``metrics.jsonl``;
the data order and every augmentation are functions of (seed, epoch, image), so ``resume`` continues
exactly after the last checkpoint. A non-finite loss stops the run before the optimizer touches the
weights, keeping the last good checkpoint.

This module holds the loop (:class:`Trainer`, :func:`train`); the pieces live in their own modules:
:mod:`~rdcd.distill.objectives` (the loss of each mode), :mod:`~rdcd.distill.head_stage` (feature cache
and head stage), :mod:`~rdcd.distill.evaluation` (evaluations, the network exported, what config.json
records), :mod:`~rdcd.distill.progress` (progress bar, metrics log), :mod:`~rdcd.distill.student_utils`
(BN modes, frozen stages, lr schedule, the initial student) and :mod:`~rdcd.distill.checkpoint`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdcd import cli
from rdcd.distill import augment, checkpoint, evaluation, head_stage, preflight
from rdcd.distill.cache import TeacherCache
from rdcd.distill.checkpoint import CHECKPOINT, METRICS
from rdcd.distill.config import TrainConfig
from rdcd.distill.data import (Collate, EpochBatches, ViewDataset, scan_images, steps_per_epoch, subset_images,
                               worker_init)
from rdcd.distill.dist import DistContext
from rdcd.distill.objectives import LOSSES
from rdcd.distill.progress import MetricsLog, hms, progress_bar, show_progress
from rdcd.distill.queues import FeatureQueue
from rdcd.distill.student_utils import Features, freeze_lower_stages, initial_student, lr_at, train_mode
from rdcd.errors import RdcdError
from rdcd.fsutil import write_json

log = logging.getLogger("rdcd.distill")

TRAIN_CONFIG = "train_config.json"


class TrainingDiverged(RdcdError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays. Exit code 1."""

    exit_code = 1


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, exclude: set[str] | None = None):
        cfg.validate()
        self.cfg, self.ctx = cfg, ctx
        self.exclude = exclude  # the --exclude-benchmark file names, when the caller checked the inputs
        self.device = ctx.device
        self.out = Path(cfg.out)
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or loaded
        self.eval_error: str | None = None
        self.results: dict[str, Any] = {}
        self.evals: list[dict] = []
        self.teacher = None
        self.cache: TeacherCache | None = None
        self.momentum: nn.Module | None = None
        self.moco_queue = self.rsd_queue = None
        self.cache_rate = None
        self.heads_result: dict | None = None
        self.backbone_cache: TeacherCache | None = None
        self.metrics = MetricsLog(self.out / METRICS, ctx.is_main)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16

        exclude = preflight.check(cfg, ctx.is_main, self.exclude)  # outputs writable, benchmarks usable: first
        ckpt_state = checkpoint.prepare_out_dir(cfg, self.out)
        paths = scan_images(cfg.train_dir, exclude) if ctx.is_main else None
        if paths and cfg.max_images and len(paths) > cfg.max_images:
            log.info("training on %d of %d images (--max-images)", cfg.max_images, len(paths))
            paths = subset_images(paths, cfg.max_images)
        self.paths = [Path(p) for p in ctx.broadcast_object([str(p) for p in paths] if paths else None)]
        self.n_images = len(self.paths)
        self.spe = steps_per_epoch(self.n_images, cfg.batch_size)
        if self.spe < 1:
            raise RdcdError(f"{self.n_images} training images are fewer than one batch (--batch-size {cfg.batch_size})")
        self.total_steps = min(cfg.epochs * self.spe, cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.spe)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * self.spe))
        self.warmup = min(self.warmup, self.total_steps)
        if ckpt_state is not None:
            checkpoint.check_length(self.out, ckpt_state, self.total_steps)
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256
        self.per_rank = cfg.batch_size // ctx.world
        if cfg.batch_size % ctx.world:
            raise RdcdError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({ctx.world})")

        # teacher first: its feature size is the student's 512-d feature size
        feat_dim = 512
        if cfg.mode == "rdcd":
            from rdcd.teacher import build_teacher

            self.teacher = build_teacher(cfg.teacher, size=cfg.t_size, device=str(self.device), threads=cfg.threads)
            feat_dim = int(self.teacher.dim)
        student, self.pretrained_check = initial_student(cfg, ctx, feat_dim)
        self.student = student.to(self.device).to(memory_format=torch.channels_last)
        self.frozen = freeze_lower_stages(self.student, cfg.train_blocks)
        train_mode(self.student, cfg.bn, self.frozen)
        self.model: nn.Module = Features(self.student)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.mode == "rdcd":
            self.momentum = copy.deepcopy(self.student)
            self.frozen_momentum = freeze_lower_stages(self.momentum, cfg.train_blocks)
            train_mode(self.momentum, cfg.bn, self.frozen_momentum)
            for p in self.momentum.parameters():
                p.requires_grad_(False)
            self.moco_queue = FeatureQueue(cfg.queue_size, cfg.dim, self.device, random_init=True, seed=cfg.seed)
            self.rsd_queue = FeatureQueue(cfg.rsd_queue_size, feat_dim, self.device)
        backbone = [p for p in self.student.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.student.backbone.parameters()}
        heads = [p for p in self.student.parameters() if id(p) not in ids]
        groups = [{"params": backbone, "lr_mult": cfg.backbone_lr_mult, "name": "backbone"},
                  {"params": heads, "lr_mult": 1.0, "name": "heads"}]
        self.optimizer = torch.optim.SGD(groups, lr=self.peak_lr, momentum=cfg.sgd_momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if (self.amp and self.device.type == "cuda") else None

        self.dataset = ViewDataset(self.paths, cfg.canvas_size, cfg.seed, augment.AugConfig.from_dict(cfg.aug),
                                   cache_views=cfg.cache_views if (cfg.cache_dir and cfg.mode == "rdcd") else 0,
                                   overlays=cfg.overlays)
        if ckpt_state is not None:
            checkpoint.load_trainer_state(self, ckpt_state)
        if cfg.cache_dir and cfg.mode == "rdcd":
            head_stage.setup_cache(self)
        if ctx.is_main:
            write_json(self.out / TRAIN_CONFIG, evaluation.describe(self))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            checkpoint.write_checkpoint(self.out / CHECKPOINT, checkpoint.trainer_state(self), self.step,
                                        self.saved_step)
        self.saved_step = self.step
        self.ctx.barrier()

    # ---------------------------------------------------------------- one step
    def _view_sizes(self) -> tuple[list[int], list[int]]:
        cfg = self.cfg
        sizes = [cfg.input_size]
        if cfg.mode == "rdcd" and self.cache is None and cfg.t_size != cfg.input_size:
            sizes.append(cfg.t_size)  # the teacher sees the same view at its own size
        return sizes, [cfg.input_size]

    def _augment_in_workers(self) -> bool:
        return self.device.type == "cpu" and self.cfg.workers > 0

    def _views(self, batch):
        """(student view A, teacher view A, view B) on the device; the tensor stage runs here unless the
        data-loader workers already ran it (CPU)."""
        cfg = self.cfg
        dev = self.device
        if "x_a" in batch:
            xa, (xb,) = batch["x_a"], batch["x_b"]
            xa = [x.to(dev) for x in xa]
            xb = xb.to(dev)
        else:
            sizes_a, sizes_b = self._view_sizes()
            xa = augment.apply_tensor_stage(batch["view_a"].to(dev, non_blocking=True), batch["params_a"],
                                            cfg.view_size, sizes_a, self.dataset.aug)
            (xb,) = augment.apply_tensor_stage(batch["view_b"].to(dev, non_blocking=True), batch["params_b"],
                                               cfg.view_size, sizes_b, self.dataset.aug)
        cl = torch.channels_last
        return xa[0].contiguous(memory_format=cl), xa[-1], xb.contiguous(memory_format=cl)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _loss(self, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """The step's loss for ``cfg.mode`` (:data:`rdcd.distill.objectives.LOSSES`)."""
        xa, xt, xb = self._views(batch)
        return LOSSES[self.cfg.mode](self, batch, xa, xt, xb, step)

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, start: int):
        from torch.utils.data import DataLoader

        cfg = self.cfg
        sampler = EpochBatches(self.n_images, cfg.batch_size, self.ctx.world, self.ctx.rank, cfg.seed, epoch, start)
        kw = {}
        if cfg.workers:
            kw = {"worker_init_fn": worker_init, "prefetch_factor": 4, "persistent_workers": False}
        collate = Collate(cfg.view_size, self.dataset.aug, self._view_sizes() if self._augment_in_workers() else None)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", **kw)

    def _log(self, rec: dict) -> None:
        self.metrics.write(rec)

    def run(self) -> dict:
        self.setup()
        cfg, ctx = self.cfg, self.ctx
        log.info("training %s %s-d %s (%d px) on %d images: %d steps of %d images (%d per process x %d), "
                 "peak lr %.4g, warm-up %d steps, device %s%s", cfg.mode, cfg.dim, cfg.backbone, cfg.input_size,
                 self.n_images, self.total_steps, cfg.batch_size, self.per_rank, ctx.world, self.peak_lr, self.warmup,
                 self.device, f", teacher {cfg.teacher} at {cfg.t_size} px" if cfg.mode == "rdcd" else "")
        if head_stage.heads_pending(self):
            if cfg.eval_at_start:
                evaluation.record_eval(self, "start (before the head stage)")
            head_stage.train_heads(self)
            if self.total_steps > self.step:
                evaluation.record_eval(self, "after the head stage")
        elif cfg.eval_at_start and self.step == 0:
            evaluation.record_eval(self, "start")
        start_step = self.step
        sums: dict[str, float] = {}
        n_sum = 0
        t_train = 0.0
        imgs = 0
        show = show_progress(cfg, ctx)
        prog = progress_bar(show)
        with prog as p, checkpoint.StopOnSignal(ctx) as stop:
            task = p.add_task(cfg.mode, total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.spe)
                t_wait = time.perf_counter()
                for batch in self._loader(epoch, in_epoch):
                    t0 = time.perf_counter()
                    data_s = t0 - t_wait
                    stats = self.train_step(batch)
                    dt = time.perf_counter() - t_wait
                    t_train += dt
                    imgs += cfg.batch_size
                    rate = cfg.batch_size / dt
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_sum += 1
                    rec = {"step": self.step, "epoch": epoch, "lr": self.optimizer.param_groups[-1]["lr"],
                           **{k: round(v, 6) for k, v in stats.items()}, "img_per_s": round(rate, 2),
                           "data_s": round(data_s, 4), "step_s": round(dt, 4)}
                    self._log(rec)
                    info = " ".join(f"{k} {stats[k]:.3f}" for k in ("loss", "rsd", "moco", "hn", "infonce", "entropy")
                                    if k in stats) + f" | {imgs / t_train:.1f} img/s"
                    p.update(task, completed=self.step, info=info)
                    if not show and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        eta = (self.total_steps - self.step) * t_train / max(1, self.step - start_step)
                        log.info("step %d/%d %s | lr %.4g | ETA %s", self.step, self.total_steps, info,
                                 rec["lr"], hms(eta))
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        evaluation.record_eval(self, "periodic")  # before the checkpoint, which then records it
                    if self.step % cfg.ckpt_every == 0 or self.step == self.total_steps:
                        self.save_checkpoint()
                    signum = stop.requested()
                    if signum:
                        stop.stop(self, signum)  # saves this step, raises Interrupted
                    if self.step >= self.total_steps:
                        break
                    t_wait = time.perf_counter()
        self.results = {"steps": self.step, "epochs": round(self.step / self.spe, 3), "steps_this_session": self.step - start_step,
                        "train_img_per_s": round(imgs / t_train, 2) if t_train else None,
                        "mean_losses_this_session": {k: round(v / max(1, n_sum), 5) for k, v in sums.items()}}
        evaluation.record_eval(self, "final")
        if ctx.is_main:
            from rdcd.model import save_student

            chosen = evaluation.choose_encoder(self)
            chosen.eval()
            try:
                save_student(chosen, self.out, extra=evaluation.describe(self, final=True))
            except OSError as exc:
                why = "disk full" if cli.is_disk_full(exc) else (exc.strerror or str(exc))
                raise RdcdError(f"cannot write the final model to {self.out} ({why}): the checkpoint "
                                f"of step {self.saved_step} is intact; free space and rerun with --resume") from None
            log.info("wrote %s (config.json + model.safetensors)", self.out)
        ctx.barrier()
        self.metrics.close()
        if self.eval_error is not None:
            raise RdcdError(f"the model was written to {self.out}, but the evaluation on --eval-benchmark "
                            f"{cfg.eval_benchmark} failed: {self.eval_error}")
        return evaluation.describe(self, final=True)

    def train_step(self, batch) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        step = self.step
        lr = lr_at(step, self.peak_lr, self.warmup, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        loss, stats, extra = self._loss(batch, step)
        vals = torch.stack([loss.detach().float()] + [v.detach().float().reshape(()) for v in stats.values()])
        vals = ctx.mean(vals).cpu()
        if not bool(torch.isfinite(vals[0])):
            self._diverged(step + 1, vals, list(stats))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_grad or float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step on inf/nan gradients (AMP overflow)
            self.scaler.update()
        else:
            g = ctx.mean(gnorm.detach().float().reshape(1).to(self.device)).cpu()
            if not bool(torch.isfinite(g).all()):
                self._diverged(step + 1, vals, list(stats), what="gradient norm")
            self.optimizer.step()
        if cfg.mode == "rdcd":
            gids = ctx.gather(extra["ids"])
            self.rsd_queue.enqueue(ctx.gather(extra["t"].contiguous()), gids)
            self.moco_queue.enqueue(ctx.gather(extra["k"].contiguous()), gids)
        self.step += 1
        out = {"loss": float(vals[0])}
        out.update({k: float(v) for k, v in zip(stats, vals[1:])})
        out["grad_norm"] = float(gnorm)
        return out

    def _diverged(self, step: int, vals, names, what: str = "loss"):
        ckpt = self.out / CHECKPOINT
        kept = f"last good checkpoint kept: {ckpt} (step {self.saved_step})" \
            if ckpt.exists() and self.saved_step is not None else "no checkpoint had been written yet"
        parts = ", ".join(f"{n} {float(v):.4g}" for n, v in zip(names, vals[1:]))
        raise TrainingDiverged(f"non-finite {what} at step {step} (loss {float(vals[0]):.4g}; {parts}); training "
                               f"stopped, {kept}; lower --lr/--base-lr or enable --clip-grad")


def train(cfg: TrainConfig, exclude: set[str] | None = None) -> dict:
    """Train (or resume) a run; returns what ``config.json`` records. Runs under torchrun too. ``exclude``:
    what :func:`rdcd.distill.preflight.check_inputs` returned, when the caller has checked the inputs."""
    ctx = DistContext.from_env(cfg.device)
    if not ctx.is_main:
        logging.getLogger("rdcd").setLevel(logging.WARNING)
    created = sorted((Path(d) for d in {cfg.out, cfg.cache_dir} if d and not Path(d).exists()),
                     key=lambda d: -len(d.parts))
    try:
        return Trainer(cfg, ctx, exclude).run()
    except BaseException:
        if ctx.is_main:  # a run refused before it wrote anything leaves no empty folder behind
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    pass
        raise
    finally:
        ctx.close()
