"""Backbone files and pretrained-weight loading.

A fasttrain backbone file is `torch.save({'arch': arch, 'state_dict': backbone_state_dict(model)})`
(write it with `save_backbone`). `load_pretrained` also reads official MoCo checkpoints, plain
torchvision state dicts and accelerate/DDP (`module.`) or torch.compile (`_orig_mod.`) prefixed state
dicts, `.safetensors` included. The classifier `fc.*` is never saved in a backbone nor loaded.
"""
from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WRAPPER_PREFIXES = ('module.', '_orig_mod.')   # DDP / accelerate, torch.compile
MOCO_ENCODER = 'encoder_q.'


class PretrainedMismatch(ValueError):
    """The file's weights do not fit the model (wrong architecture, shapes or recorded arch)."""


@dataclass
class LoadReport:
    missing: list[str]      # backbone keys of the model absent from the file (left as initialised)
    unexpected: list[str]   # non-fc keys of the file the model does not have (ignored)
    loaded: int             # tensors copied into the model


def _strip(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def _backbone_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unprefixed keys, only MoCo's query encoder when present, without the classifier `fc.*`."""
    state = {_strip(k): v for k, v in state.items()}
    if any(k.startswith(MOCO_ENCODER) for k in state):
        state = {_strip(k[len(MOCO_ENCODER):]): v for k, v in state.items() if k.startswith(MOCO_ENCODER)}
    return {k: v for k, v in state.items() if not k.startswith('fc.')}


def _bare(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) / torch.compile (`._orig_mod`) wrappers."""
    inner = [m for m in (getattr(model, 'module', None), getattr(model, '_orig_mod', None))
             if isinstance(m, nn.Module)]
    return _bare(inner[0]) if inner else model


bare_model = _bare    # public name: the model inside DDP / torch.compile wrappers


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the classifier `fc.*` (and without wrapper prefixes)."""
    return _backbone_keys(model.state_dict())


def save_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a fasttrain backbone file for a `build_model` model, wrapped or not (temp + rename)."""
    path, model = Path(path), _bare(model)
    state = {k: v.detach().cpu() for k, v in backbone_state_dict(model).items()}
    tmp = path.with_name(path.name + '.tmp')
    torch.save({'arch': model.arch, 'state_dict': state}, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> object:
    if path.suffix == '.safetensors':
        return load_file(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f'{path}: cannot be read with weights_only=True; unpickling it fully '
                      '(only do this with files you trust)', stacklevel=3)
        return torch.load(path, map_location='cpu', weights_only=False)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Copy the backbone weights of `path` into `model` (a `build_model` model; DDP / torch.compile
    wrappers are looked through). `model.fc` is never touched.

    Raises PretrainedMismatch when the recorded arch differs from `model.arch`, when any shared
    tensor has another shape, or when no backbone key matches at all.
    """
    path, model = Path(path), _bare(model)
    expected = getattr(model, 'arch', type(model).__name__)
    obj = _read(path)
    recorded = None
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        recorded, obj = obj.get('arch'), obj['state_dict']
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedMismatch(f'{path}: not a state dict, a fasttrain backbone file or a MoCo checkpoint')
    if recorded is not None and hasattr(model, 'arch') and recorded != model.arch:
        raise PretrainedMismatch(f'{path}: weights of a {recorded} model, expected {expected}')

    theirs = _backbone_keys(obj)
    own = backbone_state_dict(model)
    common = sorted(own.keys() & theirs.keys())
    bad = [f'{k}: file {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}'
           for k in common if theirs[k].shape != own[k].shape]
    if bad:
        raise PretrainedMismatch(f'{path}: {len(bad)} tensor shapes do not fit a {expected} model '
                                 f'(wrong architecture, width or in_channels?), e.g. ' + '; '.join(bad[:5]))
    if not common:
        raise PretrainedMismatch(f'{path}: no backbone key matches a {expected} model (wrong architecture?); '
                                 f'file keys e.g. {sorted(theirs)[:5]}, model keys e.g. {sorted(own)[:5]}')
    result = model.load_state_dict({k: theirs[k] for k in common}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith('fc.')]
    lacking = [k for k in missing if not k.endswith('num_batches_tracked')]
    if lacking:
        raise PretrainedMismatch(f'{path}: has no weights for {len(lacking)} tensors of a {expected} backbone '
                                 f'(a different architecture?), e.g. {lacking[:5]}')
    return LoadReport(missing=missing, unexpected=sorted(theirs.keys() - own.keys()), loaded=len(common))
