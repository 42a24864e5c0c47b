"""DALI loader: the webdataset shards fed in our order through `fn.external_source`.

DALI's own readers shard and shuffle by themselves; to honour our sampler and rank sharding exactly,
the encoded bytes of each batch are read from the memory-mapped tars (`shards.py`) in our order and fed
to the pipeline. The pipeline is built ONCE per loader (first iteration) and serves every epoch: each epoch
only swaps the batches its external source hands out (an epoch left early is drained, then the pipeline is
reset). No DALI random operator is used: the random crop boxes and flips of training views are drawn in
Python from a generator seeded by (seed, epoch, rank, batch) - the very boxes and flips the torch loader
draws - and fed with the bytes, so batches are a pure function of (seed, epoch, rank) and need no rebuild.

Jpeg sets decode with `fn.decoders.image_slice` (the RandomResizedCrop box) + resize, or `fn.decoders.image`
+ a resize of the evaluation's center box (a region of interest: torchvision's Resize + CenterCrop, as the
torch loader), then the flip; on a CUDA device the decoding is `mixed`
(nvJPEG, hardware decoder where present) and everything after it runs on the GPU. Raw sets: the pixels are
fed as they are. Image sizes, needed for the crop boxes, are read from the JPEG headers the first time a
sample is seen and kept.

`mixed` decoder memory, set for 8 processes per node: `DEVICE_MEMORY_PADDING` 64 MiB of nvJPEG device
buffer per process (avoids re-allocations, which synchronise, on large images; 8 x 64 MiB = 0.5 GiB of a
node's GPU memory); `HOST_MEMORY_PADDING` 8 MiB of pinned host buffer per decoder thread (8 processes x
cores/8 threads each: at most 8 MiB x the node's cores, e.g. 1 GiB on 128 cores); `HW_DECODER_LOAD` 0.65,
the share of images given to the A100/H100 hardware JPEG decoder (the rest: CUDA nvJPEG), DALI's value for
ResNet-50 training.
"""
from __future__ import annotations

import io
import weakref
from typing import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

from fasttrain.data.augment import ViewSpec, crop_boxes, flips
from fasttrain.data.base import LoaderBase, derive_seed

PREFETCH = 2
DEVICE_MEMORY_PADDING = 64 << 20
HOST_MEMORY_PADDING = 8 << 20
HW_DECODER_LOAD = 0.65


class DaliLoader(LoaderBase):
    kind = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader = self._shard_reader()
        self.gpu = self.device.type == "cuda"
        self.sizes = np.zeros((self.split.num_samples, 2), np.int64)   # (height, width); 0 = not read yet
        self.pipe: Pipeline | None = None
        self.pipelines_built = 0
        self._feed: Iterator = iter(())
        self._pending = False          # the pipeline may still hold prefetched batches of an earlier epoch

    def close(self) -> None:
        self.pipe, self._pending, self._feed = None, False, iter(())

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        batches = [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]
        pipe = self._pipeline()
        self._drain()
        self._feed = EpochFeed(self, batches)
        self._pending = True
        for _ in batches:
            outputs = [self._to_torch(out) for out in pipe.run()]
            # Zero-copy on the CPU: valid until the next run(); stage 2 makes new tensors before that.
            yield outputs * len(self.views) if self.is_raw else outputs
        self._drain()

    def _drain(self) -> None:
        """End the current epoch in the pipeline: drop what it prefetched, then reset it for the next."""
        if not self._pending:
            return
        self._feed = iter(())
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass
        self.pipe.reset()
        self._pending = False


    def _pipeline(self) -> Pipeline:
        if self.pipe is not None:
            return self.pipe
        param_types = [] if self.is_raw else [t for v in self.views for t in _param_types(v)]
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.workers, prefetch_queue_depth=PREFETCH,
                        device_id=self._device_id(), seed=derive_seed(self.seed, self.rank) % 2 ** 31)
        loader = weakref.ref(self)     # no reference cycle: the pipeline goes as soon as the loader does

        def next_inputs():
            alive = loader()
            if alive is None:
                raise StopIteration
            return next(alive._feed)   # StopIteration ends the epoch for DALI

        with pipe:
            inputs = fn.external_source(source=next_inputs, num_outputs=1 + len(param_types), batch=True,
                                        dtype=[types.UINT8] + param_types)
            encoded, params = inputs[0], list(inputs[1:])
            if self.is_raw:
                pipe.set_outputs(encoded.gpu() if self.gpu else encoded)
            else:
                pipe.set_outputs(*(self._jpeg_view(encoded, view, params) for view in self.views))
        pipe.build()
        self.pipe, self.pipelines_built = pipe, self.pipelines_built + 1
        return pipe

    def _device_id(self) -> int | None:
        """None: a CPU-only pipeline."""
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _jpeg_view(self, encoded, view: ViewSpec, params: list):
        """Decode + crop + resize (+ flip) of one view; consumes this view's entries of `params`."""
        mixed = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING,
                     host_memory_padding=HOST_MEMORY_PADDING, hw_decoder_load=HW_DECODER_LOAD)
        decode = mixed if self.gpu else dict(device="cpu")
        if view.crop == "rrc":
            anchor, shape = params.pop(0), params.pop(0)
            image = fn.decoders.image_slice(encoded, anchor, shape, axis_names="WH", output_type=types.RGB,
                                            **decode)
            image = fn.resize(image, resize_x=view.size, resize_y=view.size)
        else:
            start, end = params.pop(0), params.pop(0)
            image = fn.decoders.image(encoded, output_type=types.RGB, **decode)
            image = fn.resize(image, size=[view.size, view.size], roi_start=start, roi_end=end, roi_relative=False)
        if view.flip:
            image = fn.flip(image, horizontal=params.pop(0))
        return image

    def _to_torch(self, output) -> torch.Tensor:
        tensor = output.as_tensor()
        if not self.gpu:
            return torch.from_dlpack(tensor)
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out


