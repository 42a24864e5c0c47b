"""Plain PyTorch loader, the reference: a `DataLoader` over the DALI shard files (random access through
`shards.py`), PIL decoding in worker processes, batches from our order.

Every batch is fetched whole by one worker (`__getitems__`); its stage-1 randomness (jpeg crop and flip)
comes from a seed derived from (seed, epoch, rank, batch number), so it does not depend on which worker
ran it, nor on the batch an epoch started at.

Workers start from a fork server, never by forking this process: by the time a loader starts, the trainer
holds threads (PyTorch's and OpenMP's pools, DALI and FFCV/numba workers, tqdm's monitor), and a fork taken
while one of them holds a lock copies that lock held forever, a hang that comes once in many runs. The
server is a fresh interpreter that has imported only this module; each worker is forked from it.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fasttrain.data.augment import ViewSpec, crop_boxes, flips
from fasttrain.data.base import LoaderBase, derive_seed
from fasttrain.data.shards import ShardReader, decode_rgb


class ShardBatches(Dataset):
    """Key: (seed, positions) -> one uint8 N x H x W x C tensor (raw), or one per view (jpeg)."""

    def __init__(self, reader: ShardReader, views: list[ViewSpec], raw_shape: tuple[int, int, int]):
        self.reader, self.views, self.raw_shape = reader, views, raw_shape

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, key: tuple[int, np.ndarray]) -> list[torch.Tensor]:
        seed, positions = key
        if self.reader.is_raw:
            batch = np.stack([self.reader.image_bytes(p) for p in positions])
            return [torch.from_numpy(batch).view(len(positions), *self.raw_shape)]
        images = [decode_rgb(self.reader.image_bytes(p)) for p in positions]
        sizes = torch.tensor([[im.height, im.width] for im in images])
        generator = torch.Generator().manual_seed(seed)
        return [_crop_resize_flip(images, sizes, view, generator) for view in self.views]


def _crop_resize_flip(images: list[Image.Image], sizes: torch.Tensor, view: ViewSpec,
                      generator: torch.Generator) -> torch.Tensor:
    boxes = crop_boxes(view, sizes, generator).tolist()          # fractional for the center view
    mirror = flips(view, len(images), generator).tolist()
    out = np.empty((len(images), view.size, view.size, 3), np.uint8)
    for i, (image, (top, left, h, w), flip) in enumerate(zip(images, boxes, mirror)):
        crop = image.resize((view.size, view.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        out[i] = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop)
    return torch.from_numpy(out)


def worker_context() -> mp.context.BaseContext:
    """The start method of the workers: a fork server that has pre-imported this module (see the docstring)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _as_is(batch):
    return batch


class EpochKeys:
    """The DataLoader's batch sampler: this epoch's (seed, positions) keys, set before each epoch."""

    def __init__(self):
        self.keys: list[tuple[int, np.ndarray]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class TorchLoader(LoaderBase):
    kind = "torch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset_batches = ShardBatches(self._shard_reader(), self.views, self.image_shape)
        self.keys = EpochKeys()
        self.loader = DataLoader(self.dataset_batches, batch_sampler=self.keys, collate_fn=_as_is,
                                 num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=True,
                                 multiprocessing_context=worker_context())

    def close(self) -> None:
        """Stop the persistent worker processes now; a later epoch starts new ones."""
        iterator, self.loader._iterator = self.loader._iterator, None   # where DataLoader keeps them
        if iterator is not None:
            iterator._shutdown_workers()

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        self.keys.keys = [(derive_seed(self.seed, self.epoch, self.rank, b), positions[i:i + self.batch_size])
                          for b, i in enumerate(range(0, len(positions), self.batch_size), start=self.first_batch)]
        for decoded in self.loader:
            yield decoded * len(self.views) if self.is_raw else decoded
