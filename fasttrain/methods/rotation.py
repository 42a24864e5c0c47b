"""Rotation prediction (Gidaris et al., ICLR 2018), the self-supervised pre-training (SSP) that Yang & Xu
2020 use on CIFAR-10/100-LT, SVHN-LT: a 4-way classifier of the rotation (0, 90, 180, 270 degrees) of
every image, no class label used. The backbone (`backbone.pt`) then initialises a supervised run
(`--pretrained RUN/backbone.pt`, the head re-initialised).

Each batch is turned into its four rotations on the device (4N images per step), as in Gidaris et al.
Defaults (imbalanced-semi-self `pretrain_rot.py`): ResNet-32, SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128,
200 epochs, 5 warm-up epochs, step decay from epoch 160 (recipes/presets.py: ROTATION).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from .base import Method


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> the 4N images [rot0(all), rot90(all), rot180(all), rot270(all)] and their labels
    (0..3, k = counter-clockwise quarter turns, `torch.rot90(x, k, dims=(2, 3))`)."""
    n, _, h, w = images.shape
    if h != w:
        raise ValueError(f"rotation prediction needs square images (rotated copies are batched), got {h}x{w}")
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)]).contiguous(memory_format=layout)
    labels = torch.arange(4, device=images.device).repeat_interleave(n)
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
