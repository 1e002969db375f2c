"""The loss of one training step, one function per mode (:data:`LOSSES`): ``rdcd`` (RSD against the
teacher + MoCo InfoNCE against the momentum encoder's keys + hard negatives) and ``baseline`` (SSCD's
InfoNCE over the global batch + entropy). Each takes the trainer, the batch, its views on the device and
the step, and returns ``(loss, stats, extra)``: ``extra`` holds what the step enqueues afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdcd.distill import losses
from rdcd.distill.heads import hn_weight_at, momentum_at


def baseline_loss(tr, batch, xa, xt, xb, step: int):
    cfg, ctx = tr.cfg, tr.ctx
    ids = batch["index"].to(tr.device)
    with tr.autocast():
        f, z = tr.model(torch.cat([xa, xb]))
    z = z.float()
    ids2 = torch.cat([ids, ids])
    all_z = ctx.gather_with_grad(z)
    all_ids = ctx.gather(ids2)
    nce, nearest = losses.sscd_infonce(z, ids2, all_z, all_ids, offset=ctx.rank * len(z), tau=cfg.infonce_temp)
    ent = losses.entropy_loss(nearest, cfg.entropy_weight)
    with torch.no_grad():
        pos = (z[: len(ids)] * z[len(ids):]).sum(1).mean()
    return nce + ent, {"infonce": nce, "entropy": ent, "pos_sim": pos, "nearest_neg": nearest.mean()}, {}


@torch.no_grad()
def momentum_update(tr) -> None:
    cfg = tr.cfg
    m = cfg.moco_momentum if cfg.moco_momentum_end is None else \
        momentum_at(tr.step, tr.total_steps, cfg.moco_momentum, cfg.moco_momentum_end)
    for pk, pq in zip(tr.momentum.parameters(), tr.student.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)


@torch.no_grad()
def momentum_keys(tr, x: torch.Tensor, step: int) -> torch.Tensor:
    """Momentum-encoder keys; across ranks the batch is shuffled first so BN statistics cannot leak
    which samples are positives (MoCo's shuffle BN), then unshuffled."""
    ctx = tr.ctx
    if not ctx.distributed:
        return tr.momentum.features(x)[1].float()
    x_all = ctx.gather(x)
    g = torch.Generator().manual_seed(tr.cfg.seed * 1_000_003 + step)
    perm = torch.randperm(len(x_all), generator=g).to(x.device)  # same on every rank
    mine = perm.view(ctx.world, -1)[ctx.rank]
    k_all = ctx.gather(tr.momentum.features(x_all[mine])[1].float())
    k = k_all[torch.argsort(perm)]
    return k.view(ctx.world, -1, k.shape[1])[ctx.rank]


def rdcd_loss(tr, batch, xa, xt, xb, step: int):
    cfg = tr.cfg
    ids = batch["index"].to(tr.device)
    if tr.cache is not None:
        t = tr.cache.lookup(batch["index"].tolist(), batch["slot"].tolist()).to(tr.device)
    else:
        t = tr.teacher(xt).float()
    with tr.autocast():
        f, z = tr.model(xa)
    z = z.float()
    s = F.normalize(f.float(), dim=1)
    momentum_update(tr)
    with tr.autocast():
        k = momentum_keys(tr, xb, step)
    k = F.normalize(k.float(), dim=1)
    neg, mask = losses.negative_similarities(z, tr.moco_queue.features(), ids, tr.moco_queue.item_ids())
    moco = losses.moco_infonce(z, k, neg, mask, cfg.moco_temp)
    hn = losses.hard_negative_loss(neg, mask, hn_weight_at(step, cfg.hn_ramp_steps, cfg.hn_weight, 1.0)
                                   if cfg.hn_ramp_steps else cfg.hn_weight)
    if len(tr.rsd_queue):  # the queue's earlier views of the same images are no relations
        same = ids.view(-1, 1) == tr.rsd_queue.item_ids().view(1, -1)
        rsd = losses.rsd_loss(t, s, tr.rsd_queue.features(), cfg.rsd_temp, same, cfg.rsd_positive)
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


#: mode -> loss of one step
LOSSES = {"rdcd": rdcd_loss, "baseline": baseline_loss}
