"""Rotation prediction (Gidaris et al., ICLR 2018), the self-supervised pre-training (SSP) that Yang & Xu
2020 use on CIFAR-10/100-LT (their `pretrain_rot.py`, whose datasets are CIFAR-10/100, ImageNet and iNat, not
SVHN; their ImageNet-LT and iNaturalist SSP results use MoCo v2): a 4-way classifier of the rotation (0, 90,
180, 270 degrees) of an image, no class label used. The backbone (`backbone.pt`) then initialises a supervised run
(`--pretrained RUN/backbone.pt`, the head re-initialised).

As the paper's `utils.rotation()`, each image of a batch gets ONE rotation and the batch's rotation labels
are a shuffled balanced list of 0..3 (N images per step). The paper permutes 4 * (N // 4 + 1) labels and
keeps the first N, so its per-batch counts are only close to balanced; here the N labels are exactly
balanced (counts differ by at most one when 4 does not divide N). The shuffle is drawn on the device and
the shapes depend only on N: no host synchronisation in a step.
Defaults (imbalanced-semi-self `pretrain_rot.py`): ResNet-32, SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128,
200 epochs, 5 warm-up epochs, step decay from epoch 160 (recipes/presets.py: ROTATION).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from .base import Method


def rotations(images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> (the N images, image i turned by labels[i] counter-clockwise quarter turns as
    `torch.rot90(x, k, dims=(2, 3))`, labels): labels are `arange(4)` repeated to N, in a random order
    (a permutation drawn on the images' device). Image i stays at position i."""
    n, _, h, w = images.shape
    if h != w:
        raise ValueError(f"rotation prediction needs square images (rotated copies are batched), got {h}x{w}")
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    perm = torch.randperm(n, device=images.device, generator=generator)
    shuffled = images[perm]
    bounds = [k * n // 4 for k in range(5)]            # quarter-blocks of the permuted batch; host-known sizes
    turned = torch.cat([torch.rot90(shuffled[a:b], k, dims=(2, 3)) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    sorted_labels = torch.cat([torch.full((b - a,), k, dtype=torch.long, device=images.device)
                               for k, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    rotated = torch.empty_like(turned).index_copy_(0, perm, turned).contiguous(memory_format=layout)
    labels = torch.empty_like(sorted_labels).index_copy_(0, perm, sorted_labels)
    return rotated, labels


class Rotation(Method):
    name = "rotation"
    evaluates = False

    def num_outputs(self) -> int:
        return 4

    def build_model(self) -> nn.Module:
        """A linear 4-way head whatever --head says: it is thrown away, and a cosine head (meant for the
        classifier stage of the same recipe) would need a scaled loss to learn the rotations."""
        cfg = self.cfg
        return build_model(cfg.arch, 4, in_channels=self.dataset.channels, width=cfg.width)

    def loss(self, model, batch, epoch):
        images, targets = rotations(batch.images)
        logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.detach().argmax(1) == targets).float().mean()
        return loss, {"loss": loss.detach(), "rotation_acc": accuracy}
