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
(:mod:`rdcd.distill.checkpoint`: also at the last step and on SIGINT / SIGTERM) every ``ckpt_every`` steps (student, momentum encoder, optimizer, scaler, queues, RNG states,
config) and ``metrics.jsonl``; the data order and every augmentation are functions of (seed, epoch,
image), so ``resume`` continues exactly after the last checkpoint. A non-finite loss stops the run
before the optimizer touches the weights, keeping the last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rdcd import cli
from rdcd.distill import augment, checkpoint, losses, preflight
from rdcd.distill.cache import TeacherCache, build_cache
from rdcd.distill.checkpoint import CHECKPOINT, METRICS, AlreadyDone  # noqa: F401 (re-exported)
from rdcd.distill.config import BN_MODES, RESUMABLE_CHANGES, TrainConfig  # noqa: F401 (re-exported)
from rdcd.distill.data import (CacheViewDataset, Collate, EpochBatches, ViewDataset, image_key, scan_images,
                               steps_per_epoch, worker_init)
from rdcd.distill.dist import DistContext
from rdcd.distill.heads import HeadTrainer, hn_weight_at, momentum_at
from rdcd.distill.queues import FeatureQueue
from rdcd.errors import RdcdError
from rdcd.fsutil import write_json

log = logging.getLogger("rdcd.distill")

TRAIN_CONFIG = "train_config.json"


