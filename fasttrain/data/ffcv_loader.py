"""FFCV loader: the .beton read by `ffcv.loader.Loader` in our order (FFCV has no sampler API).

Raw sets: `NDArrayDecoder` -> uint8 pixels; every view is made in stage 2 (bit-identical to the other
loaders). Jpeg sets: one FFCV pipeline per view on the same `image` field (`PipelineSpec(source='image')`)
decoding with the view's RandomResizedCrop / center crop in FFCV's JIT-compiled threads, then:
  - on a CPU device, a view without color ops: `FlipNormalize` finishes it inside FFCV (flip, normalize,
    layout in one pass), so the main thread has nothing left to do;
  - otherwise: FFCV's RandomHorizontalFlip, uint8 to the device, stage 2 there.
FFCV's jpeg crops and flips come from numba's per-thread generators: unlike the other loaders', they are
not a function of (seed, epoch, rank); the order is. Labels and source indices come from the split's
meta arrays, so the label fields are not decoded. Note: FFCV sets torch.set_num_threads(workers).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import numba
import numpy as np
import torch

import fasttrain.ffcv_import  # noqa: F401  (before ffcv: keeps torch's thread count)
from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from fasttrain.data.augment import ViewSpec
from fasttrain.data.base import LoaderBase

BATCHES_AHEAD = 3


class EpochOrder(TraversalOrder):
    """Our per-epoch positions for FFCV. ffcv 1.0.2 takes a custom order as an instance and calls
    `order(loader)` on it, then `sample_order(epoch)` at every epoch."""

    def __init__(self, positions_for_epoch: Callable[[int], np.ndarray]):
        self.positions_for_epoch = positions_for_epoch

    def __call__(self, loader: Loader) -> EpochOrder:
        self.loader = loader
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.positions_for_epoch(epoch)


class FlipNormalize(Operation):
    """uint8 N x H x W x C -> float32 (x - mean) / std, N x C x H x W (channels_last strides if asked),
    each image flipped with probability 0.5 if `flip`: stage 2 of a view without color ops in one
    parallel pass in FFCV's threads. Each batch is a new numpy-allocated array (numpy asks the kernel for
    huge pages: far fewer page faults than torch.empty), so batches stay valid after the next one."""

    def __init__(self, mean, std, flip: bool, channels_last: bool):
        super().__init__()
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.flip_p, self.channels_last = 0.5 if flip else 0.0, channels_last

    def generate_code(self) -> Callable:
        def flip_normalize(images, _):
            n, h, w, c = images.shape
            if self.channels_last:
                out = np.empty((n, h, w, c), np.float32).transpose(0, 3, 1, 2)
            else:
                out = np.empty((n, c, h, w), np.float32)
            _flip_normalize(images, np.random.rand(n) < self.flip_p, self.mean, self.std, out)
            return torch.from_numpy(out)

        return flip_normalize

    def declare_state_and_memory(self, previous_state: State):
        h, w, c = previous_state.shape
        return replace(previous_state, jit_mode=False, shape=(c, h, w), dtype=torch.float32), None


@numba.njit(nogil=True, fastmath=True, parallel=True, cache=True)
def _flip_normalize(images, flips, mean, std, out):
    n, h, w, c = images.shape
    for i in numba.prange(n):
        for k in range(c):
            m, inv_std = mean[k], np.float32(1) / std[k]
            for y in range(h):
                row, dst = images[i, y, :, k], out[i, k, y]
                if flips[i]:
                    for x in range(w):
                        dst[x] = (np.float32(row[w - 1 - x]) - m) * inv_std
                else:
                    for x in range(w):
                        dst[x] = (np.float32(row[x]) - m) * inv_std


class FfcvLoader(LoaderBase):
    kind = "ffcv"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        if self.is_raw:
            pipelines = {"image": [NDArrayDecoder(), ToTensor(), *to_device]}
        else:
            pipelines = {_output_name(i): PipelineSpec("image", decoder=_jpeg_decoder(view),
                                                       transforms=self._jpeg_transforms(view, to_device))
                         for i, view in enumerate(self.views)}
        # Never distributed=True: the order is already this rank's shard.
        self.loader = Loader(str(self.files), batch_size=self.batch_size, num_workers=self.workers,
                             os_cache=True, order=EpochOrder(self.remaining_positions), drop_last=self.train,
                             pipelines={**pipelines, "label": None, "index": None},
                             batches_ahead=BATCHES_AHEAD)

    def _jpeg_transforms(self, view: ViewSpec, to_device: list) -> list:
        if self.device.type == "cpu" and not view.has_color_ops:
            return [FlipNormalize(self.dataset.mean, self.dataset.std, view.flip, self.channels_last)]
        return [*([RandomHorizontalFlip()] if view.flip else []), ToTensor(), *to_device]

    def close(self) -> None:
        """Unmap the .beton file, which FFCV otherwise keeps mapped for the loader's whole life; the next epoch
        maps it again. FFCV's epoch thread ends with its epoch (`_decoded` stops an epoch left early); numba's
        worker threads are process-wide and stay."""
        self.loader.memory_manager.context.mmap = None

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        super().set_epoch(epoch, first_batch)
        self.loader.next_epoch = epoch

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        self.loader.next_epoch = self.epoch       # iterating twice replays the same epoch
        epoch = iter(self.loader)
        try:
            for outputs in epoch:
                # uint8 outputs live in FFCV's reused buffers: stage 2 copies them before the next batch.
                yield [outputs[0]] * len(self.views) if self.is_raw else list(outputs)
        finally:
            epoch.close()      # an epoch left early: stop FFCV's thread now (it would wait for a free slot forever)


def _output_name(view_index: int) -> str:
    return "image" if view_index == 0 else f"image_view{view_index}"


def _jpeg_decoder(view: ViewSpec):
    size = (view.size, view.size)
    if view.crop == "rrc":
        return RandomResizedCropRGBImageDecoder(size, scale=view.scale, ratio=view.ratio)
    return CenterCropRGBImageDecoder(size, ratio=view.center_ratio)
