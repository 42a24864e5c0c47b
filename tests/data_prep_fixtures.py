"""Tiny datasets in each source's original on-disk format, and readers of converted files (FFCV, DALI)."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def natural_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth 'natural-looking' RGB image (gradients + blurred noise): compresses like a photo."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    noise = rng.normal(size=(h // 8 + 2, w // 8 + 2, 3))
    blur = np.asarray(Image.fromarray(((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8))
                      .resize((w, h), Image.BICUBIC), np.float64)
    base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * xx[..., None] + rng.uniform(-60, 60, 3) * yy[..., None]
    return np.clip(0.5 * base + 0.5 * blur, 0, 255).astype(np.uint8)


def detailed_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-sized RGB image with detail at every scale, down to 3-pixel periods (band-limited noise at
    periods 60, 17, 7, 4.5 and 3.3 px): what an evaluation crop loses when the image is stored too small."""
    img = np.zeros((h, w, 3))
    for period in (60, 17, 7, 4.5, 3.3):
        noise = rng.normal(size=(int(h / period) + 2, int(w / period) + 2, 3))
        noise = ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)
        img += np.asarray(Image.fromarray(noise).resize((w, h), Image.BICUBIC), np.float64) - 128
    return np.clip(128 + 0.6 * img, 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image (antialiased bilinear), written out: the
    paper's evaluation transform with resize 256, size 224. Returns size x size x C float64."""
    w, h = img.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.float64)


def class_images(n_per_class: list[int], shape=(8, 8, 3), seed=0):
    """Random uint8 images with labels sorted by class (n_per_class[c] of class c)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8), labels


# ---------------------------------------------------------------- source formats


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[:len(data) - truncate])


def make_fmnist(root: Path, train_per_class=80, test_per_class=5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", train_per_class, 0), ("t10k", test_per_class, 1)):
        x, y = class_images([n] * 10, (28, 28), seed)
        perm = np.random.default_rng(seed).permutation(len(y))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x[perm])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y[perm].astype(np.uint8))
    return root


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def make_cifar10(root: Path, train_per_class=40, test_per_class=4) -> tuple[Path, np.ndarray, np.ndarray]:
    """cifar-10-batches-py with byte keys, as the real pickles; returns (dir, train images, train labels)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    x, y = class_images([train_per_class] * 10, (32, 32, 3), 0)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    for i, rows in enumerate(np.array_split(np.arange(len(y)), 5), 1):
        _pickle(d / f"data_batch_{i}", {b"data": _cifar_rows(x[rows]), b"labels": y[rows].tolist()})
    xt, yt = class_images([test_per_class] * 10, (32, 32, 3), 1)
    _pickle(d / "test_batch", {b"data": _cifar_rows(xt), b"labels": yt.tolist()})
    _pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return d, x, y


def make_tinyimages(path: Path, per_class: list[int]) -> tuple[np.ndarray, np.ndarray]:
    x, y = class_images(per_class, (32, 32, 3), 7)
    _pickle(path, {"data": x, "extrapolated_targets": y})
    return x, y


