"""Training losses for the 128-d face embedding.

``metric`` is a faithful port of dlib's ``loss_metric_`` (dlib-format.md §6.8): the same pair
counting, the same hard-negative threshold, the same float/double boundaries and the same
gradient, so that a fine-tune started from dlib's weights optimises exactly what dlib's own
trainer optimises.  ``arcface``/``cosface`` (additive angular / cosine margin on a normalised
classifier head) and ``triplet`` (online semi-hard mining) are the usual modern alternatives.

Every loss here is an ``nn.Module`` called as ``loss(embeddings, labels) -> scalar tensor`` so
the training loop does not care which one it runs; heads (the classifier of arcface/cosface)
live inside the loss module, are trained with it and are never exported — the exported model is
always dlib's 128-d embedding.

The factor of two, once and for all: dlib's ``compute_loss_value_and_gradient`` *reports* a sum
over ordered pairs (each unordered pair twice) but writes the gradient of the unordered-pair sum,
i.e. of **half** the reported value.  :class:`MetricLoss` therefore returns half of dlib's
reported loss; its autograd gradient is bit-for-bit the formula dlib writes, so an SGD step with
the same learning rate moves the weights exactly as dlib's solver does.  Use
:func:`metric_loss_and_gradient` (or ``2 * MetricLoss()(...)``) when the number must match what
dlib prints.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from ..errors import DlibbridgeError
from .config import LOSSES

__all__ = [
    "BatchCompositionError", "check_pairs", "metric_loss_and_gradient", "MetricLoss",
    "NormalizedClassifier", "ArcFaceMargin", "CosFaceMargin", "MarginSoftmaxLoss",
    "TripletLoss", "LOSSES", "make_loss",
]

# dlib stores margin and dist_thresh as float members; the thresholds below are formed in float.
DLIB_MARGIN = 0.04
DLIB_DIST_THRESH = 0.6


class BatchCompositionError(DlibbridgeError, ValueError):
    """A batch that cannot be trained on: metric losses need at least one positive pair (two
    images of one identity) and one negative pair (two identities).  dlib asserts here and
    aborts; we raise so the caller can say which data or sampler settings caused it."""


def check_pairs(labels: torch.Tensor) -> tuple[int, int]:
    """Count same-label and different-label unordered pairs; raise if either is zero."""
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.numel()
    _, counts = torch.unique(labels, return_counts=True)
    pos = int((counts * (counts - 1) // 2).sum())
    neg = n * (n - 1) // 2 - pos
    if pos < 1 or neg < 1:
        raise BatchCompositionError(
            f"batch of {n} images over {counts.numel()} identities has {pos} positive and {neg} "
            "negative pairs; a metric loss needs at least one of each (>= 2 identities in the batch "
            "and >= 2 images of at least one identity)")
    return pos, neg


# ------------------------------------------------------------------------------------------
# dlib loss_metric_
# ------------------------------------------------------------------------------------------

def _f32(x: float) -> np.float32:
    return np.float32(x)


@torch.no_grad()
def metric_loss_and_gradient(emb: torch.Tensor, labels: torch.Tensor,
                             margin: float = DLIB_MARGIN, dist_thresh: float = DLIB_DIST_THRESH,
                             ) -> tuple[float, torch.Tensor]:
    """dlib's ``loss_metric_::compute_loss_value_and_gradient`` for an (N, K) embedding batch.

    Returns ``(loss, grad)``: ``loss`` is the value dlib reports (a double; ordered-pair sum),
    ``grad`` the (N, K) float32 tensor dlib writes into the network's gradient input (gradient of
    half of ``loss``).  Arithmetic follows dlib's precision: the Gram matrix, squared distances,
    distances and thresholds in float32; the scale, the loss accumulator and the coefficient
    quotients in double, each coefficient then stored as float32; the gradient is G·X in float32.
    """
    x = emb.detach().to(torch.float32).reshape(emb.shape[0], -1)
    labels = torch.as_tensor(labels, device=x.device).reshape(-1)
    n = x.shape[0]
    if labels.numel() != n:
        raise ValueError(f"{n} embeddings but {labels.numel()} labels")
    check_pairs(labels.cpu())
    thr_lo = _f32(dist_thresh) - _f32(margin)       # float arithmetic, as in dlib
    thr_hi = _f32(dist_thresh) + _f32(margin)

    gram = x @ x.T
    diag = torch.diagonal(gram)
    d2 = (diag[:, None] + diag[None, :]) - 2 * gram
    d2 = torch.clamp(d2, min=0.0)
    dist = torch.sqrt(d2)                            # sqrt(0) = 0 matches dlib's d2<=0 branch

    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    num_pos = 1e-4 + float((same & upper).sum())
    num_neg = 1e-4 + float((~same & upper).sum())
    scale = 0.5 / num_pos

    # k-th smallest negative squared distance, k = #positives capped at #negatives; dlib indexes
    # a vector with the double min(P, Nn) - 1, which truncates.
    neg_d2 = torch.sort(d2[~same & upper]).values
    neg_thresh = torch.sqrt(neg_d2[int(min(num_pos, num_neg) - 1)])

    pos_act = same & off_diag & ~(dist < float(thr_lo))
    neg_act = ~same & ~(dist > float(thr_hi)) & ~(dist > neg_thresh)

    # Loss: double accumulator of scale * (float difference), over ordered pairs.
    pos_terms = (dist[pos_act] - torch.tensor(thr_lo, device=x.device)).to(torch.float64)
    neg_terms = (torch.tensor(thr_hi, device=x.device) - dist[neg_act]).to(torch.float64)
    loss = float(scale * pos_terms.sum() + scale * neg_terms.sum())

    # Coefficient matrix G (N×N): off-diagonal entries are float(±scale/d) computed in double;
    # the diagonal collects the opposite of each row's entries.
    d64 = dist.to(torch.float64)
    coef = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    coef[pos_act] = -scale / d64[pos_act]
    coef[neg_act] = scale / torch.clamp(d64[neg_act], min=float(_f32(0.001)))
    diag_coef = -coef.sum(dim=1)
    g = coef.to(torch.float32)
    g[torch.arange(n), torch.arange(n)] = diag_coef.to(torch.float32)
    return loss, (g @ x).reshape(emb.shape)


class _MetricLossFunction(torch.autograd.Function):
    """Autograd wrapper whose backward is dlib's own gradient (so ties, the hard-negative cut
    and the 1e-3 clamp behave exactly as in dlib, not as autograd of a re-derived formula)."""

    @staticmethod
    def forward(ctx, emb, labels, margin, dist_thresh):
        loss, grad = metric_loss_and_gradient(emb, labels, margin, dist_thresh)
        ctx.save_for_backward(grad)
        ctx.emb_dtype = emb.dtype
        return emb.new_tensor(0.5 * loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.emb_dtype), None, None, None


class MetricLoss(nn.Module):
    """dlib's ``loss_metric_`` as a training loss: returns **half** dlib's reported value, whose
    gradient is exactly dlib's (see the module docstring for why)."""

    def __init__(self, margin: float = DLIB_MARGIN, dist_thresh: float = DLIB_DIST_THRESH):
        super().__init__()
        self.margin = float(margin)
        self.dist_thresh = float(dist_thresh)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _MetricLossFunction.apply(emb, labels, self.margin, self.dist_thresh)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, dist_thresh={self.dist_thresh}"