class TrainingDiverged(RdcdError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays. Exit code 1."""

    exit_code = 1


# ---------------------------------------------------------------------------------- helpers
class _Features(nn.Module):
    """DDP hooks ``forward``: expose ``Student.features`` (feature, descriptor) as the forward."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x):
        return self.student.features(x)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from peak/warmup to peak over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _train_mode(model: nn.Module, bn: str = "train", frozen: set[int] | None = None) -> None:
    """Train mode; with ``bn="frozen"`` the BatchNorm layers stay in eval mode (ImageNet running statistics
    used and kept: a short fine-tune otherwise overwrites them with the augmented views' statistics within
    ~30 steps, most of its µAP loss). Modules in ``frozen`` (ids; untrained backbone stages) stay in eval."""
    model.train()
    for m in model.modules():
        if (bn == "frozen" and isinstance(m, nn.modules.batchnorm._BatchNorm)) or (frozen and id(m) in frozen):
            m.eval()


def freeze_lower_stages(student: nn.Module, train_blocks: int | None) -> set[int]:
    """Freeze all but the last ``train_blocks`` stages of the backbone (and its head conv/BN); return the
    ids of the frozen modules (kept in eval mode)."""
    if train_blocks is None:
        return set()
    bb = student.backbone
    blocks = getattr(bb, "blocks", None)
    if blocks is None:
        raise RdcdError(f"--train-blocks: backbone {type(bb).__name__} has no .blocks to count from")
    if train_blocks > len(blocks):
        raise RdcdError(f"--train-blocks {train_blocks}: {type(bb).__name__} has only {len(blocks)} stages")
    keep = {id(m) for b in list(blocks)[len(blocks) - train_blocks:] for m in b.modules()} if train_blocks else set()
    for name in ("conv_head", "bn2"):
        if hasattr(bb, name):
            keep |= {id(m) for m in getattr(bb, name).modules()}
    frozen = set()
    for m in bb.modules():  # every module with its own parameters or buffers (timm's BatchNormAct2d has children)
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if id(m) not in keep and own:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            frozen.add(id(m))
    return frozen


def evaluate_student(student: nn.Module, bench: str | os.PathLike, device, batch_size: int = 64) -> dict:
    """µAP etc. of ``student`` on a DISC-layout benchmark (rdcd.validate.evaluate), in eval mode."""
    from rdcd.benchmark import load_benchmark
    from rdcd.model import TorchEmbedder
    from rdcd.validate.evaluate import describe, evaluate_descriptors

    modes = {m: m.training for m in student.modules()}  # restores frozen-BN layers too
    try:
        b = load_benchmark(bench)
        emb = TorchEmbedder(student, str(device))
        desc = describe(b, emb, student.config.preprocess(), batch_size, with_training=False, label="eval")
        res = evaluate_descriptors(b, desc)
        row = res.row()
        return {"micro_ap": round(row["micro_ap"], 5), "recall_at_p90": round(row["recall_at_p90"], 5),
                "acc_at_1": round(row["acc_at_1"], 5), "seconds": round(desc.seconds, 2)}
    finally:
        for m, training in modes.items():
            m.training = training


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        cfg.validate()
        self.cfg, self.ctx = cfg, ctx
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
        self._metrics_fh = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16

        exclude = preflight.check(cfg, ctx.is_main)  # outputs writable, benchmarks usable: before any work
        ckpt_state = checkpoint.prepare_out_dir(cfg, self.out)
        paths = scan_images(cfg.train_dir, exclude) if ctx.is_main else None
        if paths and cfg.max_images and len(paths) > cfg.max_images:
            import hashlib

            keep = set(sorted(paths, key=lambda p: hashlib.sha1(f"rdcd-train:{p.name}".encode()).hexdigest())
                       [: cfg.max_images])
            log.info("training on %d of %d images (--max-images)", cfg.max_images, len(paths))
            paths = [p for p in paths if p in keep]
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
        from rdcd.model import BACKBONES, StudentConfig, build_student, verify_pretrained

        scfg = StudentConfig(backbone=cfg.backbone, dim=cfg.dim, feat_dim=feat_dim, input_size=cfg.input_size)
        torch.manual_seed(cfg.seed)
        student = build_student(scfg, pretrained=cfg.pretrained and not cfg.backbone_weights)
        self.pretrained_check: dict[str, Any] = {"requested": cfg.pretrained}
        if cfg.backbone_weights:
            from rdcd.distill.init import init_from_file

            self.pretrained_check.update(init_from_file(student, cfg.backbone, cfg.backbone_weights))
        elif cfg.pretrained:
            info = BACKBONES.get(cfg.backbone)
            if info is not None and info.offline_weights:
                check = verify_pretrained(cfg.backbone) if ctx.is_main else None
                check = ctx.broadcast_object(check)
                if not check["ok"]:
                    raise RdcdError(f"pretrained {cfg.backbone} weights misclassify real photos ({check}): refusing to "
                                    "train from a broken init (use --no-pretrained to start from scratch)")
                self.pretrained_check.update(check, source=info.offline_weights)
            else:
                self.pretrained_check.update(ok=False, source=None,
                                             note=f"no offline ImageNet weights for {cfg.backbone}: random init")
        self.student = student.to(self.device).to(memory_format=torch.channels_last)
        self.frozen = freeze_lower_stages(self.student, cfg.train_blocks)
        _train_mode(self.student, cfg.bn, self.frozen)
        self.model: nn.Module = _Features(self.student)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.mode == "rdcd":
            self.momentum = copy.deepcopy(self.student)
            self.frozen_momentum = freeze_lower_stages(self.momentum, cfg.train_blocks)
            _train_mode(self.momentum, cfg.bn, self.frozen_momentum)
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
            self._setup_cache()
        if ctx.is_main:
            write_json(self.out / TRAIN_CONFIG, self._describe())

    def _setup_cache(self) -> None:
        """Teacher features of K fixed views per image (and, for the head stage, the frozen backbone's GeM
        features of the same views at the student's size), computed once in one pass and kept on disk."""
        cfg, ctx = self.cfg, self.ctx
        desc = dict(self.teacher.describe())
        desc.pop("providers", None)
        desc.pop("device", None)
        fingerprint = {"teacher": desc, "teacher_size": cfg.t_size, "view_size": cfg.view_size,
                       "canvas": cfg.canvas_size, "aug": cfg.aug, "overlays": cfg.overlays, "seed": cfg.seed,
                       "views": cfg.cache_views}
        keys = [image_key(p) for p in self.paths]
        self.cache = TeacherCache(cfg.cache_dir, fingerprint, keys, cfg.cache_views, int(self.teacher.dim))
        caches, sizes = [self.cache], [cfg.t_size]
        if self._heads_pending():
            bfp = {**fingerprint, "backbone": cfg.backbone, "input_size": cfg.input_size,
                   "weights": _weights_hash(self.student.backbone)}
            self.backbone_cache = TeacherCache(cfg.cache_dir, bfp, keys, cfg.cache_views, self.student.fc.in_features,
                                               prefix="backbone")
            caches.append(self.backbone_cache)
            sizes.append(cfg.input_size)
        todo = len(set().union(*(c.missing() for c in caches)))
        if not todo:
            log.info("feature cache %s is complete (%d images x %d views)", self.cache.dir.parent, self.n_images,
                     cfg.cache_views)
            return
        log.info("feature cache: computing %d views (%d images x %d) for %s into %s", todo, self.n_images,
                 cfg.cache_views, " and ".join(c.dir.name.split("-")[0] for c in caches), self.cache.dir.parent)
        from torch.utils.data import DataLoader

        views = CacheViewDataset(self.dataset)
        bs = max(8, self.per_rank)
        prog = self._progress_bar(extra=False)
        show = self._show_progress()
        task = prog.add_task("feature cache", total=todo, info="")
        counter = [0]
        st = self.student
        modes = {m: m.training for m in st.modules()}

        def compute(items):
            batches = [items[i: i + bs] for i in range(0, len(items), bs)]
            collate = Collate(cfg.view_size, self.dataset.aug, (sizes, []) if self._augment_in_workers() else None)
            loader = DataLoader(views, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                                **({"worker_init_fn": worker_init, "prefetch_factor": 4} if cfg.workers else {}))
            for b in loader:
                if "x_a" in b:
                    xs = [x.to(self.device) for x in b["x_a"]]
                else:
                    xs = augment.apply_tensor_stage(b["view_a"].to(self.device), b["params_a"], cfg.view_size,
                                                    sizes, self.dataset.aug)
                feats = [self.teacher(xs[0]).float().cpu().numpy()]
                if len(caches) > 1:
                    st.eval()
                    with torch.no_grad():
                        feats.append(st.pooled(xs[-1]).float().cpu().numpy())
                n = len(feats[0]) * ctx.world
                prog.advance(task, n)
                counter[0] += n
                if not show and counter[0] // (bs * 25 * ctx.world) != (counter[0] - n) // (bs * 25 * ctx.world):
                    el = time.perf_counter() - t0
                    log.info("feature cache: %d/%d (%.1f img/s, ETA %s)", counter[0], todo, counter[0] / el,
                             _hms((todo - counter[0]) * el / counter[0]))
                yield list(zip(b["index"].tolist(), b["slot"].tolist())), feats

        t0 = time.perf_counter()
        try:
            with prog:
                n = build_cache(caches, compute, chunk=bs * 25, rank=ctx.rank, world=ctx.world,
                                gather=ctx.all_gather_object)
        finally:
            for m, training in modes.items():
                m.training = training
        dt = time.perf_counter() - t0
        self.cache_rate = {"entries": n, "seconds": round(dt, 1), "img_per_s": round(n / max(dt, 1e-9), 2),
                           "world": ctx.world, "teacher_size": cfg.t_size}
        log.info("feature cache: %d views in %.0f s (%.1f img/s)", n, dt, n / max(dt, 1e-9))
        ctx.barrier()

    def _heads_pending(self) -> bool:
        return bool(self.cfg.head_steps) and self.cfg.mode == "rdcd" and self.step == 0 and not self.heads_result

    def train_heads(self) -> None:
        """The head stage (:mod:`rdcd.distill.heads`): on rank 0, from the cached features; then every rank
        gets the heads, the momentum encoder copies the student, and a checkpoint records it."""
        cfg, ctx = self.cfg, self.ctx
        hc = dataclasses.replace(cfg.head_config(), steps=cfg.head_steps, seed=cfg.seed)
        if ctx.is_main:
            bc, tc = self.backbone_cache, self.cache  # each cache has its own row order
            G, T = bc.feats[bc.rows], tc.feats[tc.rows]
            if not (tc.done[tc.rows].all() and bc.done[bc.rows].all()):
                raise RdcdError("feature cache incomplete before the head stage (was the cache folder changed?)")
            st_cpu = copy.deepcopy(self.student).cpu().float()
            result = HeadTrainer(st_cpu, G, T, hc).run()
            state = {k: v.cpu() for k, v in st_cpu.state_dict().items() if k.startswith(("fc.", "projector."))}
        else:
            result = state = None
        result, state = ctx.broadcast_object((result, state))
        with torch.no_grad():
            for k, v in state.items():
                self.student.state_dict()[k].copy_(v)
        self.momentum.load_state_dict(self.student.state_dict())
        self.heads_result = result
        self._log({"step": 0, "heads": {k: v for k, v in result.items() if k != "history"}})
        log.info("head stage: %d steps on %d images x %d views in %.0f s (%s, init %s)", result["steps"],
                 result["images"], result["views"], result["seconds"], result["mode"], result["init"])
        self.save_checkpoint()

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            checkpoint.write_checkpoint(self.out / CHECKPOINT, checkpoint.trainer_state(self), self.step)
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

    @torch.no_grad()
    def _momentum_update(self) -> None:
        cfg = self.cfg
        m = cfg.moco_momentum if cfg.moco_momentum_end is None else \
            momentum_at(self.step, self.total_steps, cfg.moco_momentum, cfg.moco_momentum_end)
        for pk, pq in zip(self.momentum.parameters(), self.student.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Momentum-encoder keys; across ranks the batch is shuffled first so BN statistics cannot leak
        which samples are positives (MoCo's shuffle BN), then unshuffled."""
        ctx = self.ctx
        if not ctx.distributed:
            return self.momentum.features(x)[1].float()
        x_all = ctx.gather(x)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        perm = torch.randperm(len(x_all), generator=g).to(x.device)  # same on every rank
        mine = perm.view(ctx.world, -1)[ctx.rank]
        k_all = ctx.gather(self.momentum.features(x_all[mine])[1].float())
        k = k_all[torch.argsort(perm)]
        return k.view(ctx.world, -1, k.shape[1])[ctx.rank]

    def _loss(self, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        cfg, ctx = self.cfg, self.ctx
        xa, xt, xb = self._views(batch)
        ids = batch["index"].to(self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)
        if cfg.mode == "baseline":
            with autocast:
                f, z = self.model(torch.cat([xa, xb]))
            z = z.float()
            ids2 = torch.cat([ids, ids])
            all_z = ctx.gather_with_grad(z)
            all_ids = ctx.gather(ids2)
            nce, nearest = losses.sscd_infonce(z, ids2, all_z, all_ids, offset=ctx.rank * len(z), tau=cfg.infonce_temp)
            ent = losses.entropy_loss(nearest, cfg.entropy_weight)
            with torch.no_grad():
                pos = (z[: len(ids)] * z[len(ids):]).sum(1).mean()
            return nce + ent, {"infonce": nce, "entropy": ent, "pos_sim": pos, "nearest_neg": nearest.mean()}, {}
        # --- rdcd
        if self.cache is not None:
            t = self.cache.lookup(batch["index"].tolist(), batch["slot"].tolist()).to(self.device)
        else:
            t = self.teacher(xt).float()
        with autocast:
            f, z = self.model(xa)
        z = z.float()
        s = F.normalize(f.float(), dim=1)
        self._momentum_update()
        with autocast:
            k = self._keys(xb, step)
        k = F.normalize(k.float(), dim=1)
        neg, mask = losses.negative_similarities(z, self.moco_queue.features(), ids, self.moco_queue.item_ids())
        moco = losses.moco_infonce(z, k, neg, mask, cfg.moco_temp)
        hn = losses.hard_negative_loss(neg, mask, hn_weight_at(step, cfg.hn_ramp_steps, cfg.hn_weight, 1.0)
                                       if cfg.hn_ramp_steps else cfg.hn_weight)
        if len(self.rsd_queue):  # the queue's earlier views of the same images are no relations
            same = ids.view(-1, 1) == self.rsd_queue.item_ids().view(1, -1)
            rsd = losses.rsd_loss(t, s, self.rsd_queue.features(), cfg.rsd_temp, same, cfg.rsd_positive)
        else:  # first step: no past teacher features yet
            rsd = s.sum() * 0.0
        loss = cfg.rsd_weight * rsd + cfg.moco_weight * moco + hn
        if cfg.feature_weight:
            loss = loss + cfg.feature_weight * (1 - (s * t).sum(1)).mean()
        with torch.no_grad():
            stats = {"rsd": rsd, "moco": moco, "hn": hn, "pos_sim": (z * k).sum(1).mean(),
                     "nearest_neg": neg.masked_fill(mask, -1.0).max(1).values.mean() if mask is not None
                     else neg.max(1).values.mean()}
        return loss, stats, {"t": t, "k": k, "ids": ids}

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

    def _show_progress(self) -> bool:
        show = self.cfg.progress
        if show is None:
            show = sys.stderr.isatty() or os.environ.get("RDCD_PROGRESS") == "1"
        return bool(show and self.ctx.is_main)

    def _progress_bar(self, extra: bool = True):
        """A rich progress bar (losses, img/s, ETA); disabled off a terminal, where log lines replace it."""
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn()]
        if extra:
            cols.append(TextColumn("{task.fields[info]}"))
        from rich.console import Console

        return Progress(*cols, disable=not self._show_progress(), console=Console(stderr=True), transient=False)

    def _log(self, rec: dict) -> None:
        if not self.ctx.is_main:
            return
        if self._metrics_fh is None:
            self._metrics_fh = open(self.out / METRICS, "a", buffering=1)
        self._metrics_fh.write(json.dumps(rec) + "\n")
        self._metrics_fh.flush()

    def _eval(self, label: str) -> None:
        cfg = self.cfg
        if not cfg.eval_benchmark:
            return
        if self.ctx.is_main:
            res = self._evaluate(self.student, label)
            if res is not None:
                self.evals.append(res)
                self._log({"step": self.step, "eval": res})
                log.info("eval at step %d (%s): micro-AP %.4f", self.step, label, res["micro_ap"])
        self.ctx.barrier()

    def _evaluate(self, net: nn.Module, label: str) -> dict | None:
        """An evaluation on --eval-benchmark, or None when it fails: training (and writing the final model)
        goes on without evaluations; the run then ends with one error line saying why."""
        if self.eval_error is not None:
            return None
        try:
            return {"step": self.step, "label": label, **evaluate_student(net, self.cfg.eval_benchmark, self.device)}
        except Exception as exc:  # noqa: BLE001 - a bad benchmark must not cost the trained model
            self.eval_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RdcdError) else str(exc)
            log.warning("evaluation (%s) on %s failed, continuing without evaluations: %s", label,
                        self.cfg.eval_benchmark, self.eval_error)
            return None

    def _choose_encoder(self) -> nn.Module:
        """The network to export: the student, or the momentum encoder (an EMA of it) with ``always``, or
        with ``auto`` when it scores higher on the evaluation benchmark (choose on a validation benchmark,
        not on the one you report)."""
        cfg = self.cfg
        self.exported = "student"
        if self.momentum is None or cfg.export_momentum == "never" or self.step == 0:
            return self.student
        if cfg.export_momentum == "auto":
            if not (cfg.eval_benchmark and self.evals and self.evals[-1]["step"] == self.step):
                return self.student
            res = self._evaluate(self.momentum, "final, momentum encoder")
            if res is None:
                return self.student
            student = self.evals[-1]
            log.info("momentum encoder: micro-AP %.4f (student %.4f)", res["micro_ap"], student["micro_ap"])
            if res["micro_ap"] <= student["micro_ap"]:
                self.evals.insert(len(self.evals) - 1, res)  # the last entry stays the exported network's
                return self.student
            self.evals.append(res)
        self.exported = "momentum encoder"
        return self.momentum

    def run(self) -> dict:
        self.setup()
        cfg, ctx = self.cfg, self.ctx
        log.info("training %s %s-d %s (%d px) on %d images: %d steps of %d images (%d per process x %d), "
                 "peak lr %.4g, warm-up %d steps, device %s%s", cfg.mode, cfg.dim, cfg.backbone, cfg.input_size,
                 self.n_images, self.total_steps, cfg.batch_size, self.per_rank, ctx.world, self.peak_lr, self.warmup,
                 self.device, f", teacher {cfg.teacher} at {cfg.t_size} px" if cfg.mode == "rdcd" else "")
        if self._heads_pending():
            if cfg.eval_at_start:
                self._eval("start (before the head stage)")
            self.train_heads()
            if self.total_steps > self.step:
                self._eval("after the head stage")
        elif cfg.eval_at_start and self.step == 0:
            self._eval("start")
        start_step = self.step
        sums: dict[str, float] = {}
        n_sum = 0
        t_train = 0.0
        imgs = 0
        prog = self._progress_bar()
        show = self._show_progress()
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
                                 rec["lr"], _hms(eta))
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        self._eval("periodic")  # before the checkpoint, which then records it
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
        self._eval("final")
        if ctx.is_main:
            from rdcd.model import save_student

            chosen = self._choose_encoder()
            chosen.eval()
            try:
                save_student(chosen, self.out, extra=self._describe(final=True))
            except OSError as exc:
                why = "disk full" if cli.is_disk_full(exc) else (exc.strerror or str(exc))
                raise RdcdError(f"cannot write the final model to {self.out} ({why}): the checkpoint "
                                f"of step {self.saved_step} is intact; free space and rerun with --resume") from None
            log.info("wrote %s (config.json + model.safetensors)", self.out)
        ctx.barrier()
        if self._metrics_fh:
            self._metrics_fh.close()
            self._metrics_fh = None
        if self.eval_error is not None:
            raise RdcdError(f"the model was written to {self.out}, but the evaluation on --eval-benchmark "
                            f"{cfg.eval_benchmark} failed: {self.eval_error}")
        return self._describe(final=True)

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
        kept = f"last good checkpoint kept: {ckpt} (step {checkpoint.checkpoint_step(self.out)})" if ckpt.exists() else \
            "no checkpoint had been written yet"
        parts = ", ".join(f"{n} {float(v):.4g}" for n, v in zip(names, vals[1:]))
        raise TrainingDiverged(f"non-finite {what} at step {step} (loss {float(vals[0]):.4g}; {parts}); training "
                               f"stopped, {kept}; lower --lr/--base-lr or enable --clip-grad")

    def _describe(self, final: bool = False) -> dict:
        import timm

        import rdcd

        cfg, ctx = self.cfg, self.ctx
        d = {"training": {**cfg.to_dict(), "teacher_size": cfg.t_size if cfg.mode == "rdcd" else None,
                          "view_size": cfg.view_size, "canvas": cfg.canvas_size, "peak_lr": self.peak_lr,
                          "total_steps": self.total_steps, "warmup_steps": self.warmup, "steps_per_epoch": self.spe,
                          "amp": self.amp, "bn_detail": "frozen: eval mode, ImageNet running statistics kept" if cfg.bn == "frozen" else
                          "train: per-process batch statistics, running statistics updated; shuffle-BN on the "
                          "momentum encoder across processes",
                          "optimizer": "SGD", "schedule": "linear warm-up + cosine"},
             "teacher": self.teacher.describe() if self.teacher is not None else None,
             "pretrained": self.pretrained_check,
             "data": {"train_dir": cfg.train_dir, "images": self.n_images,
                      "excluded_benchmark": cfg.exclude_benchmark},
             "distributed": {"world_size": ctx.world, "backend": ctx.backend, "device": str(self.device),
                             "threads": torch.get_num_threads()},
             "versions": {"rdcd": getattr(rdcd, "__version__", "?"), "torch": torch.__version__, "timm": timm.__version__}}
        if self.heads_result:
            d["heads"] = self.heads_result
        if self.cache is not None:
            d["teacher_cache"] = {"dir": str(self.cache.dir), "views": cfg.cache_views, "build": self.cache_rate}
        if final:
            d["result"] = {**self.results, "eval": self.evals, "exported": getattr(self, "exported", "student")}
        return d


def _weights_hash(module: nn.Module) -> str:
    import hashlib

    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a run; returns what ``config.json`` records. Runs under torchrun too."""
    ctx = DistContext.from_env(cfg.device)
    if not ctx.is_main:
        logging.getLogger("rdcd").setLevel(logging.WARNING)
    created = sorted((Path(d) for d in {cfg.out, cfg.cache_dir} if d and not Path(d).exists()),
                     key=lambda d: -len(d.parts))
    try:
        return Trainer(cfg, ctx).run()
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
