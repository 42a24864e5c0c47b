"""Loaders: one interface over FFCV, DALI, plain PyTorch and device-resident data (DESIGN.md, "Loaders").

    loader = build_loader(DatasetDir(path), "train", kind="ffcv", batch_size=256,
                          views=[augment.small_train()], train=True, sampler="balanced")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...            # fasttrain.data.batch.Batch, everything on `device`
"""
from __future__ import annotations

from importlib import import_module
from typing import Sequence

import numpy as np
import torch

from fasttrain.data.augment import ViewSpec
from fasttrain.data.base import LoaderBase
from fasttrain.data.batch import Batch
from fasttrain.dataset import DatasetDir

KINDS = {"ffcv": ("fasttrain.data.ffcv_loader", "FfcvLoader"),
         "dali": ("fasttrain.data.dali_loader", "DaliLoader"),
         "torch": ("fasttrain.data.torch_loader", "TorchLoader"),
         "device": ("fasttrain.data.device_loader", "DeviceLoader")}


def build_loader(dataset: DatasetDir, split: str, *, kind: str, batch_size: int, views: Sequence[ViewSpec],
                 train: bool, sampler: str = "uniform", sampling_labels: np.ndarray | None = None,
                 positions: np.ndarray | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 workers: int | None = None, samples_per_class: int = 4, cb_beta: float = 0.9999) -> LoaderBase:
    """A loader of `split` yielding `Batch`es on `device` (see DESIGN.md for every argument).

    train=True: sampler order for (seed, epoch), sharded over ranks, drop_last. train=False: sequential,
    rank r reads block r, every sample exactly once. `workers`: threads (ffcv, dali, device) or worker
    processes (torch) of the backend; None or 0 = every usable CPU core. `samples_per_class`: run length of
    the class_aware sampler; `cb_beta`: beta of the resample sampler's effective numbers.
    The backend (ffcv, nvidia.dali) is imported only when its kind is asked for.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loader kind {kind!r}; pick one of {sorted(KINDS)}")
    module, name = KINDS[kind]
    cls = getattr(import_module(module), name)
    return cls(dataset, split, batch_size=batch_size, views=views, train=train, sampler=sampler,
               sampling_labels=sampling_labels, positions=positions, seed=seed, rank=rank,
               world_size=world_size, device=device, channels_last=channels_last, workers=workers,
               samples_per_class=samples_per_class, cb_beta=cb_beta)


__all__ = ["Batch", "KINDS", "LoaderBase", "ViewSpec", "build_loader"]
