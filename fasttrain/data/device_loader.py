"""Device-resident loader: the whole split decoded once into one uint8 tensor on the device; each batch
is an index_select by our order plus stage 2, with no per-sample Python (the airbench recipe).

Raw sets: N x H x W x C exact pixels. Jpeg sets: every image decoded once into the top-left corner of an
N x max_side x max_side x 3 canvas with its (height, width) kept, and the view's crop (RandomResizedCrop or
center) and flip done in stage 2 on the device: bilinear `grid_sample`, without antialiasing, so eval
images differ slightly from the other loaders'. Memory: N * max_side^2 * 3 bytes (jpeg) on the device.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from fasttrain.data.base import LoaderBase
from fasttrain.data.shards import ShardReader, decode_rgb


class DeviceLoader(LoaderBase):
    kind = "device"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reader = self._shard_reader()
        if self.is_raw:
            images, self.sizes = reader.raw_images(self.image_shape), None
        else:
            images, self.sizes = _decode_all(reader, self.dataset.image["max_side"], self.workers)
        self.images = torch.from_numpy(images).to(self.device)

    def _stage2_spec(self, view):
        return view                   # crop and flip happen on the device for every set

    def _valid_sizes(self, positions: np.ndarray) -> torch.Tensor | None:
        return None if self.sizes is None else self.sizes[torch.from_numpy(positions)]

    def _decoded(self, positions: np.ndarray) -> Iterator[list[torch.Tensor]]:
        order = torch.from_numpy(positions).to(self.device)
        for batch in order.split(self.batch_size):
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
