"""Random access into a split's DALI webdataset shards (DESIGN.md): `shard-*.tar` + DALI `.idx` files.

Positions are consecutive across the shards in order. The `.idx` files (wds2idx format v1.1 or v1.2:
`ext offset size [name]` per component) give each member's byte range; the tars are memory-mapped, so a
sample read is a slice of the page cache, with no copy and no syscall.
"""
from __future__ import annotations

import io
import mmap
from pathlib import Path

import numpy as np
from PIL import Image

from fasttrain.dataset import DatasetError

IMAGE_EXTS = ("img.u8", "jpg")


class ShardReader:
    """`reader.image_bytes(pos)` -> uint8 array (encoded JPEG, or raw H*W*C pixels); picklable for workers."""

    def __init__(self, dali_dir: str | Path):
        self.dir = Path(dali_dir)
        self.tars = sorted(self.dir.glob("shard-*.tar"))
        if not self.tars:
            raise DatasetError(f"{self.dir}: no shard-*.tar files; re-run `python -m data_prep.convert`")
        parsed = [_parse_index(t.with_suffix(".idx")) for t in self.tars]
        self.ext = parsed[0][0]
        if any(p[0] != self.ext for p in parsed):
            raise DatasetError(f"{self.dir}: shards mix image encodings; re-run `python -m data_prep.convert`")
        self.shard = np.concatenate([np.full(len(p[1]), i, np.int64) for i, p in enumerate(parsed)])
        self.offsets = np.concatenate([p[1] for p in parsed])      # (N, 3): image, cls, idx byte offsets
        self.sizes = np.concatenate([p[2] for p in parsed])
        self._maps = None

    @property
    def is_raw(self) -> bool:
        return self.ext == "img.u8"

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}      # workers map the files themselves

    def _data(self, shard: int) -> np.ndarray:
        if self._maps is None:                   # assigned whole: safe to race from threads
            self._maps = [_map(t) for t in self.tars]
        return self._maps[shard]

    def _member(self, pos: int, component: int) -> np.ndarray:
        start = self.offsets[pos, component]
        return self._data(self.shard[pos])[start:start + self.sizes[pos, component]]

    def image_bytes(self, pos: int) -> np.ndarray:
        """The stored image of a position: JPEG bytes or raw pixels (a read-only view, no copy)."""
        return self._member(pos, 0)

    def label(self, pos: int) -> int:
        return int(self._member(pos, 1).view("<i8")[0])

    def source_index(self, pos: int) -> int:
        return int(self._member(pos, 2).view("<i8")[0])

    def raw_images(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Every sample of a raw set as one N x H x W x C uint8 array."""
        out = np.empty((len(self), *shape), np.uint8)
        flat = out.reshape(len(self), -1)
        for pos in range(len(self)):
            flat[pos] = self.image_bytes(pos)
        return out


def _map(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


def decode_rgb(data: np.ndarray) -> Image.Image:
    """PIL image (RGB) of one encoded JPEG."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def _parse_index(idx_path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(image extension, (n, 3) offsets, (n, 3) sizes) of one shard; components image, cls, idx."""
    if not idx_path.is_file():
        raise DatasetError(f"{idx_path} is missing (DALI index of {idx_path.with_suffix('.tar').name}); "
                           f"re-run `python -m data_prep.convert`")
    lines = idx_path.read_text().split("\n")
    version, count = lines[0].split()
    step = {"v1.1": 3, "v1.2": 4}.get(version)
    if step is None:
        raise DatasetError(f"{idx_path}: unknown index version {version!r}")
    offsets, sizes, ext = np.zeros((int(count), 3), np.int64), np.zeros((int(count), 3), np.int64), None
    for row, line in enumerate(lines[1:1 + int(count)]):
        tokens = line.split()
        parts = {tokens[i]: (int(tokens[i + 1]), int(tokens[i + 2])) for i in range(0, len(tokens), step)}
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None or "cls" not in parts or "idx" not in parts:
            raise DatasetError(f"{idx_path}: sample {row} lacks an image, cls or idx component "
                               f"(has {sorted(parts)}); re-run `python -m data_prep.convert`")
        ext = ext or image_ext
        for c, name in enumerate((image_ext, "cls", "idx")):
            offsets[row, c], sizes[row, c] = parts[name]
    return ext, offsets, sizes
