"""Writers: image preparation (decode / resize / JPEG), FFCV .beton, DALI webdataset shards + index.

Each split's images are first put in an `ImageStore` (raw pixels, or JPEG bytes prepared by a process pool);
the FFCV and DALI writers then read from the same store, so both formats hold the same samples at the same
positions (for JPEG sets, the same JPEG bytes).

Stored size of JPEG sets (`stored_size`). The paper's transforms run on the original files: RandomResizedCrop
(224) for training, Resize(256) + CenterCrop(224) for evaluation. So an image is stored at its own size unless
its longer side exceeds `max_side` (default DEFAULT_MAX_SIDE = 800, the size of the iNaturalist 2018 release:
every iNat 2018 image and typical ImageNet images, about 500 px, are stored as they are); a larger image is
scaled down to `max_side` on its longer side, except that an image whose shorter side is at least
MIN_SHORT_SIDE (256) keeps at least 256 of it, so that the evaluation's Resize(256) is a downscale, as on the
original. An RGB or grayscale JPEG stored at its own size keeps its original bytes: no second JPEG loss, and
the fastest conversion. Anything else (CMYK, PNG, arrays, resized images) is decoded to RGB and encoded at
the given quality. The cap bounds the loaders' decode buffers (FFCV sizes them by the largest image).

Every file is written by the main process, in position order: the outputs are byte-identical for any
worker count, and a failed write (a full disk) raises in the main process instead of stranding a worker.
Worker processes only decode and encode images; one that dies ends the conversion with an error. They start
from a fork server, never by forking the converter: a fork of a process that holds threads (tqdm's monitor,
OpenMP, DALI or numba pools when the converter is called from Python) can copy a held lock and hang.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_prep import ConvertError

JPEG_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_LISTED = 20  # bad images named in one error message (the rest are counted)
DEFAULT_MAX_SIDE = 800  # cap on the longer side of a stored JPEG (see the module docstring)
MIN_SHORT_SIDE = 256  # the evaluation's Resize(256): a stored shorter side never drops below it
KEPT_MODES = ("RGB", "L")  # JPEGs every loader decodes as they are (FFCV, DALI, PIL); CMYK is re-encoded


def default_workers(workers: int | None) -> int:
    if workers is not None and workers < 1:
        raise ConvertError(f"--workers {workers}: must be at least 1 (or omitted for all cores)")
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

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


class JpegStore:
    """JPEGs (RGB or grayscale), concatenated in one file (`path`) with byte offsets and (height, width) per
    image; read through a memmap."""
    encoding, dali_ext = "jpeg", "jpg"

    def __init__(self, path: Path, offsets: np.ndarray, shapes: np.ndarray):
        self.path, self.offsets, self.shapes = path, offsets, shapes
        self.data = np.memmap(path, dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def payload(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def image(self, i: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.payload(i))).convert("RGB"))

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


_ITEMS = None  # the items a prepare worker reads (sent once to each worker by the pool's initializer)


def _set_items(items) -> None:
    global _ITEMS
    _ITEMS = items


def stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) an image is stored at (see the module docstring): as it is when its longer side is at
    most `max_side`; else `max_side` on the longer side, unless that takes a shorter side of at least
    MIN_SHORT_SIDE below it: then the shorter side is MIN_SHORT_SIDE and the longer one as torchvision's
    Resize(MIN_SHORT_SIDE) sizes it."""
    longer, shorter = max(width, height), min(width, height)
    if longer <= max_side:
        return width, height
    if shorter >= MIN_SHORT_SIDE and shorter * max_side / longer < MIN_SHORT_SIDE:
        new_longer, new_shorter = int(MIN_SHORT_SIDE * longer / shorter), MIN_SHORT_SIDE
    else:
        new_longer, new_shorter = max_side, max(1, round(shorter * max_side / longer))
    return (new_longer, new_shorter) if width >= height else (new_shorter, new_longer)


