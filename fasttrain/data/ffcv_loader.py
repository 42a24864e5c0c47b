"""FFCV loader: the .beton read by `ffcv.loader.Loader` in our order (FFCV has no sampler API).

Raw sets: `NDArrayDecoder` -> uint8 pixels; every view is made in stage 2 (bit-identical to the other
loaders). Jpeg sets: one FFCV pipeline per view on the same `image` field (`PipelineSpec(source='image')`)
decoding with the view's RandomResizedCrop / Resize + CenterCrop in FFCV's JIT-compiled threads (decode
buffers sized by the largest image's pixels, `_decode_buffer`), then:
  - on a CPU device, a view without color ops: `FlipNormalize` finishes it inside FFCV (flip, normalize,
    layout in one pass), so the main thread has nothing left to do;
  - otherwise: FFCV's RandomHorizontalFlip, uint8 to the device, stage 2 there.
FFCV's jpeg crops and flips come from numba's per-thread generators: unlike the other loaders', they are
not a function of (seed, epoch, rank); the order is. Labels and source indices come from the split's
meta arrays, so the label fields are not decoded. FFCV sets torch's thread count to its `num_workers`; the
loader puts the process's count back (`torch_threads_kept`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import numba
import numpy as np
import torch

import fasttrain.ffcv_import  # noqa: F401  (before ffcv: keeps torch's thread count)
from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
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
        with torch_threads_kept():
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
        with torch_threads_kept():
            epoch = iter(self.loader)
        try:
            for outputs in epoch:
                # uint8 outputs live in FFCV's reused buffers: stage 2 copies them before the next batch.
                yield [outputs[0]] * len(self.views) if self.is_raw else list(outputs)
        finally:
            epoch.close()      # an epoch left early: stop FFCV's thread now (it would wait for a free slot forever)


@contextmanager
def torch_threads_kept():
    """FFCV's Loader sets torch's (process-wide) thread count to its num_workers when it is built and when an
    epoch starts: put the process's count back, so --workers never changes the training step's threads."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _output_name(view_index: int) -> str:
    return "image" if view_index == 0 else f"image_view{view_index}"


def _jpeg_decoder(view: ViewSpec):
    size = (view.size, view.size)
    if view.crop == "rrc":
        return RandomResizedCropDecoder(size, scale=view.scale, ratio=view.ratio)
    return ResizeCenterCropDecoder(size, ratio=view.center_ratio)


def _decode_buffer(metadata) -> AllocationQuery:
    """One image's decode buffer: the largest image's pixels x 3. FFCV's own decoders take the largest height
    x the largest width, which a tall and a wide image blow up (this buffer is allocated for every image of
    BATCHES_AHEAD + 2 batches)."""
    pixels = (metadata["height"].astype(np.uint64) * metadata["width"].astype(np.uint64)).max()
    return AllocationQuery((int(pixels) * 3,), np.dtype("<u1"))


class RandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder with `_decode_buffer`."""

    def declare_state_and_memory(self, previous_state: State):
        state, (output, _) = super().declare_state_and_memory(previous_state)
        return state, (output, _decode_buffer(self.metadata))


class ResizeCenterCropDecoder(CenterCropRGBImageDecoder):
    """The evaluation view as torchvision's Resize(S) + CenterCrop(size), S = round(size / ratio) (the paper's
    Resize(256) + CenterCrop(224)): decode, resize the whole image to shorter side S (FFCV's resize, OpenCV's
    INTER_AREA), copy the centre window at torchvision's position: the geometry of `augment.crop_boxes`.
    (FFCV's own center decoder crops int(ratio * shorter side) first: up to a pixel off.)"""

    def __init__(self, output_size, ratio):
        super().__init__(output_size, ratio)
        self.short_side = round(output_size[0] / ratio)

    def declare_state_and_memory(self, previous_state: State):
        state, (output, _) = super().declare_state_and_memory(previous_state)
        h, w = (self.metadata[k].astype(np.float64) for k in ("height", "width"))
        shorter, longer = np.minimum(h, w), np.maximum(h, w)
        resized = self.short_side * np.floor(self.short_side * longer / shorter).max()
        return state, (output, _decode_buffer(self.metadata), AllocationQuery((int(resized) * 3,), np.dtype("<u1")))

    def generate_code(self) -> Callable:
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        short, size = self.short_side, self.output_size[0]

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, resized = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = decoded[dst_ix][:3 * height * width].reshape(height, width, 3)
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = data.reshape(height, width, 3)
                if height <= width:
                    new_h, new_w = short, int(np.floor(short * width / height))
                else:
                    new_h, new_w = int(np.floor(short * height / width)), short
                out = resized[dst_ix][:3 * new_h * new_w].reshape(new_h, new_w, 3)
                resize_crop_c(image, 0, height, 0, width, out)
                top, left = int(np.round((new_h - size) / 2)), int(np.round((new_w - size) / 2))
                destination[dst_ix][:] = out[top:top + size, left:left + size]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
