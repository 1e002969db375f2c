"""Head distillation on cached features: many cheap steps before (or instead of) a full fine-tune.

On CPU a full RDCD step costs a backbone forward and backward per image, so a short run spends its
whole budget in the early dip where the random heads tear the ImageNet features apart. Here the
backbone is frozen *with its ImageNet BatchNorm running statistics* (eval mode, nothing re-estimated
on the training images), and the heads (``fc``: GeM features -> 512, ``projector``: 512 -> d) are
trained on the backbone's GeM features of the K cached views of every training image, next to the
teacher's features of the same views (:mod:`rdcd.distill.cache`). A step is a few matrix products,
so thousands of steps take seconds.

Initialisation (``init``): ``fc`` by ridge regression onto the teacher's features (a linear probe in
closed form), the projector as the top-d principal directions of the fitted features (``pca``) or
those directions whitened (``pcaw``); ``random`` keeps timm/torch's init.

Losses, per step, on a batch of images with two different cached views a and b each (``mode``):

* ``rdcd``: the paper's three losses: RSD (KL between softmaxed similarities of the teacher's and
  the student's 512-d feature of view a to a FIFO queue of teacher features, tau 0.04; the queue's
  entries of the same image are masked out, optionally the current teacher feature is the first
  column), MoCo InfoNCE of the descriptor of view a against the momentum heads' key of view b
  (tau 0.07, momentum from ``momentum`` to ``momentum_end`` by a cosine schedule) and the
  hard-negative loss (weight ramped linearly from 0 to ``hn_weight`` over ``hn_ramp`` of the steps; the
  default weight is 1, not the paper's 5, which collapsed the heads on mixed clip art + photographs);
* ``rdcd+feature``: the same plus ``feature_weight`` x (1 - cos(student 512-d, teacher)) on view a;
* ``feature``: the cosine term alone (the projector then stays as initialised);
* ``contrastive``: MoCo InfoNCE + hard negatives only, no teacher (the contrastive baseline).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdcd.distill import losses
from rdcd.distill.queues import FeatureQueue
from rdcd.errors import RdcdError

log = logging.getLogger(__name__)

MODES = ("rdcd", "rdcd+feature", "feature", "contrastive")
INITS = ("pca", "pcaw", "random")


@dataclasses.dataclass
class HeadConfig:
    steps: int = dataclasses.field(default=2000, metadata={"flag": "--head-steps", "min": 0})
    batch_size: int = dataclasses.field(default=256, metadata={"flag": "--head-batch-size", "min": 2,
                                                               "help": "head-stage batch"})
    lr: float = dataclasses.field(default=1e-3, metadata={"flag": "--head-lr", "check": "positive",  # AdamW, cosine
                                                          "help": "head-stage AdamW learning rate"})  # after a 5 % warm-up
    weight_decay: float = 1e-4
    mode: str = dataclasses.field(default="rdcd", metadata={"flag": "--head-mode", "choices": MODES, "help": (
        "head-stage losses (rdcd: RSD + MoCo + ramped hard negatives; see rdcd.distill.heads)")})
    init: str = dataclasses.field(default="random", metadata={"flag": "--head-init", "choices": INITS, "help": (
        "random (measured best), or fc by ridge regression onto the teacher and the projector by PCA (pcaw: "
        "whitened) of the fit")})
    queue_size: int = dataclasses.field(default=4096, metadata={"flag": "head queue size", "min": 1})
    rsd_temp: float = losses.RSD_TEMP
    rsd_positive: bool = False  # the current teacher feature as the first RSD column
    moco_temp: float = losses.MOCO_TEMP
    momentum: float = losses.MOCO_MOMENTUM
    momentum_end: float = 0.999
    hn_weight: float = dataclasses.field(default=1.0, metadata={"flag": "--head-hn-weight", "help": (
        "head-stage hard-negative weight (the paper's 5 collapsed the heads on mixed clip art + photos; see "
        "docs/reports/distill.md)")})
    hn_ramp: float = dataclasses.field(default=0.5, metadata={  # of the steps: the hard-negative weight ramps from 0
        "flag": "head-stage hard-negative ramp", "check": "fraction"})
    feature_weight: float = 1.0
    rsd_weight: float = 1.0
    moco_weight: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        from rdcd.distill.fields import check_fields

        check_fields(self)


def hn_weight_at(step: int, total: int, weight: float, ramp: float) -> float:
    """Hard-negative weight: linear from 0 to ``weight`` over the first ``ramp`` x ``total`` steps."""
    n = ramp * total
    return weight if n <= 0 else weight * min(1.0, (step + 1) / n)


def momentum_at(step: int, total: int, start: float, end: float) -> float:
    """Momentum-encoder coefficient: cosine from ``start`` (step 0) to ``end`` (last step), as in BYOL."""
    return end - (end - start) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@torch.no_grad()
def init_heads(fc: nn.Linear, projector: nn.Linear, G: torch.Tensor, T: torch.Tensor, init: str,
               ridge: float = 1e-2) -> dict:
    """Closed-form head init from backbone features ``G`` [n, C] and teacher features ``T`` [n, 512]."""
    if init == "random":
        return {"init": "random"}
    G, T = G.double(), T.double()
    gm, tm = G.mean(0), T.mean(0)
    Gc = G - gm
    cov = Gc.T @ Gc
    lam = ridge * float(cov.diagonal().mean())
    W = torch.linalg.solve(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype), Gc.T @ (T - tm))
    b = tm - gm @ W
    Fx = G @ W + b
    fm = Fx.mean(0)
    lam, U = torch.linalg.eigh((Fx - fm).T @ (Fx - fm))  # principal directions of the fit, ascending
    d = projector.out_features
    P = U.flip(1).T[:d]
    S = lam.flip(0).clamp(min=0).sqrt()
    if init == "pcaw":
        sv = torch.zeros(d, dtype=P.dtype)
        sv[: min(d, len(S))] = S[:d] / math.sqrt(max(1, len(Fx) - 1))
        P = P / (sv.clamp(min=float(sv.max()) * 1e-3)).unsqueeze(1)
    fc.weight.copy_(W.T.float())
    fc.bias.copy_(b.float())
    projector.weight.copy_(P.float())
    projector.bias.copy_((-(fm @ P.T)).float())
    return {"init": init, "fit_cos": round(float(F.cosine_similarity(Fx, T).mean()), 4), "views": len(G)}


class HeadTrainer:
    """Trains ``student.fc`` and ``student.projector`` on cached features; the backbone is not touched.

    ``G`` [N, K, C] backbone GeM features and ``T`` [N, K, 512] teacher features of the same K views
    of N images (float16 or float32 numpy arrays).
    """

    def __init__(self, student: nn.Module, G: np.ndarray, T: np.ndarray, cfg: HeadConfig):
        cfg.validate()
        if G.shape[:2] != T.shape[:2]:
            raise RdcdError(f"cached backbone features {G.shape} and teacher features {T.shape} do not line up")
        self.student, self.cfg = student, cfg
        self.G = torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32))
        self.T = F.normalize(torch.from_numpy(np.ascontiguousarray(T, dtype=np.float32)), dim=-1)
        self.N, self.K = G.shape[:2]
        self.history: list[dict] = []

    def run(self, log_every: int = 250) -> dict:
        cfg, st = self.cfg, self.student
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        info = init_heads(st.fc, st.projector, self.G.reshape(-1, self.G.shape[-1]), self.T.reshape(-1, self.T.shape[-1]),
                          cfg.init)
        heads = nn.ModuleDict({"fc": st.fc, "projector": st.projector})
        mom = copy.deepcopy(heads).requires_grad_(False)
        params = list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        d, fd = st.projector.out_features, st.fc.out_features
        kq = FeatureQueue(cfg.queue_size, d, random_init=True, seed=cfg.seed)
        tq = FeatureQueue(cfg.queue_size, fd)
        bs = min(cfg.batch_size, self.N)
        warm = max(1, cfg.steps // 20)
        use_teacher = cfg.mode != "contrastive"
        sums: dict[str, float] = {}
        n_sum = 0
        for step in range(cfg.steps):
            lr = cfg.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.from_numpy(rng.choice(self.N, bs, replace=False))
            a = torch.from_numpy(rng.integers(0, self.K, bs))
            b = (a + torch.from_numpy(rng.integers(1, self.K, bs) if self.K > 1 else np.zeros(bs, np.int64))) % self.K
            ga, gb, t = self.G[idx, a], self.G[idx, b], self.T[idx, a]
            f = heads["fc"](ga)
            s = F.normalize(f, dim=1)
            z = F.normalize(heads["projector"](f), dim=1)
            terms: dict[str, torch.Tensor] = {}
            if cfg.mode in ("rdcd", "rdcd+feature") and len(tq):
                mask = idx.view(-1, 1) == tq.item_ids().view(1, -1)
                terms["rsd"] = cfg.rsd_weight * losses.rsd_loss(t, s, tq.features(), cfg.rsd_temp, mask, cfg.rsd_positive)
            if cfg.mode in ("rdcd+feature", "feature"):
                terms["feature"] = cfg.feature_weight * (1 - (s * t).sum(1)).mean()
            if cfg.mode != "feature":
                with torch.no_grad():
                    m = momentum_at(step, cfg.steps, cfg.momentum, cfg.momentum_end)
                    for pk, pq in zip(mom.parameters(), params):
                        pk.mul_(m).add_(pq.detach(), alpha=1 - m)
                    k = F.normalize(mom["projector"](mom["fc"](gb)), dim=1)
                neg, nmask = losses.negative_similarities(z, kq.features(), idx, kq.item_ids())
                terms["moco"] = cfg.moco_weight * losses.moco_infonce(z, k, neg, nmask, cfg.moco_temp)
                w = hn_weight_at(step, cfg.steps, cfg.hn_weight, cfg.hn_ramp)
                terms["hn"] = losses.hard_negative_loss(neg, nmask, w)
            loss = sum(terms.values()) if terms else z.sum() * 0.0
            if not bool(torch.isfinite(loss)):
                raise RdcdError(f"head distillation diverged at step {step + 1} (loss {float(loss)}); lower --head-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            if cfg.mode != "feature":  # after the backward pass: the losses read the queues in place
                kq.enqueue(k, idx)
            if use_teacher:
                tq.enqueue(t, idx)
            for key, v in {"loss": loss, **terms}.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach())
            n_sum += 1
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                with torch.no_grad():
                    cos_t = float((s * t).sum(1).mean())
                rec = {"head_step": step + 1, **{k_: round(v / n_sum, 5) for k_, v in sums.items()},
                       "cos_teacher": round(cos_t, 4), "lr": lr}
                self.history.append(rec)
                log.info("heads step %d/%d: %s", step + 1, cfg.steps,
                         " ".join(f"{k_} {v:.3f}" for k_, v in rec.items() if k_ not in ("head_step", "lr")))
                sums, n_sum = {}, 0
        return {**info, "steps": cfg.steps, "batch_size": bs, "views": self.K, "images": self.N, "mode": cfg.mode,
                "seconds": round(time.perf_counter() - t0, 1), "history": self.history,
                "bn": "backbone frozen in eval mode: ImageNet BatchNorm running statistics kept"}