def to_jpeg(item, max_side: int, quality: int) -> tuple[bytes, tuple[int, int], str]:
    """One image (path, encoded bytes, or H x W x 3 array) -> (JPEG bytes, (height, width), how): `how` is
    "original" (a JPEG kept byte for byte: RGB or grayscale, already at its stored size; checked by decoding
    it), "re-encoded" (decoded to RGB and encoded at `quality`) or "resized" (also scaled to stored_size with
    antialiased bilinear, the filter of the paper's Resize: a stored shorter side of 256 holds Resize(256)'s
    pixels, up to the JPEG encoding)."""
    if isinstance(item, (str, Path)):
        with open(item, "rb") as f:
            item = f.read()
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise _BadImage("empty file (0 bytes)")
        img = Image.open(io.BytesIO(item))
        width, height = img.size
        target = stored_size(width, height, max_side)
        if img.format == "JPEG" and img.mode in KEPT_MODES and target == (width, height):
            img.draft(img.mode, (width // 8, height // 8))  # decodes every byte (a bad file raises), at 1/8 scale
            img.load()
            return bytes(item), (height, width), "original"
    else:
        img = Image.fromarray(np.asarray(item, dtype=np.uint8))
        width, height = img.size
        target = stored_size(width, height, max_side)
    img = img.convert("RGB")
    if img.size != target:      # antialiased bilinear: the filter of the paper's Resize (torchvision on PIL)
        img = img.resize(target, Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), (img.height, img.width), "re-encoded" if target == (width, height) else "resized"


class _BadImage(Exception):
    """An input image that cannot be used; the message says why."""


def _prepare_range(args):
    start, stop, max_side, quality = args
    results = []
    for i in range(start, stop):
        try:
            results.append((*to_jpeg(_ITEMS[i], max_side, quality), None))
        except FileNotFoundError:
            results.append((None, None, None, "missing file"))
        except _BadImage as e:
            results.append((None, None, None, str(e)))
        except UnidentifiedImageError:
            results.append((None, None, None, "not an image (no format PIL can read)"))
        except JPEG_ERRORS as e:
            results.append((None, None, None, f"unreadable or truncated image ({type(e).__name__}: {e})"))
    return results


def worker_context() -> mp.context.BaseContext:
    """Fork-server workers that have pre-imported this module (see the module docstring)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def ordered_map(fn, n: int, workers: int, chunk: int, extra: tuple, desc: str, items):
    """Yield fn((start, stop, *extra)) results for consecutive ranges of 0..n, in order, from worker
    processes that each receive `items` once (as `_ITEMS`); a bounded number of ranges is in flight.
    A worker that dies is a ConvertError."""
    ranges = [(s, min(n, s + chunk), *extra) for s in range(0, n, chunk)]
    window = 4 * workers
    try:
        with ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_set_items,
                                 initargs=(items,)) as ex:
            futures = [ex.submit(fn, r) for r in ranges[:window]]
            for k in range(len(ranges)):
                if k + window < len(ranges):
                    futures.append(ex.submit(fn, ranges[k + window]))
                yield from futures[k].result()
                futures[k] = None
    except BrokenProcessPool as e:
        raise ConvertError(f"a worker process died while preparing {desc} images (killed, or out of memory?); "
                           f"re-run with fewer --workers") from e


def prepare_jpegs(items, path: Path, *, max_side: int, quality: int, workers: int,
                  names: list[str], skip_bad: bool, desc: str) -> tuple[JpegStore, np.ndarray, list[dict]]:
    """Store `items` as JPEGs (`to_jpeg`) in `path` with a process pool.

    Returns the store (`store.stored`: how many images were kept as they are, re-encoded, resized), the
    positions kept (into `items`) and the skipped files [{split, file, reason}]. Bad items are all found in
    one pass; without `skip_bad` they are then one ConvertError listing them."""
    offsets, shapes, kept, bad = [0], [], [], []
    stored = {"original": 0, "re-encoded": 0, "resized": 0}
    with open(path, "wb") as f:
        results = ordered_map(_prepare_range, len(items), workers, 8, (max_side, quality), desc, items)
        for i, (data, shape, how, reason) in enumerate(tqdm(results, total=len(items), desc=f"prepare {desc}",
                                                            unit="img")):
            if data is None:
                bad.append({"split": desc, "file": names[i], "reason": reason})
                continue
            if not bad or skip_bad:  # after a fatal bad image only keep looking for more of them
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                shapes.append(shape)
                kept.append(i)
                stored[how] += 1
    if bad and not skip_bad:
        listed = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ConvertError(f"split {desc!r}: {len(bad)} bad image(s): {listed}{more}; restore each file or "
                           f"remove it from the source (for a split file: delete its line), or pass --skip-bad "
                           f"to skip them (they are then listed in manifest.json)")
    store = JpegStore(path, np.asarray(offsets, np.int64), np.asarray(shapes, np.int64).reshape(-1, 2))
    store.stored = stored
    return store, np.asarray(kept, np.int64), bad


# ---------------------------------------------------------------- FFCV


class _JpegBytesField:
    """Writes an already encoded JPEG into an RGBImageField slot (mode 'jpg'), as RGBImageField.encode does
    after its own encoding: the .beton then holds the store's JPEG bytes unchanged."""

    def __init__(self, jpg_mode: int):
        self.jpg_mode = jpg_mode

    def encode(self, destination, value, malloc):
        data, (height, width) = value
        destination["mode"], destination["height"], destination["width"] = self.jpg_mode, height, width
        destination["data_ptr"], storage = malloc(len(data))
        storage[:] = np.frombuffer(data, np.uint8)


def write_ffcv(path: Path, store, labels: np.ndarray, index: np.ndarray, *, max_side: int,
               jpeg_quality: int) -> None:
    """FFCV .beton with fields image, label, index (DESIGN.md), written by this process in position order
    (byte-identical for identical input). Uses FFCV's own header, metadata, page and allocation-table code."""
    import fasttrain.ffcv_import  # noqa: F401  (before ffcv: keeps torch's thread count)
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

    if store.encoding == "raw":
        image_field = NDArrayField(np.dtype(np.uint8), tuple(store.images.shape[1:]))
        encoder, largest = image_field, int(np.prod(store.images.shape[1:]))
    else:
        image_field = RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality)
        encoder = _JpegBytesField(IMAGE_MODES["jpg"])
        largest = int(np.diff(store.offsets).max()) if len(store) else 1
    page_size = max(MIN_PAGE_SIZE, 1 << int(np.ceil(np.log2(4 * max(largest, 1)))))
    fields = {"image": image_field, "label": IntField(), "index": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    writer.num_samples = len(store)
    writer.prepare()
    try:
        metadata = np.zeros(len(store), dtype=writer.metadata_type)
        allocator = MemoryAllocator(str(path), writer.data_region_start, page_size)
        encoders = {"image": encoder, "label": fields["label"], "index": fields["index"]}
        allocator.__enter__()
        try:
            for i in range(len(store)):
                value = store.image(i) if store.encoding == "raw" else (store.payload(i), store.shapes[i])
                handle_sample((value, int(labels[i]), int(index[i])), i, writer.metadata_type.names, metadata,
                              allocator, encoders)
            allocator.flush_page()
        finally:
            allocator.fp.close()
        writer.metadata_sm.buf[:metadata.nbytes] = metadata.view(np.uint8)
        writer.finalize(allocator.allocations)
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


# ---------------------------------------------------------------- DALI webdataset


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one member; return (data offset, size) as DALI's index needs them."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - ((len(data) + 511) // 512) * 512, len(data)


def dali_bytes(store, shard_size: int) -> int:
    """Size of the shards write_dali writes for `store` (tar headers, padding, end blocks; idx files small)."""
    n = len(store)
    if store.encoding == "raw":
        payload = n * (512 + (store.nbytes // max(n, 1) + 511) // 512 * 512)
    else:  # each JPEG is padded to 512 bytes: at most n * 511 extra
        payload = n * 1024 + store.nbytes
    shards = -(-n // shard_size)
    return payload + n * 2 * (512 + 512) + shards * (10240 + 100 * shard_size)


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
