"""Readers for each source dataset in its original on-disk format -> `Source`.

Raw sources (fmnist, cifar10, cifar100, svhn) load pixels into memory; jpeg sources (imagenet_lt,
inat2018, folder) list file paths, decoded later by the writers' process pool.

Source index spaces: a split's source index is the row in its source (the line number for split-file
sources). A separate pool (`Source.pool`: TinyImages file, SVHN extra, ImageNet train images not in the
LT split) continues the train numbering: pool row k has source index len(train) + k, so train and
unlabeled indices never collide.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep import ConvertError

SOURCES = ("fmnist", "cifar10", "cifar100", "svhn", "imagenet_lt", "inat2018", "folder")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]


@dataclass
class Part:
    """One split of a source: images (uint8 N x H x W x C array, or a list of file paths) and labels."""
    images: np.ndarray | list
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def take(self, rows: np.ndarray):
        """(images, labels) of `rows`."""
        if isinstance(self.images, np.ndarray):
            return self.images[rows], self.labels[rows]
        return [self.images[r] for r in rows], self.labels[rows]


@dataclass
class Source:
    name: str
    root: Path
    encoding: str                       # 'raw' | 'jpeg'
    class_names: list[str]
    train: Part
    test: Part | None = None
    val: Part | None = None
    pool: Part | None = None            # separate unlabeled pool (labels: true labels, -1 when unknown)
    pool_name: str | None = None
    longtail_given: bool = False        # train is already long-tailed (split-file sources)
    files: dict = field(default_factory=dict)  # role -> path read, recorded in the manifest

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def need(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise ConvertError(f"missing source file {path}; {fix}")
    return path


def first_existing(root: Path, names: list[str], fix: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    return need(root / names[0], fix)


def open_maybe_gzip(path: Path):
    """Open a file for binary reading, transparently un-gzipping it (by magic bytes, not by name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


# ---------------------------------------------------------------- Fashion-MNIST (idx)


def read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file of uint8 data (MNIST format), with a clear error when truncated."""
    try:
        with open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ConvertError(f"{path}: unreadable ({e}); re-download the file") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ConvertError(f"{path}: not a uint8 idx file (bad magic number); re-download the file")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int) if len(data) >= 4 + 4 * ndim else None
    if dims is None or len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ConvertError(f"{path}: truncated or corrupt idx file ({len(data)} bytes, header says "
                           f"{None if dims is None else tuple(dims)}); re-download the file")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fmnist(root: Path) -> Source:
    fix = "point --root at the directory holding the Fashion-MNIST idx files (.gz or unpacked)"
    files = {f"{prefix}-{kind}": first_existing(root, [f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"], fix)
             for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}

    def part(prefix):
        images, labels = read_idx(files[f"{prefix}-images-idx3"]), read_idx(files[f"{prefix}-labels-idx1"])
        if len(images) != len(labels) or images.ndim != 3:
            raise ConvertError(f"{root}: {prefix} has images of shape {images.shape} but {len(labels)} labels; "
                               f"re-download the Fashion-MNIST files")
        return Part(images[..., None], labels.astype(np.int64))
    return Source("fmnist", root, "raw", FMNIST_CLASSES, train=part("train"), test=part("t10k"),
                  files={k: str(v) for k, v in files.items()})


# ---------------------------------------------------------------- CIFAR (python pickles)


def unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable or truncated pickle ({e}); re-download the file") from e
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_part(paths: list[Path], label_key: str) -> Part:
    batches = [unpickle(p) for p in paths]
    data = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ConvertError(f"{paths[0]}: 'data' has shape {data.shape}, expected N x 3072; re-download")
    labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
    return Part(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)


def _cifar_dir(root: Path, sub: str) -> Path:
    return root / sub if (root / sub).is_dir() else root


def read_cifar10(root: Path, unlabeled_file: Path | None = None) -> Source:
    d = _cifar_dir(root, "cifar-10-batches-py")
    fix = "point --root at the extracted cifar-10-batches-py directory"
    train = _cifar_part([need(d / f"data_batch_{i}", fix) for i in range(1, 6)], "labels")
    test = _cifar_part([need(d / "test_batch", fix)], "labels")
    names = [n.decode() if isinstance(n, bytes) else n for n in unpickle(need(d / "batches.meta", fix))["label_names"]]
    src = Source("cifar10", root, "raw", names, train=train, test=test, files={"dir": str(d)})
    if unlabeled_file is not None:
        src.pool, src.pool_name = read_tinyimages(unlabeled_file), "tinyimages"
        src.files["unlabeled_file"] = str(unlabeled_file)
    return src


def read_tinyimages(path: Path) -> Part:
    """80M-TinyImages pool in the selection format: pickle with data N x 32 x 32 x 3, extrapolated_targets."""
    d = unpickle(need(path, "pass --unlabeled-file the TinyImages pool pickle (ti_80M_selected format)"))
    if "data" not in d or "extrapolated_targets" not in d:
        raise ConvertError(f"{path}: expected keys 'data' and 'extrapolated_targets', found {sorted(d)}")
    data = np.asarray(d["data"], np.uint8)
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise ConvertError(f"{path}: 'data' has shape {data.shape}, expected N x 32 x 32 x 3")
    return Part(data, np.asarray(d["extrapolated_targets"], np.int64))


def read_cifar100(root: Path) -> Source:
    d = _cifar_dir(root, "cifar-100-python")
    fix = "point --root at the extracted cifar-100-python directory"
    train = _cifar_part([need(d / "train", fix)], "fine_labels")
    test = _cifar_part([need(d / "test", fix)], "fine_labels")
    names = [n.decode() if isinstance(n, bytes) else n for n in unpickle(need(d / "meta", fix))["fine_label_names"]]
    return Source("cifar100", root, "raw", names, train=train, test=test, files={"dir": str(d)})


# ---------------------------------------------------------------- SVHN (.mat)


def read_svhn_mat(path: Path) -> Part:
    from scipy.io import loadmat
    try:
        m = loadmat(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConvertError(f"{path}: unreadable or truncated .mat file ({e}); re-download it") from e
    x, y = m["X"], m["y"].reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise ConvertError(f"{path}: X has shape {x.shape}, expected H x W x 3 x N with N = {len(y)}")
    return Part(np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8), np.where(y == 10, 0, y))


def read_svhn(root: Path, with_extra: bool) -> Source:
    fix = "point --root at the directory holding train_32x32.mat, test_32x32.mat (and extra_32x32.mat)"
    src = Source("svhn", root, "raw", [str(i) for i in range(10)],
                 train=read_svhn_mat(need(root / "train_32x32.mat", fix)),
                 test=read_svhn_mat(need(root / "test_32x32.mat", fix)))
    if with_extra:
        src.pool = read_svhn_mat(need(root / "extra_32x32.mat", fix + "; or pass --unlabeled-factor 0"))
        src.pool_name = "svhn_extra"
        src.files["extra"] = str(root / "extra_32x32.mat")
    return src


# ---------------------------------------------------------------- split files (ImageNet-LT, iNaturalist 2018)


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """OLTR split file (gzipped or plain): `<relative path> <label>` a line -> (paths, labels)."""
    need(Path(path), "pass an existing split file (lines `<relative path> <label>`)")
    paths, labels = [], []
    with open_maybe_gzip(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            rel, _, label = line.rpartition(" ")
            if not rel or not label.lstrip("-").isdigit():
                raise ConvertError(f"{path}:{n}: expected `<relative path> <label>`, got {line!r}")
            if int(label) < 0:
                raise ConvertError(f"{path}:{n}: negative label {label}; labels must be 0..C-1")
            paths.append(rel.strip())
            labels.append(int(label))
    if not paths:
        raise ConvertError(f"{path}: empty split file")
    return paths, np.asarray(labels, np.int64)


def _split_part(root: Path, split_file: Path, num_classes: int | None) -> tuple[Part, list[str]]:
    rel, labels = read_split_file(split_file)
    if num_classes is not None and (bad := np.flatnonzero(labels >= num_classes)).size:
        raise ConvertError(f"{split_file}:{bad[0] + 1}: label {labels[bad[0]]} is out of range for --num-classes "
                           f"{num_classes}; raise --num-classes or fix the split file")
    return Part([str(root / r) for r in rel], labels), rel


def _class_names_from_paths(rel: list[str], labels: np.ndarray, num_classes: int, depth: int) -> list[str]:
    """Class name = the last `depth` directories of each image's path (wnid, or supercategory/id)."""
    names = [str(c) for c in range(num_classes)]
    for r, c in zip(rel, labels):
        names[c] = "/".join(Path(r).parts[-1 - depth:-1])
    return names


def read_split_source(name: str, root: Path, split_file: Path | None, val_split_file: Path | None,
                      test_split_file: Path | None, num_classes: int | None, with_pool: bool) -> Source:
    if split_file is None:
        raise ConvertError(f"--source {name} needs --split-file (the long-tailed train list, e.g. "
                           f"ImageNet_LT_train.txt or iNaturalist18_train.txt)")
    train, rel = _split_part(root, split_file, num_classes)
    c = num_classes or int(train.labels.max()) + 1
    src = Source(name, root, "jpeg", _class_names_from_paths(rel, train.labels, c, 1 if name != "inat2018" else 2),
                 train=train, longtail_given=True, files={"split_file": str(split_file)})
    for role, path in (("val", val_split_file), ("test", test_split_file)):
        if path is not None:
            setattr(src, role, _split_part(root, path, c)[0])
            src.files[f"{role}_split_file"] = str(path)
    if with_pool and name == "imagenet_lt":
        src.pool, src.pool_name = _imagenet_pool(root, rel, train.labels), "imagenet_train_not_in_split"
    return src


def _imagenet_pool(root: Path, rel: list[str], labels: np.ndarray) -> Part:
    """ImageNet train images (root/train/<wnid>/*) not in the LT split; label from the split's wnid map."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise ConvertError(f"missing {train_dir}: the unlabeled pool is drawn from ImageNet train images "
                           f"not in the LT split; point --root at the ImageNet root or pass --unlabeled-factor 0")
    wnid_label = {Path(r).parts[-2]: int(c) for r, c in zip(rel, labels)}
    in_split = {os.path.normpath(r) for r in rel}
    paths, pool_labels = [], []
    for wnid in sorted(wnid_label):
        if not (train_dir / wnid).is_dir():
            continue
        for entry in sorted(os.scandir(train_dir / wnid), key=lambda e: e.name):
            r = os.path.normpath(f"train/{wnid}/{entry.name}")
            if entry.is_file() and r not in in_split and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(root / r))
                pool_labels.append(wnid_label[wnid])
    return Part(paths, np.asarray(pool_labels, np.int64))


# ---------------------------------------------------------------- class-per-folder tree


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_folder(root: Path, split_file: Path | None, test_split_file: Path | None,
                num_classes: int | None) -> Source:
    """`root/<class>/<img>` (classes sorted), or `root/train/<class>` [+ `root/test/<class>`], or a split file."""
    if not root.is_dir():
        raise ConvertError(f"missing source directory {root}; point --root at a class-per-folder tree")
    if split_file is not None:
        src = read_split_source("folder", root, split_file, None, test_split_file, num_classes, False)
        src.longtail_given = False
        return src
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConvertError(f"{train_dir} has no class sub-directories; expected {train_dir}/<class>/<image>")

    def part(d: Path) -> Part:
        paths, labels = [], []
        for c, name in enumerate(classes):
            files = _list_images(d / name) if (d / name).is_dir() else []
            paths += [str(p) for p in files]
            labels += [c] * len(files)
        return Part(paths, np.asarray(labels, np.int64))

    src = Source("folder", root, "jpeg", classes, train=part(train_dir))
    if train_dir != root and (root / "test").is_dir():
        if extra := sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes)):
            raise ConvertError(f"{root / 'test'} has class folders {extra[:5]} that are not in {train_dir}; "
                               f"every test class must also be a train class")
        src.test = part(root / "test")
    return src


# ---------------------------------------------------------------- dispatch


def read_source(name: str, root, *, unlabeled_file=None, with_pool: bool = True, split_file=None,
                val_split_file=None, test_split_file=None, num_classes: int | None = None) -> Source:
    """Read source `name` from `root` (see the module docstring for the formats)."""
    root = Path(root)
    if name not in SOURCES:
        raise ConvertError(f"unknown source {name!r}; use one of {', '.join(SOURCES)}")
    if name == "fmnist":
        return read_fmnist(root)
    if name == "cifar10":
        return read_cifar10(root, Path(unlabeled_file) if unlabeled_file and with_pool else None)
    if name == "cifar100":
        return read_cifar100(root)
    if name == "svhn":
        return read_svhn(root, with_pool)
    if name == "folder":
        return read_folder(root, split_file, test_split_file, num_classes)
    return read_split_source(name, root, split_file, val_split_file, test_split_file, num_classes, with_pool)
