"""The RDCD losses and the SSCD baseline losses, on plain tensors (computed in float32).

RDCD (Kim, Woo & Nang, WACV 2025):

* :func:`rsd_loss`: relational self-supervised distillation. Teacher and student 512-d features
  (L2-normalised) are compared by dot product with a queue of past *teacher* features; the loss is
  KL(p_teacher || p_student) with p = softmax(similarities / tau), tau = 0.04.
* :func:`moco_infonce`: InfoNCE on the compact descriptor against a queue of momentum keys
  (tau = 0.07), the positive being the momentum encoder's key of the other view.
* :func:`hard_negative_loss`: -log(max(1 - max_k z.n_k, 1e-3)) over that queue, weight 5.

SSCD baseline (Pizzi et al., CVPR 2022): :func:`sscd_infonce` over the (global) batch of two views
per image, plus :func:`entropy_loss` (differential-entropy / KoLeo regulariser, weight 30).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the paper's settings (RDCD, WACV 2025), the defaults of both the full steps and the head stage
RSD_TEMP = 0.04
MOCO_TEMP = 0.07
MOCO_MOMENTUM = 0.99
HN_WEIGHT = 5.0


def rsd_loss(teacher: torch.Tensor, student: torch.Tensor, queue: torch.Tensor, tau: float = RSD_TEMP,
             mask: torch.Tensor | None = None, positive: bool = False) -> torch.Tensor:
    """KL(softmax(t.Q/tau) || softmax(s.Q/tau)), averaged over the batch.

    ``teacher``, ``student``: [N, D] L2-normalised; ``queue``: [K, D] past teacher features.
    ``mask`` [N, K]: queue entries of the row's own image (earlier views of it), left out of both
    distributions; ``positive``: the current teacher feature becomes the first column.
    """
    q = queue.float()
    t, s = teacher.float(), student.float()
    logit_t = t @ q.T / tau
    logit_s = s @ q.T / tau
    if mask is not None:  # a large negative, not -inf: exp() is 0 and the KL term 0 * (a - b) stays finite
        logit_t, logit_s = logit_t.masked_fill(mask, -1e4), logit_s.masked_fill(mask, -1e4)
    if positive:
        logit_t = torch.cat([(t * t).sum(1, keepdim=True) / tau, logit_t], 1)
        logit_s = torch.cat([(s * t).sum(1, keepdim=True) / tau, logit_s], 1)
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q) = KL(p || q)
    return F.kl_div(F.log_softmax(logit_s, dim=1), F.log_softmax(logit_t, dim=1), reduction="batchmean",
                    log_target=True)


def negative_similarities(z: torch.Tensor, queue: torch.Tensor, ids: torch.Tensor | None = None,
                          queue_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z.Q^T [N, K] and, when ids are given, the mask of queue entries from the same image (not negatives)."""
    sims = z.float() @ queue.float().T
    mask = None
    if ids is not None and queue_ids is not None:
        mask = ids.view(-1, 1) == queue_ids.view(1, -1)
    return sims, mask


def moco_infonce(q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor | None = None,
                 tau: float = MOCO_TEMP) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy of the positive (q.k) against the queue similarities ``neg`` [N, K]."""
    pos = (q.float() * k.float()).sum(1, keepdim=True)
    logits = torch.cat([pos, neg], dim=1) / tau
    if mask is not None and bool(mask.any()):
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(mask, float("-inf"))], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def hard_negative_loss(neg: torch.Tensor, mask: torch.Tensor | None = None, weight: float = HN_WEIGHT) -> torch.Tensor:
    """weight * mean(-log(max(1 - max_k neg, 1e-3))): pushes each descriptor away from its nearest negative."""
    if mask is not None:
        neg = neg.masked_fill(mask, -1.0)  # a same-image key is no negative; -1 is the lowest cosine
    nearest = neg.max(dim=1).values
    return -(1 - nearest).clamp(min=1e-3).log().mean() * weight


def sscd_infonce(z: torch.Tensor, ids: torch.Tensor, all_z: torch.Tensor, all_ids: torch.Tensor, offset: int = 0,
                 tau: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """SSCD's InfoNCE: rows ``z`` [N, d] (this process) against columns ``all_z`` [M, d] (global batch).

    Two columns match when they come from the same image (``ids``); each non-trivial match is a
    positive against all non-matches of its row. ``offset``: where this process's rows sit among the
    columns (to find the trivial self-pairs). Returns (loss, similarity of each row's nearest
    non-match), the latter for :func:`entropy_loss`.
    """
    sim = z.float() @ all_z.float().T
    match = ids.view(-1, 1) == all_ids.view(1, -1)
    identity = torch.zeros_like(match)
    n = len(z)
    identity[:, offset: offset + n] = torch.eye(n, dtype=torch.bool, device=z.device)
    non_match = ~match
    positive = match & ~identity
    logits = sim / tau
    neg_lse = torch.logsumexp(logits.masked_fill(match, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - torch.logaddexp(logits, neg_lse)
    loss = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum() / n
    nearest = sim.masked_fill(~non_match, -2.0).max(dim=1).values
    return loss, nearest


def entropy_loss(nearest_sim: torch.Tensor, weight: float = 30.0) -> torch.Tensor:
    """SSCD's differential-entropy regulariser (KoLeo): -mean(log distance to the nearest non-match)."""
    dist = (2 - 2 * nearest_sim).clamp(min=1e-6).sqrt()
    return -dist.log().mean() * weight