def _param_types(view: ViewSpec) -> list:
    """The external source's inputs of a jpeg view (EpochFeed): crop box, region of interest, flip."""
    box = {"rrc": [types.INT32] * 2, "center": [types.FLOAT] * 2}.get(view.crop, [])
    return box + [types.INT32] * int(view.flip)


class EpochFeed:
    """The external source's inputs for one epoch, batch by batch: the encoded samples and, per view, the
    crop box (rrc: anchor x, y and shape w, h; center: the region of interest's corners y, x) and the flip of
    each image. Holds no reference to the loader."""

    def __init__(self, loader: DaliLoader, batches: list[np.ndarray]):
        self.reader, self.sizes, self.views, self.is_raw = loader.reader, loader.sizes, loader.views, loader.is_raw
        self.image_shape, self.seeds = loader.image_shape, (loader.seed, loader.epoch, loader.rank)
        self.batches, self.index, self.first = batches, 0, loader.first_batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        if self.index >= len(self.batches):
            raise StopIteration
        positions, number = self.batches[self.index], self.first + self.index   # number in the epoch
        self.index += 1
        samples = [self.reader.image_bytes(p) for p in positions]
        if self.is_raw:
            return ([s.reshape(self.image_shape) for s in samples],)
        generator = torch.Generator().manual_seed(derive_seed(*self.seeds, number))
        sizes = torch.from_numpy(self.image_sizes(positions))
        params = []
        for view in self.views:
            if view.crop == "rrc":
                top, left, h, w = crop_boxes(view, sizes, generator).long().T
                params += [torch.stack([left, top], 1).int().numpy(), torch.stack([w, h], 1).int().numpy()]
            elif view.crop == "center":
                top, left, h, w = crop_boxes(view, sizes, generator).T
                params += [torch.stack([top, left], 1).float().numpy(),
                           torch.stack([top + h, left + w], 1).float().numpy()]
            if view.flip:
                params.append(flips(view, len(positions), generator).int().numpy())
        return (samples, *params)

    def image_sizes(self, positions: np.ndarray) -> np.ndarray:
        """(height, width) per position, read from the JPEG header the first time a sample is seen."""
        for p in positions[self.sizes[positions, 0] == 0]:
            width, height = Image.open(io.BytesIO(self.reader.image_bytes(p))).size   # header only
            self.sizes[p] = height, width
        return self.sizes[positions]
