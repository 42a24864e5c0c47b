"""Synthetic ImageNet-LT- and iNaturalist-2018-shaped source trees at the real class counts, for the scale
rehearsal (`benchmarks/scale_rehearsal.py`).

Each tree is laid out like the real dataset, so `python -m data_prep.convert --source imagenet_lt|inat2018`
reads it as it reads the originals:
- the val / test lists are the real public ones (`data_prep/splits/`: ImageNet-LT val 20,000 lines and test
  50,000, iNaturalist 2018 val 24,426), with a synthetic image at every path they name;
- the train list is synthesised with the dataset's long-tail profile between its real largest and smallest
  class (ImageNet-LT 1,280 .. 5, iNaturalist 2018 1,000 .. 2; exp profile, class order shuffled), divided by
  `scale` (at least one image per class), so a CPU rehearsal has few images per class and the real C;
- a 10-class reference tree has the same number of images in every split as the ImageNet-LT-shaped one and
  the same image size, so its per-image costs are those of the same work with 10 labels.

Images are small JPEGs (`size`), a class colour plus noise, a few per class: the point is the class count, not
the pixels.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.longtail import exp_profile

SPLITS = Path(__file__).resolve().parents[1] / "data_prep" / "splits"


@dataclass
class Shape:
    name: str               # "imagenet_lt", "inat2018", "reference10"
    source: str             # data_prep source the tree is converted as
    num_classes: int
    n_max: int              # the real dataset's largest / smallest train class
    n_min: int
    val_list: str           # real split lists in data_prep/splits (test_list may be "")
    test_list: str = ""


SHAPES = {
    "imagenet_lt": Shape("imagenet_lt", "imagenet_lt", 1000, 1280, 5, "ImageNet_LT_val.txt.gz",
                         "ImageNet_LT_test.txt.gz"),
    "inat2018": Shape("inat2018", "inat2018", 8142, 1000, 2, "iNaturalist18_val.txt.gz"),
}


def read_list(name: str) -> list[tuple[str, int]]:
    with gzip.open(SPLITS / name, "rt") as f:
        return [(path, int(label)) for path, label in (line.split() for line in f if line.strip())]


def train_counts(shape: Shape, scale: float, seed: int = 0) -> np.ndarray:
    """Per label: the exp long-tail profile from n_max to n_min over the real class count, divided by `scale`
    (>= 1 image each), assigned to the labels in a seeded random order (real class sizes are not sorted)."""
    profile = exp_profile(shape.num_classes, shape.n_max, shape.n_max / shape.n_min)
    counts = np.maximum(1, np.round(profile / scale)).astype(np.int64)
    return counts[np.random.default_rng(seed).permutation(shape.num_classes)]


def _jpeg(rng: np.random.Generator, label: int, size: tuple[int, int]) -> bytes:
    h, w = size
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.int16)
    img = np.clip(colour + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(root: Path, lines: list[tuple[str, int]], rng: np.random.Generator, size, variants: int = 3) -> None:
    """Every image of a class is one of `variants` JPEGs of that class (encoded once): the rehearsal measures
    the pipeline's cost per image, which does not depend on the pixels."""
    made, pool = set(), {}
    for k, (path, label) in enumerate(lines):
        target = root / path
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        key = (label, k % variants)
        if key not in pool:
            pool[key] = _jpeg(rng, label, size)
        target.write_bytes(pool[key])


def _list_file(path: Path, lines: list[tuple[str, int]]) -> Path:
    path.write_text("".join(f"{p} {c}\n" for p, c in lines))
    return path


def build(root: Path, shape: Shape, *, scale: float, size=(36, 48), seed: int = 0) -> dict:
    """Write the tree of `shape` under `root`; returns {"root", "train_list", "val_list", "test_list",
    "counts": {split: images}, "train_class_counts"}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    val = read_list(shape.val_list)
    test = read_list(shape.test_list) if shape.test_list else []
    class_dirs = {label: str(Path(path).parent) for path, label in val}
    counts = train_counts(shape, scale, seed)
    if shape.source == "imagenet_lt":   # ImageNet-LT train images live in train/<wnid>/ like its val list's
        train = [(f"{class_dirs[c]}/{Path(class_dirs[c]).name}_lt{k}.JPEG", c)
                 for c in range(shape.num_classes) for k in range(counts[c])]
    else:                               # iNaturalist 2018: train_val2018/<supercategory>/<id>/<name>.jpg
        train = [(f"{class_dirs[c]}/lt{k:06d}.jpg", c) for c in range(shape.num_classes) for k in range(counts[c])]
    for lines in (train, val, test):
        _write(root, lines, rng, size)
    out = {"root": str(root), "train_list": str(_list_file(root / "train_list.txt", train)),
           "val_list": str(_list_file(root / "val_list.txt", val)),
           "test_list": str(_list_file(root / "test_list.txt", test)) if test else "",
           "counts": {"train": len(train), "val": len(val), "test": len(test)},
           "train_class_counts": counts.tolist()}
    return out


def build_reference(root: Path, like: dict, *, classes: int = 10, size=(36, 48), seed: int = 0) -> dict:
    """A 10-class ImageNet-LT-layout tree with as many images per split as `like` (a `build` result):
    the same work as the large tree with `classes` labels (train long-tailed, val / test balanced)."""
    rng = np.random.default_rng(seed + 1)
    wnids = [f"n{10000000 + c:08d}" for c in range(classes)]
    n_train = like["counts"]["train"]
    profile = 2.0 ** -np.arange(classes)                        # halving: a long tail over 10 classes
    per_class = np.maximum(1, np.floor(profile / profile.sum() * n_train)).astype(np.int64)
    per_class[0] += n_train - per_class.sum()
    train = [(f"train/{wnids[c]}/{wnids[c]}_lt{k}.JPEG", c) for c in range(classes) for k in range(per_class[c])]
    splits = {}
    for split, folder in (("val", "train"), ("test", "val")):
        n = like["counts"][split]
        splits[split] = [(f"{folder}/{wnids[i % classes]}/{split}_{i:06d}.JPEG", i % classes) for i in range(n)]
    for lines in (train, *splits.values()):
        _write(root, lines, rng, size)
    return {"root": str(root), "train_list": str(_list_file(root / "train_list.txt", train)),
            "val_list": str(_list_file(root / "val_list.txt", splits["val"])),
            "test_list": str(_list_file(root / "test_list.txt", splits["test"])) if splits["test"] else "",
            "counts": {"train": len(train), **{s: len(v) for s, v in splits.items()}},
            "train_class_counts": per_class.tolist()}
