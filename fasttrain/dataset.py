"""Read and validate a dataset directory written by `data_prep.convert` (see DESIGN.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or malformed. The message names the file and the fix."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset directory: where its files are and its per-position labels."""
    name: str
    root: Path
    num_samples: int
    class_counts: list[int]
    labeled: bool
    ffcv_path: Path | None
    dali_dir: Path | None
    meta_path: Path
    true_labels_path: Path | None

    @cached_property
    def _meta(self):
        try:
            with np.load(self.meta_path) as z:
                labels, source_index = z["labels"].astype(np.int64), z["source_index"].astype(np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"{self.meta_path}: unreadable split metadata ({e}); "
                               f"re-run `python -m data_prep.convert` for this dataset") from e
        if len(labels) != self.num_samples or len(source_index) != self.num_samples:
            raise DatasetError(f"{self.meta_path}: holds {len(labels)} samples but manifest.json says "
                               f"{self.num_samples}; re-run `python -m data_prep.convert`")
        return labels, source_index

    @property
    def labels(self) -> np.ndarray:
        """File labels per position (-1 for the unlabeled pool)."""
        return self._meta[0]

    @property
    def source_index(self) -> np.ndarray:
        return self._meta[1]

    def true_labels(self) -> np.ndarray:
        """Analysis only: the unlabeled pool's hidden labels. Never feed these to a trainer."""
        if self.true_labels_path is None:
            raise DatasetError(f"split {self.name!r} has no true_labels file")
        return np.load(self.true_labels_path)


class DatasetDir:
    """A converted dataset: `DatasetDir(path).split('train')`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not self.root.is_dir():
            raise DatasetError(f"dataset directory {self.root} does not exist; create it with "
                               f"`python -m data_prep.convert --source ... --out {self.root}`")
        if not mpath.is_file():
            raise DatasetError(f"{mpath} is missing: {self.root} is not a complete fasttrain dataset "
                               f"(an interrupted conversion leaves no manifest). Re-run "
                               f"`python -m data_prep.convert ... --out {self.root}`")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{mpath} is not valid JSON ({e}); re-run `python -m data_prep.convert`") from e
        m = self.manifest
        for key in ("format_version", "num_classes", "image", "splits"):
            if key not in m:
                raise DatasetError(f"{mpath}: missing key {key!r}; re-run `python -m data_prep.convert`")
        if m["format_version"] != FORMAT_VERSION:
            raise DatasetError(f"{mpath}: format_version {m['format_version']} but this fasttrain reads "
                               f"{FORMAT_VERSION}; re-convert the dataset with this version")

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def image(self) -> dict:
        return self.manifest["image"]

    @property
    def channels(self) -> int:
        return int(self.image["channels"])

    @property
    def is_raw(self) -> bool:
        """Small images stored as exact pixels (CIFAR / SVHN / Fashion-MNIST scale)."""
        return self.image["encoding"] == "raw"

    @property
    def mean(self) -> list[float]:
        """Per-channel mean (0-255) every loader normalises with; see `normalization`."""
        return [float(v) for v in self.image["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.image["std"]]

    @property
    def normalization(self) -> str:
        """Where `mean` / `std` come from: "paper" (the paper's constants for its datasets) or "train_split"
        (the train split's statistics; also every dataset converted before this was recorded)."""
        return str(self.image.get("normalization", "train_split"))

    @property
    def largest_side(self) -> int | None:
        """JPEG sets: every stored image fits in a largest_side x largest_side square (None: raw sets)."""
        if self.is_raw:
            return None
        return int(self.image.get("largest_side") or self.image["max_side"])

    @property
    def class_names(self) -> list[str]:
        return self.manifest.get("class_names") or [str(i) for i in range(self.num_classes)]

    def has_split(self, name: str) -> bool:
        return name in self.manifest["splits"]

    def split(self, name: str) -> Split:
        splits = self.manifest["splits"]
        if name not in splits:
            raise DatasetError(f"{self.root / 'manifest.json'}: no split {name!r} (has {sorted(splits)})")
        s = splits[name]
        root = self.root / s["root"] if "root" in s else self.root   # a split may live in another directory

        def path(key):
            rel = s.get(key)
            return None if rel is None else root / rel

        return Split(name=name, root=root, num_samples=int(s["num_samples"]),
                     class_counts=[int(c) for c in s["class_counts"]], labeled=bool(s.get("labeled", True)),
                     ffcv_path=path("ffcv"), dali_dir=path("dali"), meta_path=path("meta"),
                     true_labels_path=path("true_labels"))

    def shot_counts(self, split: str = "train") -> list[int]:
        """Per-class counts that define the many/medium/few-shot groups: the labeled counts. A
        pseudo-labeled set's `class_counts` include its pseudo-labels; its `labeled_class_counts` do not."""
        labeled = self.manifest["splits"].get(split, {}).get("labeled_class_counts")
        return [int(c) for c in labeled] if labeled is not None else self.split(split).class_counts

    def eval_split(self) -> str:
        """The split to evaluate on: `test` (balanced) when present, else `val`."""
        for name in ("test", "val"):
            if self.has_split(name):
                return name
        raise DatasetError(f"{self.root / 'manifest.json'}: no test or val split to evaluate on")

    def require_files(self, split: str, kind: str) -> Path:
        """Path to the files a loader `kind` needs, with a clear error when they were not written."""
        s = self.split(split)
        p = s.ffcv_path if kind == "ffcv" else s.dali_dir
        if kind in ("ffcv",) and (p is None or not p.exists()):
            raise DatasetError(f"{self.root}: split {split!r} has no FFCV file ({p}); convert with "
                               f"`--formats ffcv,dali` or pick another --loader")
        if kind in ("dali", "torch", "device") and (p is None or not p.exists()):
            raise DatasetError(f"{self.root}: split {split!r} has no DALI shards ({p}); convert with "
                               f"`--formats ffcv,dali` or use --loader ffcv")
        return p
