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
SPLIT_SOURCE_CLASSES = {"imagenet_lt": 1000, "inat2018": 8142}  # class count of each split-file source
SVHN_CLASS_ORDER = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # the paper's code rolls the classes: digit 0 is the rarest
SVHN_N_MAX = 1000  # imbalance_svhn.py: img_max = 1000
# Input normalisation of the paper's code, per source: transforms.Normalize(mean, std) on the 0-1 scale.
# CIFAR-10/100: train.py, train_semi.py, gen_pseudolabels.py, pretrain_rot.py; SVHN: train.py, train_semi.py
# (0.5 / 0.5); ImageNet-LT and iNaturalist 2018: imagenet_inat/data/dataloader.py (RGB_statistics) and
# pretrain_moco.py. Sources the paper does not have (fmnist, folder) use the train split's statistics.
_CIFAR = {"name": "paper", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}
PAPER_NORMALIZATION = {
    "cifar10": _CIFAR, "cifar100": _CIFAR,
    "svhn": {"name": "paper", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "imagenet_lt": {"name": "paper", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "inat2018": {"name": "paper", "mean": (0.466, 0.471, 0.380), "std": (0.195, 0.194, 0.192)},
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot"]


@dataclass
class Part:
    """One split of a source: images (uint8 N x H x W x C array, or a list of file paths) and labels.

    `source_index`: per row (default: the row); `num_indices`: one past the last index the source numbers
    (a split file's line count, blank lines included); `origin`: per row, where it was listed (errors)."""
    images: np.ndarray | list
    labels: np.ndarray
    source_index: np.ndarray | None = None
    num_indices: int | None = None
    origin: list[str] | None = None

    def __len__(self):
        return len(self.labels)

    @property
    def index(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.source_index is None else self.source_index

    @property
    def index_end(self) -> int:
        return len(self) if self.num_indices is None else self.num_indices

    def take(self, rows: np.ndarray):
        """(images, labels) of `rows`."""
        if isinstance(self.images, np.ndarray):
            return self.images[rows], self.labels[rows]
        return [self.images[r] for r in rows], self.labels[rows]

    def names(self, rows: np.ndarray) -> list[str] | None:
        """How to name each of `rows` in an error (file paths, with the split-file line), or None (arrays)."""
        if isinstance(self.images, np.ndarray):
            return None
        if self.origin is None:
            return [str(self.images[r]) for r in rows]
        return [f"{self.images[r]} ({self.origin[r]})" for r in rows]


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
    class_order: list[int] | None = None  # labels from head to tail class (default 0..C-1)
    default_n_max: int | None = None    # head-class size when --max-per-class is not given
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
                 test=read_svhn_mat(need(root / "test_32x32.mat", fix)),
                 class_order=SVHN_CLASS_ORDER, default_n_max=SVHN_N_MAX)
    if with_extra:
        src.pool = read_svhn_mat(need(root / "extra_32x32.mat", fix + "; or pass --unlabeled-factor 0"))
        src.pool_name = "svhn_extra"
        src.files["extra"] = str(root / "extra_32x32.mat")
    return src


# ---------------------------------------------------------------- split files (ImageNet-LT, iNaturalist 2018)


def read_split_lines(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """OLTR split file (gzipped or plain): `<relative path> <label>` a line -> (paths, labels, line index of
    each entry (0-based; blank lines count, so it is the line number - 1), number of lines)."""
    need(Path(path), "pass an existing split file (lines `<relative path> <label>`)")
    paths, labels, lines, n = [], [], [], 0
    with open_maybe_gzip(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConvertError(f"{path}:{n}: not UTF-8 text; is this a split file?") from None
            if not line:
                continue
            rel, _, label = line.rpartition(" ")
            if not rel.strip() or not label.lstrip("-").isdigit():
                raise ConvertError(f"{path}:{n}: expected `<relative path> <label>`, got {line!r}")
            if int(label) < 0:
                raise ConvertError(f"{path}:{n}: negative label {label}; labels must be 0..C-1")
            paths.append(rel.strip())
            labels.append(int(label))
            lines.append(n - 1)
    if not paths:
        raise ConvertError(f"{path}: empty split file")
    return paths, np.asarray(labels, np.int64), np.asarray(lines, np.int64), n


def read_split_file(path: Path) -> tuple[list[str], np.ndarray]:
    """(paths, labels) of a split file (see read_split_lines)."""
    return read_split_lines(path)[:2]


def _split_part(root: Path, split_file: Path, num_classes: int, source: str) -> tuple[Part, list[str]]:
    rel, labels, lines, n_lines = read_split_lines(split_file)
    if (bad := np.flatnonzero(labels >= num_classes)).size:
        k = bad[0]
        raise ConvertError(f"{split_file}:{lines[k] + 1}: label {labels[k]} is out of range: {source} has "
                           f"{num_classes} classes (0..{num_classes - 1}); fix the line, or pass --num-classes "
                           f"if the source really has more classes ({len(bad)} such line(s))")
    origin = [f"line {i + 1} of {split_file}" for i in lines]
    return Part([str(root / r) for r in rel], labels, source_index=lines, num_indices=n_lines, origin=origin), rel


def _class_dir(rel: str, depth: int) -> str:
    return "/".join(Path(rel).parts[-1 - depth:-1])


def _check_class_dirs(parts: list[tuple[Path, list[str], np.ndarray, np.ndarray]], depth: int) -> None:
    """Every label must match its class directory (wnid, or supercategory/id) in all split files: one
    directory per label and one label per directory."""
    dir_label, label_dir = {}, {}
    for split_file, rel, labels, lines in parts:
        for r, c, line in zip(rel, labels.tolist(), lines.tolist()):
            where = f"{split_file}:{line + 1}"
            d = _class_dir(r, depth)
            if dir_label.setdefault(d, (c, where))[0] != c:
                c0, w0 = dir_label[d]
                raise ConvertError(f"{where}: {r} has label {c}, but {w0} gives class {d!r} label {c0}; every "
                                   f"image of a class must carry the class's label: fix one of the lines")
            if label_dir.setdefault(c, (d, where))[0] != d:
                d0, w0 = label_dir[c]
                raise ConvertError(f"{where}: label {c} is given to class {d!r}, but {w0} gives it to {d0!r}; "
                                   f"one label per class directory: fix one of the lines")


def _class_names_from_paths(rel: list[str], labels: np.ndarray, num_classes: int, depth: int) -> list[str]:
    """Class name = the last `depth` directories of each image's path (wnid, or supercategory/id)."""
    names = [str(c) for c in range(num_classes)]
    for r, c in zip(rel, labels):
        names[c] = _class_dir(r, depth)
    return names


def read_split_source(name: str, root: Path, split_file: Path | None, val_split_file: Path | None,
                      test_split_file: Path | None, num_classes: int | None, with_pool: bool) -> Source:
    """Source index of an entry = its line in the split file (0-based). The class count is the source's
    (SPLIT_SOURCE_CLASSES) unless --num-classes sets it; for `folder` the largest label + 1."""
    if split_file is None:
        raise ConvertError(f"--source {name} needs --split-file (the long-tailed train list, e.g. "
                           f"ImageNet_LT_train.txt or iNaturalist18_train.txt)")
    c = num_classes or SPLIT_SOURCE_CLASSES.get(name)
    if c is None:
        c = int(read_split_lines(split_file)[1].max()) + 1
    depth = 1 if name != "inat2018" else 2
    train, rel = _split_part(root, split_file, c, name)
    checked = [(split_file, rel, train.labels, train.source_index)]
    src = Source(name, root, "jpeg", _class_names_from_paths(rel, train.labels, c, depth),
                 train=train, longtail_given=True, files={"split_file": str(split_file)})
    for role, path in (("val", val_split_file), ("test", test_split_file)):
        if path is not None:
            part, part_rel = _split_part(root, path, c, name)
            setattr(src, role, part)
            checked.append((path, part_rel, part.labels, part.source_index))
            src.files[f"{role}_split_file"] = str(path)
    if name in SPLIT_SOURCE_CLASSES:
        _check_class_dirs(checked, depth)
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