def make_cifar100(root: Path, train_per_class=10, test_per_class=2) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        x, y = class_images([n] * 100, (32, 32, 3), seed)
        _pickle(d / name, {b"data": _cifar_rows(x), b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return d


def make_svhn(root: Path, per_class=(30, 4, 50), shape=(32, 32, 3)) -> Path:
    """train/test/extra_32x32.mat: X is H x W x 3 x N, y is 1..10 with 10 meaning digit 0."""
    from scipy.io import savemat
    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed in zip(("train", "test", "extra"), per_class, (0, 1, 2)):
        x, y = class_images([n] * 10, shape, seed)
        savemat(root / f"{name}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]})
    return root


def save_jpeg_variants(path: Path, img: np.ndarray, kind: str) -> None:
    """Save `img` as ImageNet's odd files do: rgb JPEG, CMYK JPEG, grayscale JPEG or a PNG named .JPEG."""
    pil = Image.fromarray(img)
    if kind == "cmyk":
        pil.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "gray":
        pil.convert("L").save(path, format="JPEG", quality=95)
    elif kind == "png":
        pil.save(path, format="PNG")
    else:
        pil.save(path, format="JPEG", quality=95)


def write_split(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_imagenet(root: Path, classes=4, per_class=(12, 3, 3), lt=(8, 5, 3, 2), size=(48, 64)):
    """ImageNet tree train/<wnid>/<wnid>_<k>.JPEG, val/<wnid>/ILSVRC2012_val_<k>.JPEG and OLTR split files.

    The LT train split takes lt[c] images of class c; the rest of train/ is the unlabeled pool. Image 1 of
    each class is CMYK, image 2 grayscale, image 3 a PNG named .JPEG. Returns (root, {path: rgb image})."""
    rng, pixels, kinds = np.random.default_rng(0), {}, ["rgb", "cmyk", "gray", "png"]
    lines = {"train": [], "val": [], "test": []}
    for c in range(classes):
        wnid = f"n{1440764 + c:08d}"
        for split, n in zip(("train", "val", "test"), per_class):
            d = root / ("train" if split == "train" else "val") / wnid
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{split}{c:03d}{k:04d}.JPEG"
                img = natural_image(rng, *size)
                kind = kinds[k % 4] if split == "train" else "rgb"
                save_jpeg_variants(d / name, img, kind)
                pixels[str(d / name)] = img if kind != "gray" else np.repeat(
                    np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)
                if split != "train" or k < lt[c]:
                    lines[split].append(f"{d.relative_to(root) / name} {c}")
    splits = {s: write_split(root / (f"ImageNet_LT_{s}.txt" + (".gz" if s != "train" else "")), lines[s])
              for s in lines}
    return root, splits, pixels


def make_inat(root: Path, per_class=(6, 4, 2, 1), size=(40, 30)):
    rng, lines, val_lines = np.random.default_rng(1), [], []
    cats = [("Plantae", 7291), ("Insecta", 673), ("Aves", 3000), ("Fungi", 12)]
    for label, ((sup, cid), n) in enumerate(zip(cats, per_class)):
        d = root / "train_val2018" / sup / str(cid)
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n + 1):
            name = f"{label:04d}{k:028d}.jpg"
            Image.fromarray(natural_image(rng, *size)).save(d / name, quality=95)
            (lines if k < n else val_lines).append(f"train_val2018/{sup}/{cid}/{name} {label}")
    return root, write_split(root / "iNaturalist18_train.txt", lines), write_split(root / "iNat_val.txt.gz", val_lines)


def make_folder(root: Path, per_class=(6, 5, 4), test_per_class=2, with_test=True, size=(24, 20)):
    rng = np.random.default_rng(2)
    for split, counts in (("train", per_class), ("test", [test_per_class] * len(per_class))):
        if split == "test" and not with_test:
            continue
        base = root / split if with_test else root
        for c, n in enumerate(counts):
            (base / f"class_{c}").mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(natural_image(rng, *size)).save(base / f"class_{c}" / f"{k}.png")
    return root


# ---------------------------------------------------------------- readers of converted files


def read_ffcv(path: Path, jpeg: bool = False):
    """All samples of a .beton in order: (images N x H x W x C, labels, source indices)."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    pipes = {"image": [SimpleRGBImageDecoder() if jpeg else NDArrayDecoder()],
             "label": [IntDecoder()], "index": [IntDecoder()]}
    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipes,
                    drop_last=False)
    parts = [(np.array(x), np.array(y).ravel(), np.array(i).ravel()) for x, y, i in loader]
    return tuple(np.concatenate(p) for p in zip(*parts))


def read_dali(shard_dir: Path, jpeg: bool = False):
    """All samples of a DALI webdataset shard dir in order, read with fn.readers.webdataset (CPU)."""
    from nvidia.dali import fn, pipeline_def, types
    tars = sorted(str(p) for p in Path(shard_dir).glob("*.tar"))
    ext = "jpg" if jpeg else "img.u8"

    @pipeline_def(batch_size=16, num_threads=2, device_id=None)
    def pipe():
        img, cls, idx = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                              ext=[ext, "cls", "idx"], dtypes=[types.UINT8, types.INT64, types.INT64],
                                              random_shuffle=False, pad_last_batch=True, name="reader")
        if jpeg:
            img = fn.decoders.image(img, device="cpu", output_type=types.RGB)
        return img, cls, idx

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    images, labels, index = [], [], []
    while len(labels) < n:
        x, y, i = p.run()
        images += [np.array(t) for t in x]
        labels += [int(np.array(t)[0]) for t in y]
        index += [int(np.array(t)[0]) for t in i]
    return images[:n], np.array(labels[:n]), np.array(index[:n])


def jpeg_bytes(img: np.ndarray, quality=95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()
