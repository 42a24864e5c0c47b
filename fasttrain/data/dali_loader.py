"""DALI loader: the webdataset shards fed in our order through `fn.external_source`.

DALI's own readers shard and shuffle by themselves; to honour our sampler and rank sharding exactly,
the encoded bytes of each batch are read from the memory-mapped tars (`shards.py`) in our order and fed
to the pipeline. Jpeg sets decode with `fn.decoders.image_random_crop` (RandomResizedCrop) or
`fn.decoders.image` + shorter-side resize + center crop, then flip; on a CUDA device the decoding is `mixed`
(nvJPEG) and everything after it runs on the GPU. Raw sets: the pixels are fed as they are.
The pipeline is rebuilt each epoch (milliseconds) with a seed derived from (seed, epoch, rank).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from fasttrain.data.augment import ViewSpec
from fasttrain.data.base import LoaderBase, derive_seed

PREFETCH = 2


class DaliLoader(LoaderBase):
    kind = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader = self._shard_reader()
        self.gpu = self.device.type == "cuda"

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        batches = [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]
        pipe = self._pipeline(batches)
        for _ in batches:
            outputs = [self._to_torch(out) for out in pipe.run()]
            # Zero-copy on the CPU: valid until the next run(); stage 2 makes new tensors before that.
            yield outputs * len(self.views) if self.is_raw else outputs

    def _pipeline(self, batches: list[np.ndarray]) -> Pipeline:
        shape = self.image_shape

        def feed(iteration: int) -> list[np.ndarray]:
            if iteration >= len(batches):
                raise StopIteration
            samples = [self.reader.image_bytes(p) for p in batches[iteration]]
            return [s.reshape(shape) for s in samples] if self.is_raw else samples

        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.workers, prefetch_queue_depth=PREFETCH,
                        device_id=self._device_id(),
                        seed=derive_seed(self.seed, self.epoch, self.rank) % 2 ** 31)
        with pipe:
            encoded = fn.external_source(source=feed, batch=True, dtype=types.UINT8)
            if self.is_raw:
                pipe.set_outputs(encoded.gpu() if self.gpu else encoded)
            else:
                pipe.set_outputs(*(self._jpeg_view(encoded, view) for view in self.views))
        pipe.build()
        return pipe

    def _device_id(self) -> int | None:
        """None: a CPU-only pipeline."""
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _jpeg_view(self, encoded, view: ViewSpec):
        device = "mixed" if self.gpu else "cpu"
        if view.crop == "rrc":
            image = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                                  random_area=view.scale, random_aspect_ratio=view.ratio,
                                                  num_attempts=10)
            image = fn.resize(image, resize_x=view.size, resize_y=view.size)
        else:
            image = fn.decoders.image(encoded, device=device, output_type=types.RGB)
            image = fn.resize(image, resize_shorter=view.size / view.center_ratio)
            image = fn.crop(image, crop=(view.size, view.size))
        if view.flip:
            image = fn.flip(image, horizontal=fn.random.coin_flip(probability=0.5))
        return image

    def _to_torch(self, output) -> torch.Tensor:
        tensor = output.as_tensor()
        if not self.gpu:
            return torch.from_dlpack(tensor)
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out
