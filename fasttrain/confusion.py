"""The confusion matrix of an evaluation, kept sparse: at most one entry per eval image is non-zero, so
its size follows the eval split, never the number of classes squared.

File `confusion.npz` (numpy's .npz, no pickled objects; `np.load(path)` reads it), for C classes:

    rows    int64 (K,)   true class
    cols    int64 (K,)   predicted class (top-1)
    counts  int64 (K,)   eval images with that (true, predicted) pair; every count > 0
    shape   int64 (2,)   (C, C)
    layout  str          this description, in one line

Entries are unique and sorted by (row, col); every pair not listed is 0, so
`dense[rows, cols] = counts` on a C x C zero matrix (or scipy.sparse.coo_matrix((counts, (rows, cols)),
shape)) is the whole matrix. K <= the number of eval images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_file

LAYOUT = ("confusion[rows[i], cols[i]] = counts[i] (rows: true class, cols: predicted class), every other entry "
          "0; shape (C, C); entries unique, sorted by (row, col)")


@dataclass(frozen=True)
class Confusion:
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    num_classes: int

    @classmethod
    def from_pairs(cls, labels, predictions, num_classes: int) -> "Confusion":
        """Count (true class, predicted class) pairs: one per eval image."""
        labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
        keys, counts = np.unique(labels * num_classes + predictions, return_counts=True)
        return cls(keys // num_classes, keys % num_classes, counts.astype(np.int64), int(num_classes))

    def totals(self) -> np.ndarray:
        """Eval images per true class (the row sums), length C."""
        return np.bincount(self.rows, weights=self.counts, minlength=self.num_classes).astype(np.int64)

    def correct(self) -> np.ndarray:
        """Correctly classified eval images per class (the diagonal), length C."""
        hit = self.rows == self.cols
        return np.bincount(self.rows[hit], weights=self.counts[hit], minlength=self.num_classes).astype(np.int64)

    def dense(self) -> np.ndarray:
        """The C x C int64 matrix: C * C * 8 bytes (530 MB at 8,142 classes); for small C."""
        matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        matrix[self.rows, self.cols] = self.counts
        return matrix

    def save(self, path: str | Path) -> None:
        """Write `path` (a .npz in the layout of the module docstring), under a temporary name then renamed."""
        with atomic_file(path, "wb") as f:
            np.savez(f, rows=self.rows, cols=self.cols, counts=self.counts,
                     shape=np.array([self.num_classes, self.num_classes], dtype=np.int64), layout=np.array(LAYOUT))

    @classmethod
    def load(cls, path: str | Path) -> "Confusion":
        """Read a confusion.npz, or the dense confusion.npy of an older run directory."""
        loaded = np.load(path)
        if isinstance(loaded, np.ndarray):
            rows, cols = np.nonzero(loaded)
            return cls(rows, cols, loaded[rows, cols].astype(np.int64), loaded.shape[0])
        with loaded as z:
            return cls(z["rows"], z["cols"], z["counts"], int(z["shape"][0]))
