"""CIFAR ResNets (He et al. 2016, sec. 4.2) as in the LDAM-DRW / imbalanced-semi-self code.

conv3x3(16) -> 3 stages of n BasicBlocks (16, 32, 64 channels, strides 1, 2, 2) -> global avg pool,
depth = 6n + 2 (resnet20/32/44/56). Shortcuts are LDAM-DRW's option A: parameter-free identity,
subsampled by 2 and zero-padded on the channel axis where the stage changes shape (LDAM-DRW writes it
as a `LambdaLayer`; here a named module, so models pickle and compile). Convolutions and the linear
head get Kaiming-normal init (fan_in) as in LDAM-DRW. `width` multiplies the three stage widths
(rounded, at least 1), e.g. width=2 -> 32/64/128.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import build_head


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::stride, ::stride] with zero channels added on both sides."""

    def __init__(self, stride: int, in_planes: int, planes: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        reshapes = stride != 1 or in_planes != planes
        self.shortcut = ZeroPadShortcut(stride, in_planes, planes) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 head: str = 'linear'):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f'CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, ...), got {depth}')
        if width <= 0:
            raise ValueError(f'width must be > 0, got {width}')
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        for i, (out_planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes, out_planes, stride if b == 0 else 1))
                planes = out_planes
            setattr(self, f'layer{i}', nn.Sequential(*blocks))
        self.feature_dim = widths[-1]
        self.fc = build_head(head, self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