# ------------------------------------------------------------------------------------------
# Margin-softmax losses: a normalised classifier head, then an additive margin on the target
# ------------------------------------------------------------------------------------------

class NormalizedClassifier(nn.Module):
    """cos θ between L2-normalised embeddings and L2-normalised class centres.  Kept apart from
    the margin so the head can be reused (or frozen) independently of arcface vs cosface."""

    def __init__(self, num_classes: int, dim: int = 128):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier head needs >= 2 training identities, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    @torch.no_grad()
    def init_from_centres(self, centres: torch.Tensor) -> None:
        """Start each class weight at its identity's mean embedding.  Fine-tuning starts from an
        embedding that already separates people; a random head would instead produce maximal
        loss and gradients ~50x larger than dlib's metric loss, which wreck the pretrained
        network in the first steps."""
        if centres.shape != self.weight.shape:
            raise ValueError(f"centres {tuple(centres.shape)} do not match the head {tuple(self.weight.shape)}")
        self.weight.copy_(F.normalize(centres.float(), dim=1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T


class ArcFaceMargin(nn.Module):
    """s·cos(θ + m) on the target class (ArcFace).  Past θ = π − m, cos(θ + m) is no longer
    decreasing in θ; there the standard linear continuation cos θ − m·sin m keeps the target logit
    monotone so gradients never push a badly-wrong sample the wrong way."""

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self._cos_m, self._sin_m = math.cos(m), math.sin(m)
        self._th = math.cos(math.pi - m)
        self._mm = math.sin(math.pi - m) * m

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, labels[:, None])
        sin = torch.sqrt(torch.clamp(1.0 - target * target, min=1e-12))
        phi = target * self._cos_m - sin * self._sin_m
        phi = torch.where(target > self._th, phi, target - self._mm)
        return self.s * cos.scatter(1, labels[:, None], phi)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class CosFaceMargin(nn.Module):
    """s·(cos θ − m) on the target class (CosFace / large-margin cosine loss)."""

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.s, self.m = float(s), float(m)

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, labels[:, None]) - self.m
        return self.s * cos.scatter(1, labels[:, None], target)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class MarginSoftmaxLoss(nn.Module):
    """Cross-entropy over margin-adjusted logits from a :class:`NormalizedClassifier`.  Labels
    must be class indices 0..num_classes-1 (the training identities)."""

    def __init__(self, head: NormalizedClassifier, margin: nn.Module):
        super().__init__()
        self.head = head
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        n_cls = self.head.weight.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            raise ValueError(f"labels must be class indices in [0, {n_cls}); got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return F.cross_entropy(self.margin(self.head(emb), labels), labels)


# ------------------------------------------------------------------------------------------
# Triplet loss with online semi-hard negative mining
# ------------------------------------------------------------------------------------------

class TripletLoss(nn.Module):
    """Mean over all anchor–positive pairs of max(0, d(a,p) − d(a,n) + margin) on Euclidean
    distances of the raw embeddings (dlib's space, where 0.6 is the match threshold).

    Negative selection (FaceNet's semi-hard rule): the closest negative that is still farther
    than the positive; when no negative is farther, the farthest negative (the least violating
    one), so an unlucky batch still yields a bounded, informative gradient instead of the
    hardest — often mislabelled — negative that makes training collapse.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = float(margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = emb.float()
        labels = torch.as_tensor(labels, device=x.device).reshape(-1)
        check_pairs(labels.cpu())
        n = x.shape[0]
        d2 = torch.clamp((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T, min=0.0)
        # sqrt'(0) is infinite; the tiny floor keeps identical embeddings from producing NaN.
        dist = torch.sqrt(d2 + 1e-12)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        a_idx, p_idx = torch.nonzero(same & ~eye, as_tuple=True)
        d_ap = dist[a_idx, p_idx]                                  # (T,)
        with torch.no_grad():
            d_an = dist[a_idx]                                     # (T, N)
            is_neg = ~same[a_idx]
            farther = is_neg & (d_an > d_ap[:, None])
            inf = torch.tensor(float("inf"), device=x.device)
            semi = torch.where(farther, d_an, inf).argmin(1)
            easiest = torch.where(is_neg, d_an, -inf).argmax(1)
            neg_idx = torch.where(farther.any(1), semi, easiest)
        d_neg = dist[a_idx, neg_idx]
        return F.relu(d_ap - d_neg + self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


# ------------------------------------------------------------------------------------------



def make_loss(name: str, num_classes: int | None = None, *, dim: int = 128,
              margin: float | None = None, scale: float = 64.0,
              dist_thresh: float = DLIB_DIST_THRESH) -> nn.Module:
    """Build a loss by name.  ``margin`` None picks each loss's published default (dlib 0.04,
    ArcFace 0.5, CosFace 0.35, triplet 0.2); ``num_classes`` is required for the classifier
    losses and ignored otherwise."""
    if name == "metric":
        return MetricLoss(DLIB_MARGIN if margin is None else margin, dist_thresh)
    if name == "triplet":
        return TripletLoss(0.2 if margin is None else margin)
    if name in ("arcface", "cosface"):
        if num_classes is None:
            raise ValueError(f"--loss {name} needs the number of training identities")
        head = NormalizedClassifier(num_classes, dim)
        m = (ArcFaceMargin(scale, 0.5 if margin is None else margin) if name == "arcface"
             else CosFaceMargin(scale, 0.35 if margin is None else margin))
        return MarginSoftmaxLoss(head, m)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
