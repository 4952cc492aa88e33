"""Losses: dlib's loss_metric_ port against an independent loop-by-loop NumPy reference and
against dlib's own C++ (tools/dlib_oracle); arcface/cosface/triplet
against their definitions.

Tolerances: value 1e-6 relative (dlib accumulates in double, sums in a different order);
gradient 1e-6 absolute (float32 G·X vs dlib's float32 gemm).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dlibbridge.train.losses import (ArcFaceMargin, BatchCompositionError, CosFaceMargin, MetricLoss, NormalizedClassifier, TripletLoss, make_loss, metric_loss_and_gradient)

def metric_reference(x: np.ndarray, labels, margin=0.04, dist_thresh=0.6):
    """loss_metric_ written as dlib's loops: float32 Gram/distances, double accumulator."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    gram = (x.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    margin, thr = np.float32(margin), np.float32(dist_thresh)
    pos, neg, negs = 1e-4, 1e-4, []
    for r in range(n):
        for c in range(r + 1, n):
            if labels[r] == labels[c]:
                pos += 1
            else:
                neg += 1
                d2 = np.float32(gram[r, r] + gram[c, c] - np.float32(2) * gram[r, c])
                negs.append(max(d2, np.float32(0)))
    assert pos >= 1 and neg >= 1
    scale = 0.5 / pos
    negs.sort()
    neg_thresh = np.sqrt(np.float32(negs[int(min(pos, neg) - 1)]))
    gm = np.zeros((n, n), np.float32)
    loss = 0.0
    for r in range(n):
        for c in range(n):
            if r == c:
                continue
            d2 = np.float32(gram[r, r] + gram[c, c] - np.float32(2) * gram[r, c])
            d = np.float32(0) if d2 <= 0 else np.sqrt(d2)
            if labels[r] == labels[c]:
                if not d < thr - margin:
                    loss += scale * float(d - (thr - margin))
                    gm[r, r] = np.float32(float(gm[r, r]) + scale / float(d))
                    gm[r, c] = np.float32(-scale / float(d))
            elif not (d > thr + margin or d > neg_thresh):
                loss += scale * float((thr + margin) - d)
                d = max(d, np.float32(0.001))
                gm[r, r] = np.float32(float(gm[r, r]) - scale / float(d))
                gm[r, c] = np.float32(scale / float(d))
    return loss, (gm.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def _batch(seed, n_ids=4, per_id=3, dim=128):
    """Embeddings shaped like dlib's: identity centres ~0.6 apart, per-image spread varying, so
    every branch occurs (inactive and active positives, negatives selected, cut by the hard-negative
    threshold, and beyond thr + margin) — checked by test_metric_all_branches_exercised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim)) * 0.03
    labels = np.repeat(np.arange(n_ids), per_id)
    spread = rng.uniform(0.01, 0.05, size=(len(labels), 1))
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * spread
    return x.astype(np.float32), labels


SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_metric_matches_loop_reference(seed):
    x, labels = _batch(seed)
    ref_loss, ref_grad = metric_reference(x, labels)
    loss, grad = metric_loss_and_gradient(torch.from_numpy(x), torch.from_numpy(labels))
    assert ref_loss > 0
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(grad.numpy(), ref_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_metric_all_branches_exercised(seed):
    """Each fixture batch must hit inactive/active positives, negatives selected by the hard-
    negative cut and negatives beyond it, otherwise the reference comparison proves little."""
    x, labels = _batch(seed)
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    same = labels[:, None] == labels[None]
    off = ~np.eye(len(x), dtype=bool)
    pos_d, neg_d = d[same & off], np.sort(d[np.triu(~same, 1)])
    neg_thresh = neg_d[int(same[np.triu(off, 1)].sum()) - 1]
    assert (pos_d < 0.56).any() and (pos_d >= 0.56).any()
    assert (neg_d <= min(0.64, neg_thresh)).any()
    assert ((neg_d > neg_thresh) & (neg_d <= 0.64)).any() or (neg_d > 0.64).any()


def test_metric_autograd_is_dlib_gradient_of_half_loss():
    """MetricLoss returns half dlib's value; backward gives dlib's gradient exactly."""
    x, labels = _batch(7)
    ref_loss, ref_grad = metric_reference(x, labels)
    emb = torch.from_numpy(x).requires_grad_(True)
    out = MetricLoss()(emb, torch.from_numpy(labels))
    out.backward()
    assert float(out.detach()) == pytest.approx(0.5 * ref_loss, rel=1e-6)
    np.testing.assert_allclose(emb.grad.numpy(), ref_grad, atol=1e-6, rtol=0)
    # And it is the true derivative of the half-loss (finite differences, float64 reference).
    x64 = x.astype(np.float64)
    eps, i, k = 1e-4, 2, 5
    xp, xm = x64.copy(), x64.copy()
    xp[i, k] += eps
    xm[i, k] -= eps
    num = (metric_reference(xp.astype(np.float32), labels)[0]
           - metric_reference(xm.astype(np.float32), labels)[0]) / (2 * eps) / 2
    assert num == pytest.approx(float(emb.grad[i, k]), abs=2e-3)


def test_metric_sgd_step_matches_dlib_step():
    """One plain-SGD step on the embeddings moves them by -lr·(dlib's gradient)."""
    x, labels = _batch(11)
    _, ref_grad = metric_reference(x, labels)
    emb = torch.nn.Parameter(torch.from_numpy(x.copy()))
    opt = torch.optim.SGD([emb], lr=0.1)
    MetricLoss()(emb, torch.from_numpy(labels)).backward()
    opt.step()
    np.testing.assert_allclose(emb.detach().numpy(), x - 0.1 * ref_grad, atol=1e-6)


def test_metric_duplicate_negative_at_zero_distance_is_clamped():
    """Two different identities with identical embeddings: D = 0 negative, 1e-3 clamp."""
    x, labels = _batch(5)
    x[3] = x[0]
    ref_loss, ref_grad = metric_reference(x, labels)
    loss, grad = metric_loss_and_gradient(torch.from_numpy(x), torch.from_numpy(labels))
    assert np.isfinite(grad.numpy()).all()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grad.numpy(), ref_grad, atol=1e-6)


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3], [5]])
def test_metric_refuses_batches_without_both_pair_kinds(labels):
    x = torch.zeros(len(labels), 128)
    with pytest.raises(BatchCompositionError, match="positive and .* negative pairs"):
        MetricLoss()(x, torch.tensor(labels))


