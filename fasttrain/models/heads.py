"""Classifier heads. Whatever the kind, the model stores its head as `model.fc` (torchvision's name).

Scale convention of the cosine head: `NormedLinear` returns raw cosine similarities in [-1, 1] and
applies NO scale. The scale lives in the loss: `LDAMLoss(scale=30)` multiplies the (margin-adjusted)
logits by s, as in LDAM-DRW, where the cosine head is used together with the LDAM loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ('linear', 'cosine')
HEAD_CHOICES = ('auto', *HEADS)   # --head: 'auto' (the default) picks the head from the loss, see head_for


def head_for(head: str, loss: str) -> str:
    """The head a run builds: `head` when it is 'linear' or 'cosine'; for 'auto' the paper's rule (train.py,
    train_semi.py, gen_pseudolabels.py: `use_norm = loss_type == 'LDAM'`): cosine with LDAM, linear otherwise.
    'auto' is what a config holds when --head was not given, also in its saved config.yaml, so a resumed run
    builds the head it was trained with (the loss cannot change on resume)."""
    if head == 'auto':
        return 'cosine' if loss == 'ldam' else 'linear'
    if head not in HEADS:
        raise ValueError(f'unknown head {head!r}; valid heads: {", ".join(HEAD_CHOICES)}')
    return head


class NormedLinear(nn.Module):
    """Cosine classifier (LDAM-DRW): cos(feature, w_c) per class, without bias.

    The weight is stored as (out_features, in_features) like `nn.Linear` (LDAM-DRW stores it
    transposed); `reset_parameters()` re-draws it, as `nn.Linear.reset_parameters()` does. Outputs
    are float32, autocast or not.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():  # LDAM-DRW's init: uniform, then every class vector scaled to norm 1
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: the loss multiplies these cosines by its scale (30)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}'


def build_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    if kind == 'linear':
        return nn.Linear(in_features, num_classes)
    if kind == 'cosine':
        return NormedLinear(in_features, num_classes)
    raise ValueError(f'unknown head {kind!r}; valid heads: {", ".join(HEADS)}')
