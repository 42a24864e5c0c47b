"""The one thing every loader yields."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    views: tuple[torch.Tensor, ...]   # each N x C x H x W float32, normalized, on the training device
    labels: torch.Tensor              # int64 (N,), file labels: -1 for the unlabeled pool
    indices: torch.Tensor             # int64 (N,), source indices (provenance)

    @property
    def images(self) -> torch.Tensor:
        return self.views[0]

    def __len__(self) -> int:
        return self.labels.shape[0]
