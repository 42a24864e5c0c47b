"""Device-resident loader: the whole split decoded once into one uint8 tensor on the device; each batch
is an index_select by our order plus stage 2, with no per-sample Python (the airbench recipe).

Raw sets: N x H x W x C exact pixels. Jpeg sets: every image decoded once into the top-left corner of an
N x S x S x 3 canvas (S: the dataset's largest stored side) with its (height, width) kept, and the view's
crop (RandomResizedCrop or center) and flip done in stage 2 on the device: bilinear `grid_sample`, without
antialiasing, so eval images differ slightly from the other loaders'. Memory: N * H * W * C bytes (raw) or N * S^2 * 3
bytes (jpeg) on the device, on EVERY rank (each holds the whole split): the loader estimates it first and
refuses, naming the estimate and the alternatives, when it exceeds `MAX_SHARE` of the free memory (CUDA:
`torch.cuda.mem_get_info`; CPU: available RAM), so that the model and its activations still fit.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import psutil
import torch

from fasttrain.data.base import LoaderBase
from fasttrain.data.shards import ShardReader, decode_rgb
from fasttrain.dataset import DatasetError

MAX_SHARE = 0.5      # of the free device memory (CPU: available RAM) one split may take


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device` (CUDA: mem_get_info; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


class DeviceLoader(LoaderBase):
    kind = "device"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reader = self._shard_reader()
        self.check_memory()
        if self.is_raw:
            images, self.sizes = reader.raw_images(self.image_shape), None
        else:
            images, sizes = _decode_all(reader, self.dataset.largest_side, self.workers)
            self.sizes = sizes.to(self.device)
        self.images = torch.from_numpy(images).to(self.device)

    def bytes_needed(self) -> int:
        """What this loader keeps on its device: the whole split decoded (every rank holds all of it)."""
        n = self.split.num_samples
        if self.is_raw:
            return n * int(np.prod(self.image_shape))
        side = self.dataset.largest_side
        return n * (side * side * 3 + 16)

    def check_memory(self) -> None:
        need, free = self.bytes_needed(), free_memory(self.device)
        if need > MAX_SHARE * free:
            raise DatasetError(
                f"--loader device: split {self.split.name!r} of {self.dataset.root} needs {need / 2**30:.2f} GiB "
                f"on {self.device} (decoded once, on every rank), more than {MAX_SHARE:.0%} of the "
                f"{free / 2**30:.2f} GiB free; use --loader ffcv or --loader dali (they stream from disk)")

    def _stage2_spec(self, view):
        return view                   # crop and flip happen on the device for every set

    def _valid_sizes(self, index: torch.Tensor) -> torch.Tensor | None:
        return None if self.sizes is None else self.sizes.index_select(0, index)

    def _start_epoch(self):
        positions, self._on_device, generator = super()._start_epoch()
        return positions, self._on_device, generator

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        for batch in self._on_device.split(self.batch_size):     # the epoch's positions, already on the device
            yield [self.images.index_select(0, batch)] * len(self.views)


def _decode_all(reader: ShardReader, max_side: int, workers: int) -> tuple[np.ndarray, torch.Tensor]:
    """Every JPEG of a split into a zero canvas (N x max_side x max_side x 3) and their (height, width)."""
    canvas = np.zeros((len(reader), max_side, max_side, 3), np.uint8)
    sizes = np.zeros((len(reader), 2), np.int64)

    def decode(pos: int) -> None:
        image = np.asarray(decode_rgb(reader.image_bytes(pos)))
        sizes[pos] = image.shape[:2]
        canvas[pos, :image.shape[0], :image.shape[1]] = image

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, range(len(reader))))
    return canvas, torch.from_numpy(sizes)
