"""Long-tail losses (as composed with in Yang & Xu 2020 / LDAM-DRW) and the re-weighting schedule.

Every loss is an nn.Module `loss(logits, targets) -> scalar` with an optional per-class `weight`
buffer, and computes in float32 whatever the logits dtype (bf16 autocast). `build_loss` returns the
`LongTailLoss(logits, targets, epoch)` the engine calls; epochs are 0-based.

Zero-count classes (no labeled sample): class-balanced weight 0, LDAM margin 0 (both only ever
apply to samples of that class), and a prior of 1 sample in the logit adjustments (finite logits).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ('ce', 'focal', 'ldam', 'balanced_softmax', 'logit_adjust')
REWEIGHTS = ('none', 'cb', 'drw')
CountsLike = Sequence[int] | np.ndarray | torch.Tensor


def _counts(class_counts: CountsLike) -> torch.Tensor:
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    if n.ndim != 1 or (n < 0).any() or n.sum() <= 0:
        raise ValueError(f'class_counts must be a 1-D list of non-negative counts, not all 0; got {class_counts}')
    return n


def class_balanced_weights(class_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. 2019: w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C (float32).
    Zero-count classes get weight 0. beta = 0 gives all-ones weights."""
    if not 0 <= beta < 1:
        raise ValueError(f'beta must be in [0, 1), got {beta}')
    n = _counts(class_counts)
    w = torch.where(n > 0, (1 - beta) / (1 - beta ** n), 0.0)
    return (w / w.sum() * len(n)).float()


def ldam_margins(class_counts: CountsLike, max_margin: float = 0.5) -> torch.Tensor:
    """Cao et al. 2019: m_c proportional to n_c^(-1/4), the rarest class gets `max_margin` (float32)."""
    n = _counts(class_counts)
    m = torch.where(n > 0, n.clamp(min=1) ** -0.25, 0.0)
    return (m * (max_margin / m.max())).float()


def log_prior(class_counts: CountsLike) -> torch.Tensor:
    """log(n_c / N), zero counts taken as 1 (float32)."""
    n = _counts(class_counts).clamp(min=1)
    return (n / n.sum()).log().float()


class _WeightedLoss(nn.Module):
    def __init__(self, weight: CountsLike | None = None):
        super().__init__()
        self.register_buffer('weight', None if weight is None else torch.as_tensor(weight, dtype=torch.float32))


class CrossEntropy(_WeightedLoss):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, weight=self.weight)


class FocalLoss(_WeightedLoss):
    """LDAM-DRW's focal loss: mean of (1 - p)^gamma * ce with p = exp(-ce), ce the per-sample
    (weighted) cross-entropy. With a weight, p is exp(-w * ce), as in that implementation, and the
    mean is over samples (not normalised by the weights like CrossEntropy)."""

    def __init__(self, gamma: float = 1.0, weight: CountsLike | None = None):
        super().__init__(weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), targets, weight=self.weight, reduction='none')
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()


class LDAMLoss(_WeightedLoss):
    """Cao et al. 2019: cross-entropy of scale * (logits - m_y on the true class). The scale belongs
    here, not in the model: pair it with the cosine head, as LDAM-DRW and the paper's code do (`--loss ldam`
    selects it unless --head is given)."""

    def __init__(self, class_counts: CountsLike, max_margin: float = 0.5, scale: float = 30.0,
                 weight: CountsLike | None = None):
        super().__init__(weight)
        if scale <= 0:
            raise ValueError(f'scale must be > 0, got {scale}')
        self.register_buffer('margins', ldam_margins(class_counts, max_margin))
        self.scale = scale

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        # scatter, not F.one_hot: one_hot reads the targets' range back to the host on the CPU
        true_class = torch.zeros_like(logits).scatter_(1, targets.unsqueeze(1), 1.0)
        return F.cross_entropy(self.scale * (logits - true_class * self.margins), targets, weight=self.weight)


class LogitAdjustedLoss(_WeightedLoss):
    """Menon et al. 2021 (logit-adjusted loss): cross-entropy of logits + tau * log prior.
    Predict with the raw logits."""

    def __init__(self, class_counts: CountsLike, tau: float = 1.0, weight: CountsLike | None = None):
        super().__init__(weight)
        self.register_buffer('adjustment', tau * log_prior(class_counts))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.adjustment, targets, weight=self.weight)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Ren et al. 2020: cross-entropy of logits + log prior (the logit-adjusted loss with tau = 1)."""

    def __init__(self, class_counts: CountsLike, weight: CountsLike | None = None):
        super().__init__(class_counts, 1.0, weight)


class LongTailLoss(nn.Module):
    """`loss` before epoch `drw_epoch` (0-based), `reweighted` from it on when given (DRW)."""

    def __init__(self, loss: nn.Module, num_classes: int, reweighted: nn.Module | None = None,
                 drw_epoch: int = 0):
        super().__init__()
        self.loss, self.reweighted = loss, reweighted
        self.num_classes, self.drw_epoch = num_classes, drw_epoch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f'logits have {logits.shape[1]} classes, class_counts has {self.num_classes}')
        if self.reweighted is not None and epoch >= self.drw_epoch:
            return self.reweighted(logits, targets)
        return self.loss(logits, targets)


def build_loss(name: str, class_counts: CountsLike, *, reweight: str, drw_epoch: int,
               cb_beta: float = 0.9999, focal_gamma: float = 1.0, ldam_max_margin: float = 0.5,
               ldam_scale: float = 30.0, la_tau: float = 1.0) -> LongTailLoss:
    """`reweight`: 'none'; 'cb' = class-balanced weights (cb_beta) from the start; 'drw' = no weights
    before the 0-based epoch `drw_epoch`, class-balanced weights (cb_beta) from it on (LDAM-DRW: 160 of 200
    epochs; the engine passes Config.schedule_epochs()["drw"], a position in the run)."""
    makers = {
        'ce': CrossEntropy,
        'focal': lambda w: FocalLoss(focal_gamma, w),
        'ldam': lambda w: LDAMLoss(class_counts, ldam_max_margin, ldam_scale, w),
        'balanced_softmax': lambda w: BalancedSoftmaxLoss(class_counts, w),
        'logit_adjust': lambda w: LogitAdjustedLoss(class_counts, la_tau, w),
    }
    if name not in makers:
        raise ValueError(f'unknown loss {name!r}; valid losses: {", ".join(LOSSES)}')
    if reweight not in REWEIGHTS:
        raise ValueError(f'unknown reweight {reweight!r}; valid: {", ".join(REWEIGHTS)}')
    num_classes = len(_counts(class_counts))
    make = makers[name]
    if reweight == 'none':
        return LongTailLoss(make(None), num_classes)
    weights = class_balanced_weights(class_counts, cb_beta)
    if reweight == 'cb':
        return LongTailLoss(make(weights), num_classes)
    if drw_epoch < 0:
        raise ValueError(f'drw_epoch must be >= 0, got {drw_epoch}')
    return LongTailLoss(make(None), num_classes, reweighted=make(weights), drw_epoch=drw_epoch)
