"""RDCD / SSCD loss units on small tensors whose values can be checked by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from rdcd.distill import losses  # noqa: E402
from rdcd.distill.queues import FeatureQueue  # noqa: E402


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_rsd_is_kl_teacher_to_student():
    # queue = first three basis vectors of R^4; the student feature is orthogonal to all of them
    queue = torch.eye(4)[:3]
    t = torch.tensor([[1.0, 0, 0, 0]])
    s = torch.tensor([[0, 0, 0, 1.0]])
    tau = 0.5
    p_t = _softmax([2.0, 0.0, 0.0])  # t.Q / tau
    p_s = [1 / 3] * 3  # s.Q / tau = 0 everywhere
    got = float(losses.rsd_loss(t, s, queue, tau=tau))
    assert got == pytest.approx(_kl(p_t, p_s), rel=1e-5)  # = ln 3 - H(p_t) = 1.0986 - 0.6656
    assert got == pytest.approx(0.43304, abs=1e-4)
    assert abs(got - _kl(p_s, p_t)) > 0.03  # the other direction (0.4743) is a different number


def test_rsd_zero_when_student_matches_teacher_and_batch_mean():
    g = torch.Generator().manual_seed(0)
    queue = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    assert float(losses.rsd_loss(t, t, queue, 0.04)) == pytest.approx(0.0, abs=1e-6)
    s = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    rows = [float(losses.rsd_loss(t[i:i + 1], s[i:i + 1], queue, 0.04)) for i in range(3)]
    assert float(losses.rsd_loss(t, s, queue, 0.04)) == pytest.approx(sum(rows) / 3, rel=1e-5)
    # the gradient flows to the student only through its own similarities
    s.requires_grad_(True)
    losses.rsd_loss(t, s, queue, 0.04).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_hard_negative_value_clamp_and_mask():
    neg = torch.tensor([[0.5, 0.2], [0.9999, 0.1]])
    # row 1: -log(1 - 0.5) = 0.6931; row 2: 1 - 0.9999 = 1e-4 is clamped to 1e-3: -log(1e-3) = 6.9078
    want = 5 * (math.log(2) + -math.log(1e-3)) / 2
    assert float(losses.hard_negative_loss(neg, weight=5.0)) == pytest.approx(want, rel=1e-5)
    mask = torch.tensor([[False, False], [True, False]])  # the 0.9999 key is the query's own image
    want = 5 * (math.log(2) - math.log(0.9)) / 2
    assert float(losses.hard_negative_loss(neg, mask, weight=5.0)) == pytest.approx(want, rel=1e-5)


def test_moco_infonce_value_and_mask():
    q = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0]])
    # logits [1, 0, 0] (tau 1), positive first: -log(e / (e + 2))
    assert float(losses.moco_infonce(q, q, neg, tau=1.0)) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    mask = torch.tensor([[True, False]])
    assert float(losses.moco_infonce(q, q, neg, mask, tau=1.0)) == pytest.approx(math.log(1 + 1 / math.e), rel=1e-6)
    sims, m = losses.negative_similarities(q, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([7]),
                                           torch.tensor([7, 3]))
    assert sims.tolist() == [[1.0, 0.0]] and m.tolist() == [[True, False]]


def test_sscd_infonce_and_entropy():
    z = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    ids = torch.tensor([0, 0, 1, 1])
    loss, nearest = losses.sscd_infonce(z, ids, z, ids, offset=0, tau=1.0)
    # every row: one positive (sim 1) against two non-matches (sim 0): -log(e / (e + 2))
    assert float(loss) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    assert nearest.tolist() == [0.0, 0.0, 0.0, 0.0]
    # nearest non-match at distance sqrt(2): -log(sqrt 2) * 30
    assert float(losses.entropy_loss(nearest, 30.0)) == pytest.approx(-30 * math.log(math.sqrt(2)), rel=1e-6)
    # rows of rank 1 of a 2-process batch: the trivial self-pairs sit at the offset
    loss1, _ = losses.sscd_infonce(z[2:], ids[2:], z, ids, offset=2, tau=1.0)
    assert float(loss1) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_queue_fifo_wraps_and_keeps_newest():
    q = FeatureQueue(4, 2)
    assert len(q) == 0 and q.features().shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.tensor([1, 2, 3]))
    assert len(q) == 3 and q.ptr == 3 and q.item_ids().tolist() == [1, 2, 3]
    q.enqueue(torch.tensor([[4.0, 0], [5, 0], [6, 0]]), torch.tensor([4, 5, 6]))
    # the two oldest entries (1, 2) were overwritten in place; the pointer wrapped to 2
    assert len(q) == 4 and q.ptr == 2
    assert q.item_ids().tolist() == [5, 6, 3, 4]
    assert q.features()[:, 0].tolist() == [5.0, 6.0, 3.0, 4.0]
    q.enqueue(torch.arange(12.0).view(6, 2), torch.arange(6))  # more rows than fit: the newest 4 stay
    assert sorted(q.item_ids().tolist()) == [2, 3, 4, 5]
    state = q.state_dict()
    r = FeatureQueue(4, 2)
    r.load_state_dict(state)
    assert r.ptr == q.ptr and r.filled == 4 and torch.equal(r.feats, q.feats) and torch.equal(r.ids, q.ids)


def test_random_init_queue_is_unit_norm():
    q = FeatureQueue(8, 5, random_init=True, seed=1)
    assert len(q) == 8
    assert torch.allclose(q.features().norm(dim=1), torch.ones(8), atol=1e-6)
    assert (q.item_ids() == -1).all()


def test_rsd_mask_leaves_same_image_entries_out_of_both_distributions():
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    s = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(10, 16, generator=g), dim=1)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :3] = True  # entries 0-2 are earlier views of the rows' own images
    got = float(losses.rsd_loss(t, s, queue, 0.04, mask=mask))
    want = float(losses.rsd_loss(t, s, queue[3:], 0.04))
    assert got == pytest.approx(want, rel=1e-5)
    # the positive column: identical teacher and student still give zero
    assert float(losses.rsd_loss(t, t, queue, 0.04, mask=mask, positive=True)) == pytest.approx(0.0, abs=1e-6)


def test_head_stage_schedules():
    from rdcd.distill.heads import hn_weight_at, momentum_at

    assert [hn_weight_at(s, 100, 5.0, 0.5) for s in (0, 24, 49, 80)] == pytest.approx([0.1, 2.5, 5.0, 5.0])
    assert hn_weight_at(0, 100, 5.0, 0.0) == 5.0
    assert momentum_at(0, 100, 0.99, 0.999) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99, 0.999) == pytest.approx(0.999)
    assert 0.99 < momentum_at(50, 100, 0.99, 0.999) < 0.999
