"""Writers: image preparation (decode / resize / JPEG), FFCV .beton, DALI webdataset shards + index.

Each split's images are first put in an `ImageStore` (raw pixels, or clean RGB JPEG bytes prepared by a
process pool); the FFCV and DALI writers then read from the same store, so both formats hold the same
samples at the same positions.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep import ConvertError

JPEG_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def default_workers(workers: int | None) -> int:
    return workers or len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- image stores


class RawStore:
    """Small images kept as exact pixels: an N x H x W x C uint8 array."""
    encoding, dali_ext = "raw", "img.u8"

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def payload(self, i: int) -> bytes:
        return np.ascontiguousarray(self.images[i]).tobytes()


class JpegStore:
    """Clean RGB JPEGs, concatenated in one file (`path`) with byte offsets; read through a memmap."""
    encoding, dali_ext = "jpeg", "jpg"

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        self.data = np.memmap(path, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def payload(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def image(self, i: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.payload(i))).convert("RGB"))


_ITEMS = None  # the items a forked prepare worker reads (set before the pool forks; not pickled)


def to_jpeg(item, max_side: int, quality: int) -> bytes:
    """Decode anything PIL reads (path, encoded bytes, H x W x 3 array) to RGB, cap the long side, encode."""
    if isinstance(item, (str, Path)):
        with open(item, "rb") as f:
            item = f.read()
    if isinstance(item, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(item))
        img.draft("RGB", (max_side, max_side))  # DCT-domain downscale of big JPEGs; keeps size >= max_side
    else:
        img = Image.fromarray(np.asarray(item, dtype=np.uint8))
    img = img.convert("RGB")
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _prepare_one(args):
    i, max_side, quality = args
    try:
        return i, to_jpeg(_ITEMS[i], max_side, quality), None
    except FileNotFoundError:
        return i, None, "missing file"
    except JPEG_ERRORS as e:
        return i, None, f"unreadable or truncated image ({type(e).__name__}: {e})"


def prepare_jpegs(items, path: Path, *, max_side: int, quality: int, workers: int,
                  names: list[str], skip_bad: bool, desc: str) -> tuple[JpegStore, np.ndarray, list[dict]]:
    """Encode `items` to clean JPEGs in `path` with a process pool.

    Returns the store, the positions kept (into `items`) and the skipped files [{file, reason}]. A bad item
    is a ConvertError unless `skip_bad`."""
    global _ITEMS
    _ITEMS = items
    offsets, kept, skipped = [0], [], []
    jobs = [(i, max_side, quality) for i in range(len(items))]
    try:
        with open(path, "wb") as f, mp.get_context("fork").Pool(workers) as pool:
            for i, data, reason in tqdm(pool.imap(_prepare_one, jobs, chunksize=8), total=len(jobs),
                                        desc=f"prepare {desc}", unit="img"):
                if data is None:
                    if not skip_bad:
                        raise ConvertError(f"{names[i]}: {reason}; restore or remove the file, "
                                           f"or pass --skip-bad to skip bad images")
                    skipped.append({"file": names[i], "reason": reason})
                    continue
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                kept.append(i)
    finally:
        _ITEMS = None
    return JpegStore(path, np.asarray(offsets, np.int64)), np.asarray(kept, np.int64), skipped


# ---------------------------------------------------------------- FFCV


class _FfcvItems:
    """Indexable (image, label, index) view for ffcv's DatasetWriter (read in forked workers)."""

    def __init__(self, store, labels, index):
        self.store, self.labels, self.index = store, labels, index

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return self.store.image(i), int(self.labels[i]), int(self.index[i])


def write_ffcv(path: Path, store, labels: np.ndarray, index: np.ndarray, *, max_side: int,
               jpeg_quality: int, workers: int) -> None:
    """FFCV .beton with fields image, label, index (DESIGN.md)."""
    import fasttrain.ffcv_import  # noqa: F401  (before ffcv: keeps torch's thread count)
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    if store.encoding == "raw":
        image_field = NDArrayField(np.dtype(np.uint8), tuple(store.images.shape[1:]))
        sample_bytes = int(np.prod(store.images.shape[1:]))
    else:
        image_field = RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality)
        sample_bytes = 2 * max_side * max_side * 3  # worst case of one JPEG at this size
    page_size = max(MIN_PAGE_SIZE, 1 << int(np.ceil(np.log2(4 * sample_bytes))))
    chunk = 100
    n_workers = max(1, min(workers, -(-len(store) // chunk)))
    writer = DatasetWriter(str(path), {"image": image_field, "label": IntField(), "index": IntField()},
                           page_size=page_size, num_workers=n_workers)
    writer.from_indexed_dataset(_FfcvItems(store, labels, index), chunksize=chunk)


# ---------------------------------------------------------------- DALI webdataset


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one member; return (data offset, size) as DALI's index needs them."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - ((len(data) + 511) // 512) * 512, len(data)


def write_dali(out_dir: Path, store, labels: np.ndarray, index: np.ndarray, *, shard_size: int,
               desc: str) -> list[Path]:
    """Webdataset tar shards of `shard_size` samples + DALI index files (wds2idx format v1.2).

    Sample key `%09d` of the position; components <ext> (img.u8 or jpg), cls and idx (int64 LE)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, ext = [], store.dali_ext
    n = len(store)
    with tqdm(total=n, desc=f"dali {desc}", unit="img") as bar:
        for s, start in enumerate(range(0, n, shard_size)):
            tar_path, idx_path = out_dir / f"shard-{s:06d}.tar", out_dir / f"shard-{s:06d}.idx"
            lines = []
            with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for pos in range(start, min(n, start + shard_size)):
                    key, parts = f"{pos:09d}", []
                    for comp, data in ((ext, store.payload(pos)),
                                       ("cls", np.int64(labels[pos]).astype("<i8").tobytes()),
                                       ("idx", np.int64(index[pos]).astype("<i8").tobytes())):
                        offset, size = _add(tar, f"{key}.{comp}", data)
                        parts.append(f"{comp} {offset} {size} {key}.{comp}")
                    lines.append(" ".join(parts))
                    bar.update()
            idx_path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            written += [tar_path, idx_path]
    return written
