"""The feature cache of a run and the head stage trained from it.

:func:`setup_cache`: teacher features of K fixed views per image (and, for the head stage, the frozen
backbone's GeM features of the same views at the student's size), computed once in one pass and kept on
disk (:mod:`rdcd.distill.cache`). :func:`train_heads`: the head stage (:mod:`rdcd.distill.heads`) on
rank 0 from those features; every rank then gets the heads and a checkpoint records them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from rdcd.distill import augment
from rdcd.distill.cache import TeacherCache, build_cache
from rdcd.distill.data import CacheViewDataset, Collate, image_key, worker_init
from rdcd.distill.heads import HeadTrainer
from rdcd.distill.progress import hms, progress_bar, show_progress
from rdcd.distill.student_utils import weights_hash
from rdcd.errors import RdcdError

log = logging.getLogger("rdcd.distill")


def heads_pending(tr) -> bool:
    return bool(tr.cfg.head_steps) and tr.cfg.mode == "rdcd" and tr.step == 0 and not tr.heads_result


def setup_cache(tr) -> None:
    """Open (and complete) the run's feature caches: ``tr.cache`` (teacher) and, while the head stage is
    pending, ``tr.backbone_cache``; records the build rate in ``tr.cache_rate``."""
    cfg, ctx = tr.cfg, tr.ctx
    desc = dict(tr.teacher.describe())
    desc.pop("providers", None)
    desc.pop("device", None)
    fingerprint = {"teacher": desc, "teacher_size": cfg.t_size, "view_size": cfg.view_size,
                   "canvas": cfg.canvas_size, "aug": cfg.aug, "overlays": cfg.overlays, "seed": cfg.seed,
                   "views": cfg.cache_views}
    keys = [image_key(p) for p in tr.paths]
    tr.cache = TeacherCache(cfg.cache_dir, fingerprint, keys, cfg.cache_views, int(tr.teacher.dim))
    caches, sizes = [tr.cache], [cfg.t_size]
    if heads_pending(tr):
        bfp = {**fingerprint, "backbone": cfg.backbone, "input_size": cfg.input_size,
               "weights": weights_hash(tr.student.backbone)}
        tr.backbone_cache = TeacherCache(cfg.cache_dir, bfp, keys, cfg.cache_views, tr.student.fc.in_features,
                                         prefix="backbone")
        caches.append(tr.backbone_cache)
        sizes.append(cfg.input_size)
    todo = len(set().union(*(c.missing() for c in caches)))
    if not todo:
        log.info("feature cache %s is complete (%d images x %d views)", tr.cache.dir.parent, tr.n_images,
                 cfg.cache_views)
        return
    log.info("feature cache: computing %d views (%d images x %d) for %s into %s", todo, tr.n_images,
             cfg.cache_views, " and ".join(c.dir.name.split("-")[0] for c in caches), tr.cache.dir.parent)
    from torch.utils.data import DataLoader

    views = CacheViewDataset(tr.dataset)
    bs = max(8, tr.per_rank)
    show = show_progress(cfg, ctx)
    prog = progress_bar(show, extra=False)
    task = prog.add_task("feature cache", total=todo, info="")
    counter = [0]
    st = tr.student
    modes = {m: m.training for m in st.modules()}

    def compute(items):
        batches = [items[i: i + bs] for i in range(0, len(items), bs)]
        collate = Collate(cfg.view_size, tr.dataset.aug, (sizes, []) if tr._augment_in_workers() else None)
        loader = DataLoader(views, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                            **({"worker_init_fn": worker_init, "prefetch_factor": 4} if cfg.workers else {}))
        for b in loader:
            if "x_a" in b:
                xs = [x.to(tr.device) for x in b["x_a"]]
            else:
                xs = augment.apply_tensor_stage(b["view_a"].to(tr.device), b["params_a"], cfg.view_size,
                                                sizes, tr.dataset.aug)
            feats = [tr.teacher(xs[0]).float().cpu().numpy()]
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
                         hms((todo - counter[0]) * el / counter[0]))
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
    tr.cache_rate = {"entries": n, "seconds": round(dt, 1), "img_per_s": round(n / max(dt, 1e-9), 2),
                     "world": ctx.world, "teacher_size": cfg.t_size}
    log.info("feature cache: %d views in %.0f s (%.1f img/s)", n, dt, n / max(dt, 1e-9))
    ctx.barrier()


def train_heads(tr) -> None:
    """The head stage: on rank 0, from the cached features; then every rank gets the heads, the momentum
    encoder copies the student, and a checkpoint records it."""
    cfg, ctx = tr.cfg, tr.ctx
    hc = dataclasses.replace(cfg.head_config(), steps=cfg.head_steps, seed=cfg.seed)
    if ctx.is_main:
        bc, tc = tr.backbone_cache, tr.cache  # each cache has its own row order
        G, T = bc.feats[bc.rows], tc.feats[tc.rows]
        if not (tc.done[tc.rows].all() and bc.done[bc.rows].all()):
            raise RdcdError("feature cache incomplete before the head stage (was the cache folder changed?)")
        st_cpu = copy.deepcopy(tr.student).cpu().float()
        result = HeadTrainer(st_cpu, G, T, hc).run()
        state = {k: v.cpu() for k, v in st_cpu.state_dict().items() if k.startswith(("fc.", "projector."))}
    else:
        result = state = None
    result, state = ctx.broadcast_object((result, state))
    with torch.no_grad():
        for k, v in state.items():
            tr.student.state_dict()[k].copy_(v)
    tr.momentum.load_state_dict(tr.student.state_dict())
    tr.heads_result = result
    tr._log({"step": 0, "heads": {k: v for k, v in result.items() if k != "history"}})
    log.info("head stage: %d steps on %d images x %d views in %.0f s (%s, init %s)", result["steps"],
             result["images"], result["views"], result["seconds"], result["mode"], result["init"])
    tr.save_checkpoint()