@pytest.fixture(scope="module")
def oracle():
    """dlib's own C++ (tools/dlib_oracle, built from dlib's sdist and cached)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "dlib_oracle"))
    from driver import DlibOracle
    o = DlibOracle()
    yield o
    o.close()


def _oracle_cases():
    """(name, embeddings, labels, gradient tolerance).  The tolerance is 5e-8 absolute except
    where a pair sits at D = 0: its coefficient ±scale/1e-3 (~40) multiplies equal rows that
    cancel in G·X, and float32 rounding of that cancellation (dlib's gemm vs ours) is ~7e-7."""
    yield "4x3 fixture", *_batch(0), 5e-8
    yield "5x5 (dlib example batch)", *_batch(1, n_ids=5, per_id=5), 5e-8
    yield "35x15 (dlib's own training batch)", *_batch(2, n_ids=35, per_id=15), 5e-8
    x, labels = _batch(3)
    x[4] = x[7]                                   # a different-identity duplicate: D = 0, 1e-3 clamp
    yield "zero-distance negative", x, labels, 2e-6
    yield "positives > negatives", *_batch(4, n_ids=2, per_id=6), 5e-8   # k capped at #negatives
    x, _ = _batch(5, n_ids=3, per_id=2)
    yield "uneven labels", x, np.array([0, 0, 1, 2, 2, 2]), 5e-8


@pytest.mark.oracle
def test_metric_matches_dlib_cpp(oracle):
    """Value and gradient against dlib's loss_metric_::compute_loss_value_and_gradient run by
    dlib's C++ itself, including the hard-negative cut, the clamp and unbalanced batches.
    Measured agreement: value <= 1.8e-7 relative (float Gram matrices summed in another order),
    gradient <= 2e-8 absolute (7e-7 with a zero-distance pair, see _oracle_cases)."""
    for name, x, labels, atol in _oracle_cases():
        for margin, thr in ((0.04, 0.6), (0.1, 0.75)):
            want_loss, want_grad = oracle.loss_metric(x, labels, margin, thr)
            loss, grad = metric_loss_and_gradient(torch.from_numpy(x), torch.from_numpy(labels), margin, thr)
            assert want_loss > 0, name
            assert loss == pytest.approx(want_loss, rel=1e-6), name
            np.testing.assert_allclose(grad.numpy(), want_grad, atol=atol, rtol=0, err_msg=name)


# ------------------------------------------------------------------------------------------

def test_cosface_and_arcface_logits_follow_definitions():
    torch.manual_seed(0)
    head = NormalizedClassifier(5, 8)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    cos = head(emb).detach()
    expect = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(
        head.weight, dim=1).T
    torch.testing.assert_close(cos, expect)
    cf = CosFaceMargin(64, 0.35)(cos, labels)
    af = ArcFaceMargin(64, 0.5)(cos, labels)
    for i, y in enumerate(labels.tolist()):
        for j in range(5):
            c = float(cos[i, j])
            if j == y:
                theta = math.acos(c)
                arc = math.cos(theta + 0.5) if theta + 0.5 < math.pi else c - math.sin(0.5) * 0.5
                assert float(cf[i, j]) == pytest.approx(64 * (c - 0.35), abs=1e-4)
                assert float(af[i, j]) == pytest.approx(64 * arc, abs=1e-3)
            else:
                assert float(cf[i, j]) == pytest.approx(64 * c, abs=1e-4)
                assert float(af[i, j]) == pytest.approx(64 * c, abs=1e-4)


def test_margin_softmax_trains_head_and_embedding():
    torch.manual_seed(0)
    loss_fn = make_loss("arcface", num_classes=3, dim=4)
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert emb.grad.abs().sum() > 0 and loss_fn.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="class indices"):
        loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 3]))


