"""FFCV loader: the .beton read by `ffcv.loader.Loader` in our order (FFCV has no sampler API).

Raw sets: `NDArrayDecoder` -> uint8 pixels; every view is made in stage 2. Jpeg sets: one FFCV pipeline
per view on the same `image` field (`PipelineSpec(source='image')`), decoding with the view's
RandomResizedCrop / center crop and flipping in FFCV's JIT-compiled, multi-threaded code.
Labels and source indices come from the split's meta arrays, so the label fields are not decoded.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from fasttrain.data.augment import ViewSpec
from fasttrain.data.base import LoaderBase

BATCHES_AHEAD = 3


class EpochOrder(TraversalOrder):
    """Our per-epoch positions for FFCV. ffcv 1.0.2 takes a custom order as an instance and calls
    `order(loader)` on it, then `sample_order(epoch)` at every epoch."""

    def __init__(self, positions_for_epoch):
        self.positions_for_epoch = positions_for_epoch

    def __call__(self, loader: Loader) -> EpochOrder:
        self.loader = loader
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.positions_for_epoch(epoch)


class FfcvLoader(LoaderBase):
    kind = "ffcv"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        if self.is_raw:
            pipelines = {"image": [NDArrayDecoder(), ToTensor(), *to_device]}
        else:
            pipelines = {_output_name(i): PipelineSpec("image", decoder=_jpeg_decoder(view),
                                                       transforms=[*_flip(view), ToTensor(), *to_device])
                         for i, view in enumerate(self.views)}
        # Never distributed=True: the order is already this rank's shard.
        self.loader = Loader(str(self.files), batch_size=self.batch_size, num_workers=self.workers,
                             os_cache=True, order=EpochOrder(self.epoch_positions), drop_last=self.train,
                             pipelines={**pipelines, "label": None, "index": None},
                             batches_ahead=BATCHES_AHEAD)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.loader.next_epoch = epoch

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        self.loader.next_epoch = self.epoch       # iterating twice replays the same epoch
        for outputs in self.loader:
            # FFCV reuses its output buffers a few batches later; stage 2 copies before that.
            yield [outputs[0]] * len(self.views) if self.is_raw else list(outputs)


def _output_name(view_index: int) -> str:
    return "image" if view_index == 0 else f"image_view{view_index}"


def _jpeg_decoder(view: ViewSpec):
    size = (view.size, view.size)
    if view.crop == "rrc":
        return RandomResizedCropRGBImageDecoder(size, scale=view.scale, ratio=view.ratio)
    return CenterCropRGBImageDecoder(size, ratio=view.center_ratio)


def _flip(view: ViewSpec) -> list:
    return [RandomHorizontalFlip()] if view.flip else []
