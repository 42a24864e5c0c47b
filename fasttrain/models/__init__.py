"""Models: CIFAR ResNets (resnet20/32/44/56), torchvision-named ResNets (resnet10/18/50), heads,
backbone files and pretrained loading. See DESIGN.md, "Models"."""
from __future__ import annotations

from torch import nn

from .checkpoint import LoadReport, PretrainedMismatch, backbone_state_dict, load_pretrained, save_backbone
from .heads import HEAD_CHOICES, HEADS, NormedLinear, head_for
from .resnet import BasicBlock, Bottleneck, ResNet
from .resnet_cifar import ResNetCifar

CIFAR_DEPTHS = {'resnet20': 20, 'resnet32': 32, 'resnet44': 44, 'resnet56': 56}
IMAGENET_LAYOUTS = {'resnet10': (BasicBlock, [1, 1, 1, 1]), 'resnet18': (BasicBlock, [2, 2, 2, 2]),
                    'resnet50': (Bottleneck, [3, 4, 6, 3])}
ARCHS = (*CIFAR_DEPTHS, *IMAGENET_LAYOUTS)

__all__ = ['ARCHS', 'HEAD_CHOICES', 'HEADS', 'LoadReport', 'NormedLinear', 'PretrainedMismatch',
           'backbone_state_dict', 'build_model', 'head_for', 'load_pretrained', 'save_backbone']


def build_model(arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0,
                head: str = 'linear', zero_init_residual: bool = False) -> nn.Module:
    """A classifier with `.forward_features(x) -> (N, feature_dim)`, `.fc`, `.feature_dim`, `.arch`
    and `.forward(x) = fc(forward_features(x))`. `width` applies to the CIFAR ResNets only;
    `zero_init_residual` to resnet10/18/50 only (torchvision's option)."""
    if arch in CIFAR_DEPTHS:
        if zero_init_residual:
            raise ValueError(f'zero_init_residual is an option of {", ".join(IMAGENET_LAYOUTS)} only')
        model = ResNetCifar(CIFAR_DEPTHS[arch], num_classes, in_channels, width, head)
    elif arch in IMAGENET_LAYOUTS:
        if width != 1.0:
            raise ValueError(f'width is an option of {", ".join(CIFAR_DEPTHS)} only, got width={width} for {arch}')
        block, layers = IMAGENET_LAYOUTS[arch]
        model = ResNet(block, layers, num_classes, in_channels, head, zero_init_residual)
    else:
        raise ValueError(f'unknown arch {arch!r}; valid archs: {", ".join(ARCHS)}')
    model.arch = arch
    return model