def test_triplet_semi_hard_selection():
    """1-D toy: anchor 0 at 0.0, positive 1 at 0.3; negatives at 0.1 (hard), 0.35 (semi-hard),
    0.9 (easy).  Semi-hard picks 0.35 → loss term 0.3 - 0.35 + 0.2 = 0.15."""
    pts = torch.tensor([[0.0], [0.3], [0.1], [0.35], [0.9]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    loss = TripletLoss(margin=0.2)(pts, labels)
    # Pairs (a,p) = (0,1): neg 0.35 at d=.35 → .15 ; (1,0): d_ap=.3, negs from 0.3: .2,.05,.6 →
    # closest farther than .3 is .6 → 0 (margin .2 → -.1 → 0).
    assert float(loss) == pytest.approx((0.15 + 0.0) / 2, abs=1e-5)


def test_triplet_falls_back_to_easiest_negative_when_none_is_farther():
    pts = torch.tensor([[0.0], [1.0], [0.2]])
    labels = torch.tensor([0, 0, 1])
    loss = TripletLoss(margin=0.2)(pts, labels)
    # a=0: d_ap=1, only negative d=.2 → 1-.2+.2=1.0 ; a=1: d_ap=1, neg d=.8 → .4
    assert float(loss) == pytest.approx(0.7, abs=1e-5)


def test_make_loss_rejects_unknown():
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("softmax")
    with pytest.raises(ValueError, match="identities"):
        make_loss("cosface")
